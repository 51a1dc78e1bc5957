"""Tests of model/sharding.py and the sharded train step on 8 fake CPU devices.

The key property: a train step on a data=2 x fsdp=2 x tensor=2 mesh computes the same loss,
metrics and updated params as on a single device, from the same init, and gradient
accumulation over 2 micro-batches equals one step on the whole batch. Comparisons use
rtol 1e-5 (float32) on losses/metrics; updated params are compared through the update
(new - old), see _assert_updates_close.

The equivalence steps use plain SGD: Adam's first update is ~lr * sign(g), which turns
round-off-level differences of near-zero gradients into lr-sized ones and would make a
tolerance meaningless. AdamW's sharded optimizer state is checked separately.
"""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import legal_pretrain
from helpers import F32_RTOL, lm_batch, mesh_from, optim_cfg
from model import sharding as sharding_lib
from model.config import ModelConfig
from model.transformer import Transformer
from train import aot, optim
from train import state as state_lib
from train import step as step_lib
from train.tasks import pretrain

BATCH, SEQ = 8, 16      # global rows: 4 data shards (data x fsdp) x 2 rows; 2 micro-batches of 4
SGD_LR = 0.5


def _model_cfg(**overrides):
  base = dict(vocab_size=256, num_layers=1, d_model=64, num_heads=4, num_kv_heads=2,
              head_dim=16, mlp_dim=128)
  base.update(overrides)
  return ModelConfig(**base)


def _task(model):
  return pretrain.PretrainTask(model, z_loss=1e-4)


def _sgd():
  schedule = optax.constant_schedule(SGD_LR)
  return optax.sgd(schedule), schedule


def _mesh8():
  return mesh_from(jax.devices(), (2, 2, 2))


def _mesh1():
  return mesh_from(jax.devices()[:1], (1, 1, 1))


def _run_step(mesh, accum, tx, schedule, batch, init=None):
  """(initial state on host, new state on host, metrics on host, live new state).

  `init` (a host TrainState) skips create_state and places that state on `mesh` instead.
  """
  model = Transformer(_model_cfg())
  task = _task(model)
  dummy = task.dummy_batch(1, SEQ)
  if init is None:
    state, abstract, shardings = state_lib.create_state(model, tx, dummy, mesh, seed=0)
  else:
    abstract, shardings = state_lib.state_shardings(model, tx, dummy, mesh)
    state = jax.device_put(init, shardings)
  initial = jax.device_get(state)
  bs = sharding_lib.batch_sharding(mesh)
  example = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bs) for k, v in batch.items()}
  compiled = step_lib.compile_step(
      step_lib.make_train_step(task, tx, schedule, accum, mesh), mesh, (shardings, bs),
      (shardings, sharding_lib.replicated(mesh)),
      (state_lib.abstract_with_shardings(abstract, shardings), example))
  new_state, metrics = compiled(state, jax.device_put(batch, bs))
  return initial, jax.device_get(new_state), jax.device_get(metrics), new_state


@pytest.fixture(scope="module")
def batch():
  return lm_batch(BATCH, SEQ, 256, seed=0)


@pytest.fixture(scope="module")
def single_device_step(batch):
  tx, schedule = _sgd()
  return _run_step(_mesh1(), 1, tx, schedule, batch)


@pytest.fixture(scope="module")
def sharded_step(batch):
  tx, schedule = _sgd()
  return _run_step(_mesh8(), 1, tx, schedule, batch)


def _assert_metrics_close(m, ref):
  assert set(m) == set(ref) == {"loss", "z_loss", "accuracy", "grad_norm", "lr", "tokens",
                                "skipped"}
  for k in ref:
    np.testing.assert_allclose(m[k], ref[k], rtol=F32_RTOL, err_msg=k)


def _assert_updates_close(new, old, ref_new, ref_old):
  """The SGD updates (= -lr * grad) agree to 1e-5 of each tensor's largest update, plus the
  float32 rounding of the params themselves (new - old carries one ulp of |old|)."""
  def check(path, n, o, rn, ro):
    upd, ref_upd = np.asarray(n) - np.asarray(o), np.asarray(rn) - np.asarray(ro)
    scale = float(np.max(np.abs(ref_upd)))
    name = jax.tree_util.keystr(path)
    assert scale > 0, f"{name}: the step did not change this parameter"
    ulp = float(np.spacing(np.max(np.abs(np.asarray(ro)))))
    np.testing.assert_allclose(upd, ref_upd, rtol=1e-4, atol=1e-5 * scale + 2 * ulp,
                               err_msg=name)
    np.testing.assert_allclose(n, rn, rtol=F32_RTOL, atol=1e-6, err_msg=name)
  jax.tree_util.tree_map_with_path(check, new, old, ref_new, ref_old)


