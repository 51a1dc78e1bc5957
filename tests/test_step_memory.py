"""bench/step_memory.py: the saved-residual reading of a train step, and what the bf16 layers
keep (their inputs only) against float32 autodiff."""
from bench import step_memory
from configs import bench_step


def _config(dtype: str, activation: str = "swiglu"):
  config = bench_step.get_config("tiny")
  config.model.update(dtype=dtype, mlp_activation=activation)
  return config


def _activation(residual) -> bool:
  return "(<lambda>)" in residual[2] or "(Mlp.__call__)" in residual[2]


def test_bf16_step_keeps_no_mlp_or_norm_internals():
  for activation in ("swiglu", "gelu"):
    bf16 = step_memory.saved_residuals(_config("bfloat16", activation))
    f32 = step_memory.saved_residuals(_config("float32", activation))
    # the activation's arrays and the norms' float32 intermediates are recomputed, not kept
    internals = [r for r in bf16 if "layers.py" in r[2] and
                 (_activation(r) or r[1].startswith("float32"))]
    assert internals == [], internals
    assert any(_activation(r) for r in f32)   # float32 keeps what autodiff keeps
    assert any("_rms_norm" in r[2] and r[1].startswith("float32") for r in f32)
    mlp_dim, layers = 128, 2
    wide = [r for r in bf16 if r[1].endswith(f", {mlp_dim}]")]
    per_layer = 2 if activation == "swiglu" else 1     # gate and up, or up
    assert len(wide) == per_layer * layers, wide
    # bf16 halves every kept array's bytes at least: the total falls by more than half
    assert sum(r[0] for r in bf16) < 0.5 * sum(r[0] for r in f32)


def test_report_sums_the_residuals_by_source():
  config = _config("bfloat16")
  residuals = step_memory.saved_residuals(config)
  rows = step_memory.by_source(residuals)
  assert sum(r[0] for r in rows) == sum(r[0] for r in residuals)
  assert sum(r[1] for r in rows) == len(residuals)
  assert [r[0] for r in rows] == sorted((r[0] for r in rows), reverse=True)
  text = step_memory.report(config, top=3)
  total = sum(r[0] for r in residuals) / step_memory.GiB
  assert f"saved for the backward pass: {total:.2f} GiB in {len(residuals)} arrays" in text
  assert text.count("\n| ") == 2 + 3 + 1   # header, 3 rows, the rest
