"""bench/latency.py on tiny models: sane statistics, exact sizes, checkpoint restore and both CLIs
(bench.latency and bench.step_time --mode=inference). Well under a minute on 2 CPU cores."""
import json
import os
import subprocess
import sys
from unittest import mock

from absl import app
from absl import flags as absl_flags
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bench_step
from bench import latency
from model.config import ModelConfig
from model.transformer import Transformer
from model import checkpoint as checkpoint_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(seq_len=16):
  """bench_step's tiny preset (GQA, untied head, swiglu) and its model."""
  config = bench_step.get_config("tiny")
  config.data.seq_len = seq_len
  return config, Transformer(ModelConfig.from_config(config.model, config.data.vocab_size))




def _run_module(*args):
  proc = subprocess.run([sys.executable, "-m", *args], cwd=_ROOT, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope="module")
def params():
  _, model = _tiny()
  return nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))[
      "params"])


@pytest.fixture(scope="module")
def measured(params):
  config, model = _tiny()
  rng = np.random.default_rng(0)
  args = lambda b: (params, rng.integers(0, config.data.vocab_size, (b, 16), np.int32))
  return latency.measure(latency.forward_fn(model, "lm"), args, batch_sizes=(1, 4), warmup=1,
                         iters=12, seq_len=16)


def test_percentiles_are_ordered_and_throughput_is_batch_over_latency(measured):
  assert list(measured) == [1, 4]
  for batch, s in measured.items():
    assert s["iters"] == 12
    assert 0 < s["min_ms"] <= s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert s["min_ms"] <= s["mean_ms"] <= s["max_ms"]
    assert s["examples_per_s"] == pytest.approx(batch / (s["mean_ms"] / 1e3))
    assert s["tokens_per_s"] == pytest.approx(16 * s["examples_per_s"])
    assert s["compile_s"] > 0


def test_memory_numbers(measured, params):
  config, _ = _tiny()
  param_bytes = latency.model_size(params)["bytes"]
  for batch, s in measured.items():
    x = s["xla_bytes"]
    # Arguments are the params plus the int32 tokens; the output is the float32 logits.
    assert x["argument"] == param_bytes + 4 * batch * 16
    assert x["output"] == 4 * batch * 16 * config.data.vocab_size
    assert x["total"] == x["argument"] + x["output"] + x["temp"] > 0
    assert s["rss_peak_bytes"] > 0 and s["rss_peak_delta_bytes"] >= 0
    assert not s["rss_peak_over_whole_process_life"]   # Linux lets a process reset its VmHWM
    assert s["device_peak_bytes"] is None              # CPU: no device allocator stats
  json.dumps(measured)


def test_rss_delta_sees_a_64_mib_output():
  """On CPU the output lives in host memory (a fresh mmap at this size), so the peak RSS rises
  by about its size - less only by the kernel counters' slack."""
  big = latency.measure(lambda x: jnp.broadcast_to(x, (4096, 4096)) + 1.0,
                        lambda b: (jnp.ones((b, 4096)),), batch_sizes=(1,), warmup=0, iters=1)
  assert big[1]["xla_bytes"]["output"] == 64 * 2 ** 20
  assert big[1]["rss_peak_delta_bytes"] >= 48 * 2 ** 20, big


def test_model_size_matches_a_hand_count(params, tmp_path):
  config, _ = _tiny()
  m, v = config.model, config.data.vocab_size
  per_layer = (2 * m.d_model                                            # two RMSNorm scales
               + m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)   # q, k, v, out
               + 3 * m.d_model * m.mlp_dim)                             # swiglu wi, wg, wo
  expected = v * m.d_model + m.num_layers * per_layer + m.d_model + m.d_model * v   # untied head
  size = latency.model_size(params)
  assert size["params"] == expected == 139_584
  assert size["bytes"] == 4 * expected
  assert size["by_dtype"] == {"float32": {"params": expected, "bytes": 4 * expected}}
  # ShapeDtypeStructs count alike (nothing allocated); dtypes are kept apart; files are summed.
  (tmp_path / "sub").mkdir()
  (tmp_path / "a").write_bytes(b"x" * 10)
  (tmp_path / "sub" / "b").write_bytes(b"x" * 5)
  mixed = {"w": jax.ShapeDtypeStruct((3, 4), jnp.bfloat16), "b": jnp.zeros(5, jnp.int8)}
  assert latency.model_size(mixed, tmp_path) == {
      "params": 17, "bytes": 29, "disk_bytes": 15,
      "by_dtype": {"bfloat16": {"params": 12, "bytes": 24}, "int8": {"params": 5, "bytes": 5}}}