# ---------------------------------------------------------------------------------------------
# mesh_shape / check_divisible
# ---------------------------------------------------------------------------------------------

def test_mesh_shape_fills_the_wildcard_axis():
  assert sharding_lib.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, 8) == (8, 1, 1, 1)
  assert sharding_lib.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 1, 2)
  assert sharding_lib.mesh_shape({"data": 1, "fsdp": 4, "tensor": -1}, 8) == (1, 4, 1, 2)
  assert sharding_lib.mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 1, 2)


def test_mesh_shape_mismatch_names_device_count():
  with pytest.raises(ValueError, match=r"multiplies to 4 but there are 8 devices"):
    sharding_lib.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(ValueError, match=r"does not divide the 8 devices"):
    sharding_lib.mesh_shape({"data": 3, "fsdp": -1, "tensor": 1}, 8)


def test_mesh_shape_rejects_two_wildcards_and_zero():
  with pytest.raises(ValueError, match=r"only one axis may be -1.*'data', 'fsdp'"):
    sharding_lib.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="positive or -1"):
    sharding_lib.mesh_shape({"data": 0, "fsdp": -1, "tensor": 1}, 8)


def test_make_mesh_uses_all_devices_with_axis_names():
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_check_divisible_names_the_parameter():
  mesh = _mesh8()
  abstract = {"layer": {"kernel": jax.ShapeDtypeStruct((64, 3), jnp.float32),
                        "scale": jax.ShapeDtypeStruct((3,), jnp.float32)}}
  shardings = {"layer": {"kernel": NamedSharding(mesh, PartitionSpec("fsdp", "tensor")),
                         "scale": NamedSharding(mesh, PartitionSpec())}}
  with pytest.raises(ValueError, match=r"params \['layer'\]\['kernel'\] has shape \(64, 3\): "
                                       r"dim 3 does not split over mesh axes \('tensor',\)"):
    sharding_lib.check_divisible(abstract, shardings)
  ok = {"layer": {"kernel": jax.ShapeDtypeStruct((64, 4), jnp.float32),
                  "scale": abstract["layer"]["scale"]}}
  sharding_lib.check_divisible(ok, shardings)   # does not raise


def test_state_shardings_rejects_kv_heads_that_do_not_split():
  """1 KV head on tensor=2: the error names the key kernel, before anything is allocated."""
  model = Transformer(_model_cfg(num_kv_heads=1))
  tx, _ = _sgd()
  with pytest.raises(ValueError, match=r"\['attn'\]\['key'\]\['kernel'\].*dim 1 does not split"):
    state_lib.state_shardings(model, tx, pretrain.PretrainTask.dummy_batch(1, SEQ), _mesh8())


# ---------------------------------------------------------------------------------------------
# Sharded state
# ---------------------------------------------------------------------------------------------

def test_params_are_really_sharded(sharded_step):
  cfg = _model_cfg()
  state = sharded_step[3]      # the live state after one step on the 8-device mesh
  emb = state.params["embed"]["embedding"]
  assert emb.sharding.spec == PartitionSpec("tensor", "fsdp")
  assert len(emb.sharding.device_set) == 8
  assert emb.addressable_shards[0].data.shape == (cfg.vocab_size // 2, cfg.d_model // 2)
  q = state.params["block_0"]["attn"]["query"]["kernel"]
  assert q.sharding.spec == PartitionSpec("fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (cfg.d_model // 2, cfg.num_heads // 2,
                                                cfg.head_dim)
  wo = state.params["block_0"]["mlp"]["wo"]["kernel"]
  assert wo.sharding.spec == PartitionSpec("tensor", "fsdp")
  assert wo.addressable_shards[0].data.shape == (cfg.mlp_dim // 2, cfg.d_model // 2)
  assert state.params["final_norm"]["scale"].sharding.is_fully_replicated
  # Per-device bytes of the params are well below the replicated size.
  total = sum(x.nbytes for x in jax.tree.leaves(state.params))
  per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state.params))
  assert per_device < 0.3 * total


