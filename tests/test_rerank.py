"""MBR decoding (infer/rerank.py): the agreement is ROUGE's, the consensus is chosen, and the
sampling it rests on is seeded, per-document and under the decoding controls."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rouge_score import rouge_scorer

from infer import decode, decode_controls, rerank
from model.transformer import Transformer
from tests import helpers


def test_ngram_f1_by_hand():
  assert rerank.ngram_f1([1, 2, 3, 4], [1, 2, 3, 5], 1) == pytest.approx(0.75)       # 2*3/8
  assert rerank.ngram_f1([1, 2, 3, 4], [1, 2, 3, 5], 2) == pytest.approx(4 / 6)      # 2*2/6
  assert rerank.ngram_f1([1, 1, 1], [1], 1) == pytest.approx(0.5)    # multisets: 1 match of 3+1
  assert rerank.ngram_f1([1, 1, 1], [1], 2) == 0.0                   # [1] has no bigram
  assert rerank.ngram_f1([], [1, 2], 1) == 0.0


def test_agreement_equals_rouge_score_on_ids_written_as_words():
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2"], use_stemmer=False)
  rng = np.random.default_rng(0)
  for _ in range(20):
    a, b = (list(rng.integers(0, 6, rng.integers(1, 12))) for _ in range(2))
    words = lambda ids: " ".join(f"w{t}" for t in ids)
    scores = scorer.score(words(b), words(a))
    expected = 0.5 * (scores["rouge1"].fmeasure + scores["rouge2"].fmeasure)
    assert rerank.agreement(a, b) == pytest.approx(expected, abs=1e-12)


def test_mbr_picks_the_consensus_and_ties_go_to_the_first():
  outlier = [9, 9, 8]
  samples = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4, 6]]
  # Mean agreement: [1,2,3,4] 0.527, [1,2,3,5] 0.442, [1,2,3,4,6] 0.497, the outlier 0.
  assert rerank.mbr_index([outlier] + samples) == 1
  assert rerank.mbr_index([[4, 5], [4, 5], [4, 5]]) == 0
  assert rerank.mbr_index([[7]]) == 0


def test_source_support_is_precision_against_the_document_and_can_outweigh_agreement():
  source = [5, 6, 7, 8, 9]
  # Unigrams 3 of 4 in the source, bigrams (5,6), (6,7) of 3: (0.75 + 2/3) / 2.
  assert rerank.support([5, 6, 7, 1], source) == pytest.approx((0.75 + 2 / 3) / 2)
  assert rerank.support([], source) == 0.0 and rerank.support([5, 6], source) == 1.0
  generic = [[1, 2, 3], [1, 2, 3, 4], [1, 2, 4]]
  faithful = [6, 7, 8]
  # Mean agreements: 0.471, 0.486, 0.404 and 0 (the faithful one); support: 0, 0, 0 and 1.
  assert rerank.mbr_index(generic + [faithful]) == 1
  assert rerank.mbr_index(generic + [faithful], source, source_weight=0.0) == 1
  # utility = mean agreement + weight x support: the faithful one wins above a weight of 0.486.
  assert rerank.mbr_index(generic + [faithful], source, source_weight=0.48) == 1
  assert rerank.mbr_index(generic + [faithful], source, source_weight=0.49) == 3


def test_choose_weighs_each_documents_own_source():
  deterministic = np.array([[1, 2, 3, 0], [1, 2, 3, 0]])
  drawn = np.array([[[1, 2, 3, 0], [6, 7, 0, 0]], [[1, 2, 3, 0], [6, 7, 0, 0]]])
  sources = [[6, 7, 8], [1, 2, 3]]
  _, picks = rerank.choose(deterministic, drawn, eos_id=0, sources=sources, source_weight=2.0)
  assert picks == [2, 0]    # document 0's source says [6, 7]; document 1's says [1, 2, 3]
  _, picks = rerank.choose(deterministic, drawn, eos_id=0)
  assert picks == [0, 0]


def _model():
  cfg = helpers.tiny_model_cfg(attention_kind="full")
  model = Transformer(cfg)
  return model, helpers.numpy_params(model, jnp.zeros((1, 8), jnp.int32), seed=1)


def _prompts():
  rng = np.random.default_rng(3)
  return decode.pack_prompts([list(rng.integers(4, 64, n)) for n in (4, 7)], max_new=8,
                             bucket=8)


def test_samples_are_seeded_per_document_and_follow_the_controls():
  model, params = _model()
  tokens, prompt_len = _prompts()
  hot = decode_controls.Controls(temperature=2.0)
  draw = lambda seed, controls=hot: rerank.sample(
      model, params, tokens, prompt_len, jax.random.PRNGKey(seed), samples=3, max_new=8,
      eos_id=3, controls=controls)
  first = draw(0)
  assert first.shape == (2, 3, 8)
  np.testing.assert_array_equal(first, draw(0))
  assert not np.array_equal(first, draw(1))
  assert len({tuple(row) for row in first[0]}) > 1        # the samples of a document differ
  # Sample s of document b is row b * samples + s of one `generate` over repeated prompts.
  repeated = decode.generate(model, params, jnp.repeat(tokens, 3, axis=0),
                             jnp.repeat(prompt_len, 3, axis=0), jax.random.PRNGKey(0),
                             max_new=8, eos_id=3, controls=hot)
  np.testing.assert_array_equal(first.reshape(6, 8), np.asarray(repeated))
  # The no-repeat ban holds in every sample (unigrams: no token twice before eos).
  for row in draw(0, dataclasses.replace(hot, no_repeat_ngram_size=1)).reshape(6, 8):
    kept = decode.strip(row, 3)
    assert len(set(kept)) == len(kept)
  with pytest.raises(ValueError, match="temperature > 0"):
    draw(0, decode_controls.Controls())


@pytest.mark.slow
def test_mbr_decode_returns_the_argmax_candidate_and_greedy_when_samples_are_greedy():
  model, params = _model()
  tokens, prompt_len = _prompts()
  greedy = np.asarray(decode.greedy(model, params, tokens, prompt_len, max_new=8, eos_id=3))
  hot = rerank.Sampling(samples=4, temperature=2.0, seed=2)
  chosen, picks = rerank.mbr_decode(model, params, tokens, prompt_len, greedy, hot, max_new=8,
                                    eos_id=3, controls=decode_controls.Controls())
  drawn = rerank.sample(model, params, tokens, prompt_len, jax.random.PRNGKey(2), samples=4,
                        max_new=8, eos_id=3, controls=decode_controls.Controls(temperature=2.0))
  for b in range(2):
    rows = [decode.strip(greedy[b], 3)] + [decode.strip(r, 3) for r in drawn[b]]
    assert picks[b] == rerank.mbr_index(rows)
    assert chosen[b] == list(rows[picks[b]])
  # At a near-zero temperature every sample is the greedy summary: MBR returns it.
  cold = rerank.Sampling(samples=3, temperature=1e-4)
  chosen, picks = rerank.mbr_decode(model, params, tokens, prompt_len, greedy, cold, max_new=8,
                                    eos_id=3, controls=decode_controls.Controls())
  assert picks == [0, 0]
  assert chosen == [list(decode.strip(row, 3)) for row in greedy]


@pytest.mark.parametrize("fields, message", [
    (dict(samples=-1), "samples=-1: expected >= 0"),
    (dict(temperature=0.0), "temperature=0.0: expected > 0"),
    (dict(top_p=1.5), "top_p=1.5: expected (0, 1]"),
    (dict(source_weight=-1.0), "source_weight=-1.0: expected >= 0")])
def test_sampling_settings_are_checked(fields, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
    rerank.Sampling(**fields)
