"""Decoding controls (infer/decode_controls.py) on their own: the logit processors against a numpy
transcription of Hugging Face's, the sampling filters, the argument checks and the per-document
length limits. Their effect inside the cached decoders is tested in test_decode.py.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import decode_controls
from infer.decode_controls import Controls


def test_filter_logits_top_k_and_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()
  assert kept(decode_controls.filter_logits(logits, 1.0, top_k=2)) == [True, True, False, False]
  # Nucleus 0.7: 0.5 < 0.7 so the second token is needed; 0.8 >= 0.7 stops there.
  assert kept(decode_controls.filter_logits(logits, 1.0, top_p=0.7)) == [True, True, False, False]
  assert kept(decode_controls.filter_logits(logits, 1.0, top_p=0.9)) == [True, True, True, False]


def reference_controls(logits, generated, controls, eos_id, limit=None):
  """numpy, step by step, Hugging Face's logits processors in HF's order over one row's
  generated tokens: RepetitionPenaltyLogitsProcessor, NoRepeatNGramLogitsProcessor,
  MinNewTokensLengthLogitsProcessor, then the length limit (only eos, at 0: ForcedEOS)."""
  scores = np.array(logits, np.float32)
  g = [int(t) for t in generated]
  p = controls.repetition_penalty
  if p != 1.0:
    for t in set(g):
      scores[t] = scores[t] / p if scores[t] > 0 else scores[t] * p
  n = controls.no_repeat_ngram_size
  if n and len(g) + 1 >= n:                 # HF: nothing banned while cur_len + 1 < n
    ngrams = {}
    for i in range(len(g) - n + 1):
      ngrams.setdefault(tuple(g[i:i + n - 1]), []).append(g[i + n - 1])
    for t in ngrams.get(tuple(g[len(g) - n + 1:]), []):
      scores[t] = -np.inf
  if len(g) < controls.min_new:
    scores[eos_id] = -np.inf
  if limit is not None and len(g) >= limit:
    scores[:] = -np.inf
    scores[eos_id] = 0.0
  return scores


@pytest.mark.parametrize("controls", [
    Controls(no_repeat_ngram_size=1),
    Controls(no_repeat_ngram_size=3, repetition_penalty=1.5, min_new=4),
    Controls(no_repeat_ngram_size=2, repetition_penalty=0.7),
])
def test_apply_controls_matches_the_reference_processors(controls):
  rng = np.random.default_rng(0)
  rows, vocab, max_new, eos = 4, 16, 12, 3
  # Few distinct tokens, so that n-grams recur; logits of both signs.
  history = rng.integers(4, 7, (rows, max_new)).astype(np.int32)
  logits = rng.normal(0, 2, (rows, vocab)).astype(np.float32)
  limit = np.array([12, 5, 0, 8], np.int32)
  apply = jax.jit(decode_controls.apply_controls, static_argnames=("controls", "eos_id"))
  for count in range(max_new + 1):
    got = np.asarray(apply(logits, controls=controls, history=history, count=count, eos_id=eos,
                           limit=limit))
    want = np.stack([reference_controls(logits[r], history[r, :count], controls, eos, limit[r])
                     for r in range(rows)])
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=f"count={count}")
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"count={count}")
  # Everything off: the logits themselves, untouched.
  assert decode_controls.apply_controls(logits, Controls(), history, 3, eos) is logits


def test_controls_are_checked_and_hash_alike():
  assert Controls(temperature=1, min_new=2.0) == Controls(temperature=1.0, min_new=2)
  assert hash(Controls(top_k=np.int64(3))) == hash(Controls(top_k=3))
  for bad, message in [(dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size=-1"),
                       (dict(repetition_penalty=0.0), "repetition_penalty=0.0: expected > 0"),
                       (dict(min_new=1.5), "min_new=1.5: expected an integer"),
                       (dict(top_p=0.0), "top_p=0.0")]:
    with pytest.raises(ValueError, match=re.escape(message)):
      Controls(**bad)
  with pytest.raises(TypeError, match="ngram_words"):
    Controls(ngram_words=(0, 1))


def test_length_limit_and_learned_ratio():
  limits = decode_controls.length_limit
  np.testing.assert_array_equal(limits([30, 0, 5, 1000], 0.1, 2, 64), [3, 2, 2, 64])
  np.testing.assert_array_equal(limits([31, 10], 0.1, 0, 64), [4, 1])
  assert decode_controls.fit_length_ratio([100, 10, 50, 0], [10, 5, 10, 3]) == pytest.approx(0.2)
  with pytest.raises(ValueError, match="no pair"):
    decode_controls.fit_length_ratio([0], [4])
