"""KV-cache decoding: the cached prefill + step path equals full recomputation.

Both the per-step logits (against one full forward pass over the whole sequence) and the greedy
tokens (against `greedy_recompute`, a forward pass per token) are compared, for prompts of
different lengths in one batch, prefix-LM masking and every attention kind that supports it.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import decode, decode_controls, word_ngrams
from model.transformer import Transformer
from tests import helpers
from tests.test_decode_controls import reference_controls


def _model(kind):
  cfg = helpers.tiny_model_cfg(attention_kind=kind, attention_block_size=8)
  model = Transformer(cfg)
  params = helpers.numpy_params(model, jnp.zeros((1, 8), jnp.int32), seed=1)
  return model, params


@pytest.mark.parametrize("kind", ["full", "blocked"])
def test_cached_steps_match_full_forward_logits(kind):
  model, params = _model(kind)
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, 64, (2, 16)).astype(np.int32)
  prompt_len = np.array([5, 9], np.int32)
  _, cache_vars = model.apply(
      {"params": params}, jnp.asarray(tokens), segment_ids=jnp.ones((2, 16), jnp.int32),
      prefix_len=prompt_len, return_hidden=True, cache_mode="prefill", mutable=["cache"])
  cache = cache_vars["cache"]
  full = model.apply({"params": params}, jnp.asarray(tokens),
                     segment_ids=jnp.ones((2, 16), jnp.int32), prefix_len=prompt_len)
  rows = np.arange(2)
  for s in range(5):
    pos = prompt_len + s
    logits, v = model.apply({"params": params, "cache": cache}, tokens[rows, pos][:, None],
                            positions=pos[:, None], cache_mode="step", mutable=["cache"])
    cache = v["cache"]
    chex.assert_trees_all_close(logits[:, 0], full[rows, pos], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["full", "blocked"])
def test_greedy_with_cache_matches_recomputation_token_for_token(kind):
  model, params = _model(kind)
  rng = np.random.default_rng(2)
  prompts = [list(rng.integers(4, 64, n)) for n in (3, 11, 6)]
  tokens, prompt_len = decode.pack_prompts(prompts, max_new=10, bucket=8)
  cached = decode.greedy(model, params, tokens, prompt_len, max_new=10, eos_id=3)
  naive = decode.greedy_recompute(model, params, tokens, prompt_len, max_new=10, eos_id=3)
  chex.assert_shape(cached, (3, 10))
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(naive))
  # Not a degenerate constant sequence: the comparison means something.
  assert len(set(np.asarray(cached).ravel().tolist())) > 3


def test_pack_prompts_and_strip():
  tokens, prompt_len = decode.pack_prompts([[5, 6, 7], [8]], max_new=4, bucket=8)
  assert tokens.shape == (2, 8)
  np.testing.assert_array_equal(prompt_len, [3, 1])
  assert decode.strip([9, 10, 3, 3], eos_id=3) == [9, 10]
  assert decode.strip([9, 10], eos_id=3) == [9, 10]


@pytest.mark.slow
def test_sampling_with_top_k_1_is_greedy_and_temperature_changes_samples():
  model, params = _model("full")
  rng = np.random.default_rng(3)
  prompts = [list(rng.integers(4, 64, n)) for n in (4, 7)]
  tokens, prompt_len = decode.pack_prompts(prompts, max_new=8, bucket=8)
  greedy = decode.greedy(model, params, tokens, prompt_len, max_new=8, eos_id=3)
  top1 = decode.generate(model, params, tokens, prompt_len, jax.random.PRNGKey(5), max_new=8,
                         eos_id=3, temperature=1.0, top_k=1)
  np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))
  hot = [decode.generate(model, params, tokens, prompt_len, jax.random.PRNGKey(k), max_new=8,
                         eos_id=3, temperature=2.0) for k in range(2)]
  assert not np.array_equal(np.asarray(hot[0]), np.asarray(hot[1]))


def test_beam_of_one_is_greedy():
  model, params = _model("blocked")
  rng = np.random.default_rng(4)
  prompts = [list(rng.integers(4, 64, n)) for n in (5, 9)]
  tokens, prompt_len = decode.pack_prompts(prompts, max_new=6, bucket=8)
  beam = decode.beam_search(model, params, tokens, prompt_len, beam=1, max_new=6, eos_id=3,
                            length_penalty=0.0)
  greedy = decode.greedy(model, params, tokens, prompt_len, max_new=6, eos_id=3)
  np.testing.assert_array_equal(np.asarray(beam), np.asarray(greedy))


@pytest.mark.slow
def test_full_width_beam_finds_the_best_two_token_continuation():
  # With beam = vocab, two steps of beam search are exhaustive: compare with brute force.
  model, params = _model("full")
  prompt = [7, 21, 40, 9]
  tokens, prompt_len = decode.pack_prompts([prompt], max_new=2, bucket=8)
  best = decode.beam_search(model, params, tokens, prompt_len, beam=64, max_new=2, eos_id=3,
                            length_penalty=0.0)
  p = len(prompt)
  rows = np.repeat(tokens, 64, axis=0)
  rows[:, p] = np.arange(64)
  mask = np.zeros_like(rows)
  mask[:, :p + 1] = 1
  logp = jax.nn.log_softmax(model.apply({"params": params}, jnp.asarray(rows),
                                        segment_ids=jnp.asarray(mask),
                                        prefix_len=jnp.full((64,), p, jnp.int32)))
  first = np.asarray(logp[0, p - 1])             # the same for every row (prefix only)
  second = np.asarray(logp[:, p])                # [first token, second token]
  total = first[:, None] + second
  total[3] = -np.inf
  total[3, 3] = first[3]                          # eos first: the hypothesis ends there
  t1, t2 = np.unravel_index(np.argmax(total), total.shape)
  np.testing.assert_array_equal(np.asarray(best)[0], [t1, t2])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "full"])
def test_causal_lm_continuation_matches_recomputation(kind):
  # Plain causal continuation; for `local` (window 6 < prompt + answer) the cache is a
  # window-sized ring, so this checks eviction and slot reuse too.
  cfg = helpers.tiny_model_cfg(attention_kind=kind, attention_block_size=4, attention_window=6)
  model = Transformer(cfg)
  params = helpers.numpy_params(model, jnp.zeros((1, 8), jnp.int32), seed=1)
  rng = np.random.default_rng(5)
  prompts = [list(rng.integers(4, 64, n)) for n in (3, 9, 14)]
  tokens, prompt_len = decode.pack_prompts(prompts, max_new=10, bucket=8)
  cached = decode.greedy(model, params, tokens, prompt_len, max_new=10, eos_id=3,
                         prefix_lm=False)
  naive = decode.greedy_recompute(model, params, tokens, prompt_len, max_new=10, eos_id=3,
                                  prefix_lm=False)
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(naive))
  if kind == "local":
    _, v = model.apply({"params": params}, jnp.asarray(tokens), segment_ids=jnp.asarray(
        (tokens > 0).astype(np.int32)), return_hidden=True, cache_mode="prefill",
        mutable=["cache"])
    chex.assert_shape(v["cache"]["block_0"]["attn"]["cached_key"], (3, 6, 2, 8))


# --- decoding controls inside the decoders (on their own: test_decode_controls.py) ------------
def _repeats(row, n: int, eos_id: int) -> bool:
  """Whether a generated row (up to eos) holds some n-gram twice."""
  row = decode.strip(row, eos_id)
  grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
  return len(grams) != len(set(grams))


def _one_layer():
  cfg = helpers.tiny_model_cfg(num_layers=1)
  model = Transformer(cfg)
  return model, helpers.numpy_params(model, jnp.zeros((1, 8), jnp.int32), seed=1)


PROMPT_LENGTHS = (3, 11, 6)


def _prompts(seed=2, max_new=10):
  rng = np.random.default_rng(seed)
  return decode.pack_prompts([list(rng.integers(4, 64, n)) for n in PROMPT_LENGTHS], max_new,
                             bucket=8)


@functools.cache
def _looping_greedy(max_new=10):
  """(tokens, prompt_len, greedy ids) of the one-layer random model, whose greedy output
  loops. Without controls the picks do not depend on eos_id: -1 ends nothing. Cached: two
  tests start from it (a compilation less)."""
  model, params = _one_layer()
  tokens, prompt_len = _prompts(max_new=max_new)
  raw = decode.greedy(model, params, tokens, prompt_len, max_new=max_new, eos_id=-1)
  return tokens, prompt_len, np.asarray(raw)


def test_no_repeat_ngram_stops_a_looping_model():
  model, params = _one_layer()
  tokens, prompt_len, raw = _looping_greedy()
  assert all(_repeats(row, 3, -1) for row in raw)         # random weights loop
  no_repeat = np.asarray(decode.greedy(model, params, tokens, prompt_len, max_new=10, eos_id=3,
                                       no_repeat_ngram_size=3))
  for row, free in zip(no_repeat, raw):
    assert not _repeats(row, 3, 3)
    # The same tokens up to the first one that would repeat a 3-gram, and not that one.
    first = next(i for i in range(2, 10) if _repeats(free[:i + 1], 3, -1))
    np.testing.assert_array_equal(row[:first], free[:first])
    assert row[first] != free[first]


def test_min_new_and_per_row_limits_greedy_and_beam():
  model, params = _one_layer()
  tokens, prompt_len, raw = _looping_greedy()
  eos = int(raw[0, 0])              # row 0's first token, one the other rows never emit
  assert eos not in raw[1:]
  limit = np.array([10, 4, 7], np.int32)
  options = dict(max_new=10, eos_id=eos, min_new=3, limit=limit)
  greedy = np.asarray(decode.greedy(model, params, tokens, prompt_len, **options))
  beam = np.asarray(decode.beam_search(model, params, tokens, prompt_len, beam=3,
                                       no_repeat_ngram_size=3, **options))
  for out in (greedy, beam):
    assert (out[:, :3] != eos).all()                     # no eos before min_new
    for b in (1, 2):
      assert (out[b, limit[b]:] == eos).all()            # nothing past the limit
  assert not any(_repeats(row, 3, eos) for row in beam)
  assert greedy[0, 0] != eos                             # min_new changed row 0
  for b in (1, 2):   # rows that would go on: exactly limit[b] tokens (the raw ones), then eos
    np.testing.assert_array_equal(greedy[b, :limit[b]], raw[b, :limit[b]])
    assert greedy[b, limit[b]] == eos


def test_beam_of_one_with_controls_is_greedy_with_them():
  model, params = _one_layer()
  tokens, prompt_len = _prompts(max_new=10)
  options = dict(max_new=10, eos_id=3, no_repeat_ngram_size=3)
  beam = decode.beam_search(model, params, tokens, prompt_len, beam=1, length_penalty=0.0,
                            **options)
  greedy = decode.greedy(model, params, tokens, prompt_len, **options)   # compiled above
  np.testing.assert_array_equal(np.asarray(beam), np.asarray(greedy))
  with pytest.raises(ValueError, match="beam search is deterministic"):
    decode.beam_search(model, params, tokens, prompt_len, beam=2, temperature=1.0, **options)


def _eos_controls_limit():
  """Every control on, and per-row limits; eos is the token row 0 would start with, so that
  min_new has something to ban."""
  return (int(_looping_greedy()[2][0, 0]),
          decode_controls.Controls(no_repeat_ngram_size=2, repetition_penalty=1.5, min_new=3),
          np.array([10, 4, 7], np.int32))


def test_cached_decoding_with_controls_matches_full_forwards_and_reference_processors():
  """The prefix-LM summarizer's greedy decoding with every control on (and per-row limits)
  against a full forward pass per token with the numpy processors applied between."""
  model, params = _one_layer()
  max_new = 10
  tokens, prompt_len, _ = _looping_greedy()
  rows = np.arange(len(prompt_len))
  forward = jax.jit(lambda tokens, length: model.apply(
      {"params": params}, tokens, prefix_len=jnp.asarray(prompt_len),
      segment_ids=(jnp.arange(tokens.shape[1])[None] < length[:, None]).astype(jnp.int32)
  )[jnp.arange(tokens.shape[0]), length - 1])
  eos, controls, limit = _eos_controls_limit()
  buf, done = tokens.copy(), np.zeros(len(rows), bool)
  want = np.zeros((len(rows), max_new), np.int32)
  for s in range(max_new):
    logits = np.asarray(forward(buf, prompt_len + s))
    generated = [buf[r, prompt_len[r]:prompt_len[r] + s] for r in rows]
    nxt = np.array([np.argmax(reference_controls(logits[r], generated[r], controls, eos,
                                                  limit[r])) for r in rows])
    want[:, s] = np.where(done, eos, nxt)
    done |= nxt == eos
    buf[rows, prompt_len + s] = nxt
  got = np.asarray(decode.generate(model, params, tokens, prompt_len, max_new=max_new,
                                   eos_id=eos, controls=controls, limit=limit))
  np.testing.assert_array_equal(got, want)
  assert (got[:, :3] != eos).all()                       # min_new
  assert (got[1, 4:] == eos).all() and (got[2, 7:] == eos).all()   # the limits
  assert not any(_repeats(row, 2, eos) for row in got)
  assert len(set(got.ravel().tolist())) > 4              # not a degenerate comparison


def test_generate_chunks_equals_generate_with_controls():
  """Chunk by chunk, the history and the limits carried between the compiled calls."""
  model, params = _one_layer()
  tokens, prompt_len, _ = _looping_greedy()
  eos, controls, limit = _eos_controls_limit()
  options = dict(max_new=10, eos_id=eos, controls=controls, limit=limit, prefix_lm=True)
  whole = decode.generate(model, params, tokens, prompt_len, **options)   # compiled above
  chunks = list(decode.generate_chunks(model, params, tokens, prompt_len, chunk=4, **options))
  np.testing.assert_array_equal(np.concatenate(chunks, axis=1), np.asarray(whole))


# --- word-level n-gram bans (infer/word_ngrams.py; its own tests in test_word_ngrams.py) -----
def test_greedy_with_word_pieces_repeats_no_word_ngram():
  """The looping model under a ban over words spelled by 1-3 pieces each (the 64 ids: a word
  start or a continuation of one of 16 letters): no word bigram twice, however spelled."""
  model, params = _one_layer()
  tokens, prompt_len, raw = _looping_greedy()
  letters = "abcdefghijklmnop"
  tok = helpers.PieceTokenizer([(" " if t % 2 else "") + letters[t % 16] for t in range(64)])
  words = word_ngrams.word_pieces(tok)
  assert any(_repeats(words.words(row), 2, -1) for row in raw)
  out = np.asarray(decode.greedy(model, params, tokens, prompt_len, max_new=10, eos_id=-1,
                                 no_repeat_ngram_size=2, ngram_words=words))
  for row in out:
    assert not _repeats(words.words(row), 2, -1), tok.decode(row)
