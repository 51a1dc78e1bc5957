"""KV-cache decoding: the cached prefill + step path equals full recomputation.

Both the per-step logits (against one full forward pass over the whole sequence) and the greedy
tokens (against `greedy_recompute`, a forward pass per token) are compared, for prompts of
different lengths in one batch, prefix-LM masking and every attention kind that supports it.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import decode
from model.transformer import Transformer
from tests import helpers


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


def test_filter_logits_top_k_and_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()
  assert kept(decode.filter_logits(logits, 1.0, top_k=2)) == [True, True, False, False]
  # Nucleus 0.7: 0.5 < 0.7 so the second token is needed; 0.8 >= 0.7 stops there.
  assert kept(decode.filter_logits(logits, 1.0, top_p=0.7)) == [True, True, False, False]
  assert kept(decode.filter_logits(logits, 1.0, top_p=0.9)) == [True, True, True, False]


def test_beam_of_one_is_greedy():
  model, params = _model("blocked")
  rng = np.random.default_rng(4)
  prompts = [list(rng.integers(4, 64, n)) for n in (5, 9)]
  tokens, prompt_len = decode.pack_prompts(prompts, max_new=6, bucket=8)
  beam = decode.beam_search(model, params, tokens, prompt_len, beam=1, max_new=6, eos_id=3,
                            length_penalty=0.0)
  greedy = decode.greedy(model, params, tokens, prompt_len, max_new=6, eos_id=3)
  np.testing.assert_array_equal(np.asarray(beam), np.asarray(greedy))


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
