"""model.scan_layers: the blocks under one nn.scan (params stacked [layers, ...]) compute what the
per-layer model computes, train sharded over 8 devices, and their checkpoints load into the
per-layer layout that inference, fine-tuning and export read."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from infer import loading
from model import transformer

_TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 97)


def _cfgs(**kw):
  c = helpers.tiny_model_cfg(vocab_size=97, num_layers=3, **kw)
  return c, helpers.replace_cfg(c, scan_layers=True)


def _init(cfg):
  boxed = transformer.Transformer(cfg).init(jax.random.PRNGKey(0), _TOKENS)["params"]
  return nn.meta.unbox(boxed), boxed


@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_scanned_model_equals_the_per_layer_model(remat):
  per_layer, scanned = _cfgs(remat=remat)
  params, _ = _init(per_layer)
  stacked = transformer.stack_blocks(params)

  def loss(cfg, p):
    logits = transformer.Transformer(cfg).apply({"params": p}, _TOKENS)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  (l0, logits0), g0 = jax.value_and_grad(lambda p: loss(per_layer, p), has_aux=True)(params)
  (l1, logits1), g1 = jax.value_and_grad(lambda p: loss(scanned, p), has_aux=True)(stacked)
  chex.assert_trees_all_close(logits1, logits0, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(l1, l0, atol=1e-6)
  chex.assert_trees_all_close(g1, transformer.stack_blocks(g0),
                              atol=1e-5, rtol=1e-4)


def test_scanned_params_carry_a_layers_axis_and_round_trip():
  per_layer, scanned = _cfgs()
  _, boxed = _init(scanned)
  query = boxed["blocks"]["attn"]["query"]["kernel"]
  assert query.names[0] == "layers" and query.value.shape[0] == 3
  assert not any(k.startswith("block_") for k in boxed)
  params, _ = _init(per_layer)
  back = transformer.unstack_blocks(transformer.stack_blocks(params))
  chex.assert_trees_all_equal(back, params)


@pytest.mark.slow
def test_scanned_run_trains_sharded_and_loads_per_layer(tmp_path):
  (tmp_path / "corpus").mkdir()
  corpus = helpers.write_corpus(tmp_path / "corpus")
  workdir = tmp_path / "run"
  args = helpers.base_args(corpus, tmp_path / "data", workdir, **{
      "model.scan_layers": True, "model.num_layers": 2, "train.num_steps": 30,
      "train.eval_every": 30, "train.checkpoint_every": 30, "mesh.fsdp": 4, "mesh.data": 2})
  res = helpers.run_main(args, devices=8)
  assert res.returncode == 0, res.stderr[-3000:]
  losses = helpers.losses(workdir)
  assert losses[30] < losses[1] - 0.5, losses

  run = loading.open_run(str(workdir))
  scanned_cfg = run.model_config()
  assert scanned_cfg.scan_layers
  stacked = loading.restore_params(run, transformer.Transformer(scanned_cfg))
  assert stacked["blocks"]["mlp"]["wi"]["kernel"].shape[0] == 2
  # Inference reads the per-layer layout: same numbers from either layout.
  loaded = loading.LoadedModel.from_workdir(str(workdir))
  assert "block_1" in loaded.params and "blocks" not in loaded.params
  tokens = jnp.asarray(np.arange(16).reshape(1, 16) % 300)
  want = transformer.Transformer(scanned_cfg).apply({"params": stacked}, tokens)
  got = loaded.model.apply({"params": loaded.params}, tokens)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
