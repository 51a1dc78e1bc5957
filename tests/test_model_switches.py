"""The model switches added for imported families (model/config.py): the defaults build exactly
the original parameter tree, runs recorded before the switches existed still configure, and
the switches do what they say. Compared against transformers in tests/test_hf_convert.py."""
import dataclasses

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from model.config import ModelConfig
from model.transformer import Transformer


def _cfg(**changes):
  config = common.base_config()
  config.model.update(num_layers=1, d_model=16, num_heads=2, num_kv_heads=1, head_dim=8,
                      mlp_dim=32)
  return dataclasses.replace(ModelConfig.from_config(config.model, 64), **changes)


def _params(cfg):
  params = Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  params = flax.linen.meta.unbox(params)
  return {"/".join(k): v.shape for k, v in flax.traverse_util.flatten_dict(params).items()}


def test_defaults_build_the_original_tree():
  assert _params(_cfg()) == {
      "embed/embedding": (64, 16), "final_norm/scale": (16,),
      "block_0/attn_norm/scale": (16,), "block_0/mlp_norm/scale": (16,),
      "block_0/attn/query/kernel": (16, 2, 8), "block_0/attn/key/kernel": (16, 1, 8),
      "block_0/attn/value/kernel": (16, 1, 8), "block_0/attn/out/kernel": (2, 8, 16),
      "block_0/mlp/wi/kernel": (16, 32), "block_0/mlp/wg/kernel": (16, 32),
      "block_0/mlp/wo/kernel": (32, 16)}


def test_config_recorded_before_the_switches_still_builds():
  """A recorded config lacking the switches builds once it is brought up to date (as
  infer.loading.open_run does); without that, the missing keys are named."""
  recorded = common.base_config().to_dict()
  for key in ("norm", "norm_eps", "qkv_bias", "rope_scaling", "embed_scale", "causal",
              "tied_head_rescale", "logit_softcap", "norm_placement"):
    del recorded["model"][key]
  with pytest.raises(ValueError, match="config.model lacks norm, norm_eps, norm_placement"):
    ModelConfig.from_config(ml_collections.ConfigDict(recorded["model"]), 64)
  model = common.upgrade(recorded)["model"]
  cfg = ModelConfig.from_config(ml_collections.ConfigDict(model), 64)
  assert (cfg.norm, cfg.causal, cfg.tied_head_rescale, cfg.rope_scaling) == (
      "rmsnorm", True, True, "none")


def test_biases_and_layernorm_add_their_parameters():
  shapes = _params(_cfg(norm="layernorm", norm_bias=True, qkv_bias=True, out_bias=True,
                        mlp_bias=True, mlp_activation="gelu"))
  assert shapes["block_0/attn/query/bias"] == (2, 8)
  assert shapes["block_0/attn/key/bias"] == (1, 8)
  assert shapes["block_0/attn/out/bias"] == (16,)
  assert shapes["block_0/mlp/wi/bias"] == (32,) and shapes["block_0/mlp/wo/bias"] == (16,)
  assert shapes["final_norm/bias"] == (16,)


@pytest.mark.parametrize("causal", [True, False])
def test_causal_switch(causal):
  cfg = _cfg(causal=causal)
  model = Transformer(cfg)
  tokens = jnp.arange(8, dtype=jnp.int32)[None] + 3
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]
  a = model.apply({"params": params}, tokens)
  b = model.apply({"params": params}, tokens.at[0, -1].set(1))
  first_changed = not np.allclose(a[0, 0], b[0, 0])
  assert first_changed == (not causal)


def test_post_norm_has_no_final_norm_and_softcap_bounds_logits():
  shapes = _params(_cfg(norm_placement="post"))
  assert "final_norm/scale" not in shapes and "block_0/mlp_norm/scale" in shapes
  cfg = _cfg(logit_softcap=0.5, tied_head_rescale=False)
  model = Transformer(cfg)
  tokens = jnp.arange(8, dtype=jnp.int32)[None]
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]
  assert float(jnp.max(jnp.abs(model.apply({"params": params}, tokens)))) <= 0.5


def test_plus_one_norm_starts_at_identity_scale():
  shapes = _params(_cfg(norm_plus_one=True))
  assert shapes["final_norm/scale"] == (16,)
  params = Transformer(_cfg(norm_plus_one=True)).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  np.testing.assert_array_equal(flax.linen.meta.unbox(params)["final_norm"]["scale"], 0.0)


def test_encoder_switches_add_their_parameters():
  enc = dict(positions="learned", max_len=16, norm="layernorm", norm_bias=True,
             norm_placement="post", causal=False, embed_norm=True, type_vocab_size=2,
             pooling="cls")
  shapes = _params(_cfg(pooler="tanh", **enc))
  assert shapes["type_embed/embedding"] == (2, 16) and shapes["embed_norm/bias"] == (16,)
  assert shapes["pooler/kernel"] == (16, 16) and shapes["pooler/bias"] == (16,)   # no classifier
  assert not any(k.startswith(("cls_", "final_norm")) for k in shapes)
  shapes = _params(_cfg(num_classes=3, cls_hidden="relu", cls_bias=True, **enc))
  assert shapes["cls_hidden/kernel"] == (16, 16) and shapes["cls_head/bias"] == (3,)
  assert "pooler/kernel" not in shapes


def test_position_offset_and_bidirectional_padding():
  """position_offset reads the table from row `offset` on (RoBERTa); a bidirectional model's
  pool_mask hides the pads from the real tokens (a pad's id does not change them)."""
  cfg = _cfg(positions="learned", max_len=16, causal=False, num_classes=2, pooling="cls")
  model = Transformer(cfg)
  tokens = jnp.array([[5, 6, 7, 8, 0, 0]], jnp.int32)
  params = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
  shifted = dataclasses.replace(cfg, position_offset=2)
  table = params["pos_embed"]["pos_embedding"]
  moved = {**params, "pos_embed": {"pos_embedding": jnp.roll(table, 2, axis=0)}}
  np.testing.assert_allclose(Transformer(shifted).apply({"params": moved}, tokens),
                             model.apply({"params": params}, tokens), rtol=1e-6)
  mask = tokens > 0
  a = model.apply({"params": params}, tokens, pool_mask=mask, return_hidden=True)
  b = model.apply({"params": params}, tokens.at[0, 5].set(9), pool_mask=mask, return_hidden=True)
  np.testing.assert_allclose(a[0, :4], b[0, :4], rtol=1e-6)
  c = model.apply({"params": params}, tokens.at[0, 5].set(9), return_hidden=True)   # no mask
  assert not np.allclose(a[0, :4], c[0, :4])
