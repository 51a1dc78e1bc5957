"""bench/step_time.py and bench/reference_step.py on the tiny preset (8 fake CPU devices, 1 used)."""
import json
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs import bench_step
from bench import reference_step, step_time
from train import build


@pytest.mark.parametrize("overrides, packed", [
    ({}, True),   # tiny as is: GQA, untied head, swiglu; segment mask + restarting positions
    ({"tie_embeddings": True, "mlp_activation": "gelu", "num_kv_heads": 4}, False),
])
def test_reference_computes_the_project_loss(overrides, packed):
  """Same params, same batch -> same loss: the reference has the project's shape and math."""
  config = bench_step.get_config("tiny")
  config.model.update(**overrides)
  parts = build.build(config)
  c, model, task = parts.model_cfg, parts.model, parts.task
  batch = {k: jnp.asarray(v) for k, v in step_time.make_batch(config, packed, seed=1).items()}
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), batch["tokens"])["params"])

  @jax.jit
  def project_loss(params):
    _, sums = task.loss(params, batch, jax.random.PRNGKey(0), False)
    return sums["loss"] / sums["weight"]

  ref_params = reference_step.from_project(params, c)
  ref_loss = jax.jit(lambda p: reference_step.loss_fn(p, batch, c))(ref_params)
  chex.assert_trees_all_close(ref_loss, project_loss(params), atol=1e-5, rtol=0)
  # Every project parameter is used by the reference.
  assert sum(x.size for x in jax.tree.leaves(ref_params)) == sum(
      x.size for x in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def report():
  config = bench_step.get_config("tiny")
  config.optim.lr = 3e-2   # the warmup is 10 steps: a visible loss drop within the few run here
  return config, step_time.run_benchmark(config, steps=2, rounds=2, warmup=1,
                                         devices=jax.devices()[:1],
                                         variant={"model.dtype": "bfloat16"})


@pytest.mark.slow
def test_report_times_are_positive_and_finite(report):
  _, res = report
  for name in ("project", "reference"):
    r = res[name]
    assert len(r["times_ms"]) == 4
    for key in ("median_ms", "mean_ms", "tokens_per_s", "model_flops_per_s", "mfu"):
      assert math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
  assert res["ratio"] == pytest.approx(res["reference"]["median_ms"] / res["project"]["median_ms"])
  assert res["devices"] == 1
  json.dumps(res)   # --json_out must be able to write it
  assert "ratio =" in step_time.format_table(res)


@pytest.mark.slow
def test_variant_times_the_project_step_in_bf16_alongside(report):
  _, res = report
  assert res["runners"] == ["project", "reference", "variant"]
  f32, bf16 = res["project"], res["variant"]
  assert len(bf16["times_ms"]) == 4
  assert res["variant_ratio"] == pytest.approx(f32["median_ms"] / bf16["median_ms"])
  # Same params and batch in bf16 compute: the first loss agrees to bf16 precision, not exactly.
  assert abs(bf16["losses"][0] - f32["losses"][0]) < 2e-2
  assert bf16["losses"][-1] < bf16["losses"][0] - 0.1, bf16["losses"]
  assert "variant_ratio =" in step_time.format_table(res)


def test_with_overrides_casts_and_names_bad_keys():
  config = bench_step.get_config("tiny")
  out = step_time.with_overrides(config, {"model.dtype": "bfloat16", "data.seq_len": "64",
                                          "model.tie_embeddings": "true"})
  assert (out.model.dtype, out.data.seq_len, out.model.tie_embeddings) == ("bfloat16", 64, True)
  assert config.model.dtype == "float32"   # the original is untouched
  with pytest.raises(ValueError, match="model.nope"):
    step_time.with_overrides(config, {"model.nope": "1"})


@pytest.mark.slow
def test_both_steps_train_from_the_same_start(report):
  _, res = report
  ref, proj = res["reference"]["losses"], res["project"]["losses"]
  assert len(ref) == len(proj) == 5
  # Step 1 reports the loss before any update: same params, same batch -> same loss.
  chex.assert_trees_all_close(ref[0], proj[0], atol=1e-5, rtol=0)
  assert ref[-1] < ref[0] - 0.1, ref
  assert proj[-1] < proj[0] - 0.1, proj


@pytest.mark.slow
def test_report_flops_follow_the_formula(report):
  config, res = report
  m, t = config.model, config.data.seq_len
  matmul_params = (m.num_layers * (m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
                                   + 3 * m.d_model * m.mlp_dim)
                   + m.d_model * config.data.vocab_size)
  per_token = 6 * matmul_params + 12 * m.num_layers * t * m.num_heads * m.head_dim
  assert res["flops_per_step"] == per_token * config.data.batch_size * t
  assert res["project"]["params"] == res["reference"]["params"]


def test_hlo_op_counts_skip_fusion_bodies():
  hlo = """HloModule m

%fused_computation (p: f32[4,8]) -> f32[8,4] {
  %p = f32[4,8]{1,0} parameter(0)
  ROOT %t = f32[8,4]{1,0} transpose(%p), dimensions={1,0}
}

ENTRY %main (x: f32[4,8]) -> f32[8,4] {
  %x = f32[4,8]{1,0} parameter(0)
  %copy.1 = f32[4,8]{0,1} copy(%x)
  %transpose.2 = f32[8,4]{1,0} transpose(%copy.1), dimensions={1,0}
  ROOT %f = f32[8,4]{1,0} fusion(%transpose.2), kind=kLoop, calls=%fused_computation
}
"""
  assert step_time.hlo_op_counts(hlo) == {"copy": 1, "transpose": 1, "fusion": 1}


@pytest.mark.slow
def test_report_counts_the_compiled_steps_copies(report):
  _, res = report
  for name in res["runners"]:
    ops = res[name]["hlo_ops"]
    assert ops["fusion"] > 0 and ops["copy"] >= 0, (name, ops)
