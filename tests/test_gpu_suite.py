"""bench/gpu_suite.py on the CPU with tiny shapes: every section's rows, the equality check
failing for a wrong kernel, and the clean skip where no GPU exists."""
import os
import subprocess
import sys

import jax
import pytest

from bench import gpu_suite, gpu_table
from model import attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cases(table, section):
  return [row for row in table.rows if row[0] == section]


def test_attention_rows_equal_and_a_wrong_kernel_fails():
  cpu = jax.devices("cpu")[0]
  table = gpu_table.Table()
  assert gpu_suite.attention_section(table, gpu_suite.TINY, cpu)
  rows = _cases(table, "attention")
  assert len(rows) == 4   # full / local x unpacked / packed, implementation auto on CPU
  assert all(r[5].startswith("equal: fwd err") for r in rows), rows
  assert any("packed" in r[1] and "unpacked" not in r[1] for r in rows)

  full = attention.get_kernel("full")
  def off_by_two_percent(q, k, v, **kw):
    return (full(q, k, v, **kw) * 1.05).astype(q.dtype)
  def grads_wrong(q, k, v, **kw):   # same forward, gradient scaled
    out = full(q, k, v, **kw)
    return out + (0.2 * out - jax.lax.stop_gradient(0.2 * out))
  bad = gpu_table.Table()
  assert not gpu_suite.attention_section(
      bad, gpu_suite.TINY, cpu, kernels={"full": off_by_two_percent, "local": grads_wrong})
  results = [r[5] for r in bad.rows]
  assert all(r.startswith("FAIL") for r in results), results
  fwd, grad = gpu_suite.attention_check(grads_wrong, "local", False, "auto", gpu_suite.TINY, cpu)
  assert fwd <= gpu_suite.FWD_TOL < gpu_suite.GRAD_TOL < grad


@pytest.mark.slow
def test_tiny_suite_on_cpu_writes_one_table(tmp_path):
  out = tmp_path / "suite.md"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--platform=cpu", "--tiny",
                        "--sections=train,blocked,inference", "--budget_s=1e9", f"--out={out}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
  assert res.returncode == 0, res.stderr[-3000:]
  text = out.read_text()
  assert text in res.stdout
  lines = text.splitlines()
  assert lines[2] == "| section | case | ms | throughput | memory MiB | result |"
  body = [line for line in lines[4:] if line.startswith("| ")]
  assert all(line.count(" | ") == 5 for line in body), body
  # every row also went to stderr as it was measured (kept when an outer timeout kills the run)
  echoed = [line for line in res.stderr.splitlines() if line.startswith("| ")]
  assert echoed == body, (echoed, body)
  def rows(section):
    return [line for line in body if line.startswith(f"| {section} |")]
  train = rows("train")
  assert len(train) == 1 and "MFU" in train[0] and "tokens/s" in train[0], train
  blocked = rows("blocked")
  assert any("blocked (online softmax" in r and "seq 32" in r for r in blocked)
  assert any("full (XLA) fwd+bwd" in r for r in blocked)
  assert blocked[-1].endswith("| 64 |"), blocked   # the longest of (32, 64) that trains
  inference = rows("inference")
  for mode in ("f32", "bf16", "int8_weight_only"):
    for batch in (1, 32):
      assert any(f"{mode} forward, batch {batch}, cpu" in r and "examples/s" in r
                 for r in inference), (mode, batch, inference)
  assert sum("KV-cache greedy decode" in r and "new tokens/s" in r for r in inference) == 4
  assert "skipped" not in text and "failed" not in text and "Error" not in text, text


def test_no_gpu_is_a_clean_skip():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-m", "bench.gpu_suite"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stdout.strip().startswith("gpu_suite: no GPU device here")
  assert len(res.stdout.strip().splitlines()) == 1


def test_the_anchor_comparison_passes_and_fails_on_real_numbers():
  anchor_tokens = 8 * 2048 / gpu_suite.ANCHOR["ms"] * 1e3
  def verdict(mfu, tokens_per_s, kind):
    table = gpu_table.Table()
    gpu_suite.anchor_rows(table, {"mfu": mfu, "tokens_per_s": tokens_per_s}, kind)
    assert "57.5%" in table.rows[0][5] and table.rows[0][2] == "261.50"
    return table.rows[1][5]
  assert verdict(0.60, anchor_tokens * 1.05, "NVIDIA H100 80GB HBM3") == (
      "MFU 60.0% vs 57.5% (ok); tokens/s 1.050x (ok)")
  assert "BELOW" in verdict(0.50, anchor_tokens * 0.9, "NVIDIA H100 80GB HBM3")
  assert "(SLOWER)" in verdict(0.58, anchor_tokens * 0.99, "NVIDIA H100 80GB HBM3")
  assert "not comparable: NVIDIA H200" in verdict(0.6, anchor_tokens * 1.2, "NVIDIA H200")


def test_anchor_preset_has_the_anchors_shape():
  from configs import bench_step
  from model.config import ModelConfig
  from train import build
  config = bench_step.get_config("anchor")
  assert (config.data.batch_size, config.data.seq_len, config.model.dtype) == (8, 2048,
                                                                              "bfloat16")
  parts = build.build(config, model_cfg=ModelConfig.from_config(config.model, 50304))
  assert 1.40e9 < parts.param_count() < 1.42e9   # "1.4B": GELU MLP, untied head