def test_restores_checkpoint_params_and_measures_them(params, tmp_path):
  config, model = _tiny(seq_len=8)
  params = jax.tree.map(lambda x: x + 1.0, params)   # not what a fresh init would give
  saver = checkpoint_lib.Checkpointer(str(tmp_path), every=1, keep=1, async_save=False)
  saver.save(7, {"params": params, "step": jnp.int32(7)}, None, {"config": config.to_dict()},
             force=True)
  saver.close()
  restored, step_dir = latency.restore_params(str(tmp_path), model, jax.devices()[0])
  chex.assert_trees_all_equal(restored, params)
  assert os.path.basename(step_dir) == "7"
  report = latency.benchmark_config(config, batch_sizes=(2,), warmup=0, iters=2,
                                    checkpoint=str(tmp_path))
  assert report["size"]["disk_bytes"] > 0   # Orbax compresses: may be below "bytes"
  assert report["checkpoint"] == step_dir and report["results"][2]["iters"] == 2
  assert "on disk" in latency.format_table([report])
  with pytest.raises(ValueError, match="no such directory"):
    latency.restore_params(str(tmp_path / "nowhere"), model, jax.devices()[0])


def _models_from(*args):
  """latency.configs_from_flags on args, parsed by the CLI's own flags (a private FlagValues;
  config_flags reads the --config.KEY overrides from sys.argv)."""
  argv = ["bench.latency", *args]
  flag_values = absl_flags.FlagValues()
  latency._define_flags(flag_values)
  with mock.patch.object(sys, "argv", argv):
    flag_values(argv)
  return latency.configs_from_flags(flag_values)


def test_config_flag_overrides_apply_to_every_config_and_keep_the_preset_size():
  base, tiny = (os.path.join(_ROOT, "configs/legal_pretrain.py") + p for p in (":base", ":tiny"))
  first, second = _models_from(f"--config={base}", f"--compare={tiny}",
                               "--config.data.seq_len=64", "--config.model.num_layers=2",
                               "--config.model.dtype=float32")
  assert (first["spec"], second["spec"]) == (base, tiny)
  assert (first["label"], second["label"]) == ("legal_pretrain:base", "legal_pretrain:tiny")
  for m in (first, second):
    assert m["overrides"] == ["data.seq_len=64", "model.num_layers=2", "model.dtype=float32"]
    assert (m["config"].data.seq_len, m["config"].model.num_layers,
            m["config"].model.dtype) == (64, 2, "float32")
  assert first["config"].model.d_model == 2048 and second["config"].model.d_model < 2048
  assert first["preset_params"] > 1.5e9   # the 24-layer preset, counted abstractly
  assert second["preset_params"] < 1e7
  with pytest.raises(absl_flags.IllegalFlagValueError):   # config_flags checks the type
    _models_from(f"--config={tiny}", "--config.model.num_layers=two")
  with pytest.raises(AttributeError, match="Did you mean \"num_layers\""):   # and the key
    _models_from(f"--config={tiny}", "--config.model.num_layer=2")
  with pytest.raises(app.UsageError, match="nowhere.py"):
    _models_from(f"--config={tiny}", "--compare=configs/nowhere.py:tiny")


@pytest.mark.slow
def test_cli_compares_two_configs_and_writes_json(tmp_path):
  out = tmp_path / "latency.json"
  stdout = _run_module(
      "bench.latency", "--config=configs/bench_step.py:tiny",
      "--compare=configs/legal_pretrain.py:tiny", "--config.data.seq_len=16",
      "--batch_sizes=2", "--iters=3", "--warmup=1", "--config.model.num_layers=1",
      "--config.model.d_model=64", "--task=classify", f"--out={out}")
  reports = json.loads(out.read_text())
  assert [r["label"] for r in reports] == ["bench_step:tiny", "legal_pretrain:tiny"]
  for r in reports:
    assert r["overrides"] == ["data.seq_len=16", "model.num_layers=1", "model.d_model=64"]
  assert [r["model"]["d_model"] for r in reports] == [64, 64]
  for r in reports:   # the table keeps the preset's own size next to what was measured
    assert r["model"]["num_layers"] == 1 and r["preset_params"] > r["size"]["params"]
  for r in reports:
    assert r["task"] == "classify" and r["seq_len"] == 16 and list(r["results"]) == ["2"]
    # classify returns the pooled [B, d_model] float32 states, not logits
    assert r["results"]["2"]["xla_bytes"]["output"] == 4 * 2 * r["model"]["d_model"]
  assert "legal_pretrain:tiny" in stdout and "p99 ms" in stdout


@pytest.mark.slow
def test_step_time_inference_mode(tmp_path):
  out = tmp_path / "r.json"
  stdout = _run_module("bench.step_time", "--config=configs/bench_step.py:tiny", "--mode=inference",
                       "--batch_sizes=3", "--iters=2", "--warmup=0", f"--json_out={out}")
  res = json.loads(out.read_text())
  assert res["seq_len"] == 32 and list(res["results"]) == ["3"]
  assert res["size"]["params"] == 139_584 and "p50 ms" in stdout
