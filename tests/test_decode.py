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