def test_adamw_moments_are_sharded_like_their_params():
  model = Transformer(_model_cfg())
  tx, _ = optim.make_optimizer(optim_cfg(), 10)
  abstract, shardings = state_lib.state_shardings(
      model, tx, pretrain.PretrainTask.dummy_batch(1, SEQ), _mesh8())
  chex.assert_trees_all_equal_structs(shardings.params, abstract.params)
  is_adam = lambda x: hasattr(x, "mu") and hasattr(x, "nu")
  adam = [s for s in jax.tree.leaves(shardings.opt_state, is_leaf=is_adam) if is_adam(s)]
  assert len(adam) == 1
  n_sharded = 0
  for moment in (adam[0].mu, adam[0].nu):
    for p, m in zip(jax.tree.leaves(shardings.params), jax.tree.leaves(moment)):
      assert m.spec == p.spec and m.mesh.shape == p.mesh.shape
      n_sharded += any(a is not None for a in p.spec)
  assert n_sharded >= 2 * 8         # every kernel and the embedding are split
  assert shardings.step.spec == PartitionSpec() and shardings.rng.spec == PartitionSpec()


def test_init_is_identical_on_one_and_eight_devices(single_device_step, sharded_step):
  init1, init8 = single_device_step[0], sharded_step[0]
  chex.assert_trees_all_equal(init1.params, init8.params)
  np.testing.assert_array_equal(init1.rng, init8.rng)
  assert int(init1.step) == int(init8.step) == 0


# ---------------------------------------------------------------------------------------------
# The train step: 8 devices == 1 device; accumulation == one big batch
# ---------------------------------------------------------------------------------------------

def test_sharded_step_matches_single_device(batch, single_device_step, sharded_step):
  init1, new1, m1, _ = single_device_step
  init8, new8, m8, live8 = sharded_step
  assert int(new1.step) == int(new8.step) == 1
  assert 3.0 < float(m1["loss"]) < 8.0           # ~log(256) at init: a real loss
  _, weights = pretrain.lm_targets(jnp.asarray(batch["tokens"]),
                                   jnp.asarray(batch["segment_ids"]))
  assert float(m1["tokens"]) == float(weights.sum()) > 0.5 * BATCH * SEQ
  _assert_metrics_close(m8, m1)
  _assert_updates_close(new8.params, init8.params, new1.params, init1.params)
  # The updated state keeps its shardings.
  emb = live8.params["embed"]["embedding"]
  assert emb.sharding.spec == PartitionSpec("tensor", "fsdp")
  assert len(emb.sharding.device_set) == 8


def test_grad_accumulation_matches_one_big_batch(batch, sharded_step):
  init, new1, m1, _ = sharded_step
  tx, schedule = _sgd()
  init2, new2, m2, _ = _run_step(_mesh8(), 2, tx, schedule, batch, init=init)
  chex.assert_trees_all_equal(init.params, init2.params)
  _assert_metrics_close(m2, m1)
  _assert_updates_close(new2.params, init2.params, new1.params, init.params)


# ---------------------------------------------------------------------------------------------
# AOT compile of the tiny preset on the 8-device mesh
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_aot_report_tiny_on_8_devices(capsys):
  config = legal_pretrain.get_config("tiny")
  config.mesh.update(data=2, fsdp=2, tensor=2)
  out = aot.report(config)
  assert out["mesh"] == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
  assert out["devices"] == 8

  model_cfg = ModelConfig.from_config(config.model, config.data.vocab_size)
  d, v, l = model_cfg.d_model, model_cfg.vocab_size, model_cfg.num_layers
  per_layer = (d * model_cfg.num_heads * model_cfg.head_dim * 2          # query, out
               + d * model_cfg.num_kv_heads * model_cfg.head_dim * 2     # key, value
               + d * model_cfg.mlp_dim * 3                               # swiglu wi, wg, wo
               + 2 * d)                                                  # two norms
  assert out["params"] == v * d + l * per_layer + d                      # + final norm

  # Per-device argument bytes = this device's shard of the state + its rows of the batch.
  tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)
  model = Transformer(model_cfg)
  mesh = sharding_lib.make_mesh(config.mesh)
  abstract, shardings = state_lib.state_shardings(
      model, tx, pretrain.PretrainTask.dummy_batch(1, config.data.seq_len), mesh)
  state_bytes = sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
                    for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))
  batch_bytes = 3 * (config.data.batch_size // 4) * config.data.seq_len * 4
  assert out["argument_size_in_bytes"] == state_bytes + batch_bytes
  assert out["output_size_in_bytes"] > 0.9 * state_bytes
  assert out["temp_size_in_bytes"] > 0
  assert out["model_flops_per_step"] > 6 * out["params"] * config.data.batch_size * \
      config.data.seq_len * 0.5
  printed = capsys.readouterr().out
  assert "AOT compile OK" in printed and "per-device argument_size_in_bytes" in printed
