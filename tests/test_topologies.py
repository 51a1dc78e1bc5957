"""TPU slices by name, the fits / does-not-fit arithmetic, collective counting, the one-line
error without libtpu, and (where libtpu is installed) a real compile for the smallest slice."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from train import topologies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30


@pytest.mark.parametrize("name,topology,chips,accel", [
    ("v5p-128", "v5p:4x4x4", 64, "v5p-128"),
    ("v5e-256", "v5e:16x16", 256, "v5litepod-256"),
    ("v6e-256", "v6e:16x16", 256, "v6e-256"),
    ("v4-8", "v4:2x2x1", 4, "v4-8"),
    ("v5e-8", "v5e:2x4", 8, "v5litepod-8"),
    ("v5litepod-16", "v5e:4x4", 16, "v5litepod-16"),
    ("V5P-8", "v5p:2x2x1", 4, "v5p-8"),
    ("v5e:16x16", "v5e:16x16", 256, "v5litepod-256"),
    ("v5p:2x2x2", "v5p:2x2x2", 8, "v5p-16"),
])
def test_parse(name, topology, chips, accel):
  s = topologies.parse(name)
  assert (s.topology, s.num_chips, s.accelerator_type) == (topology, chips, accel)


@pytest.mark.parametrize("name,words", [
    ("v5p-7", "even"), ("v5e-3", "known sizes"), ("v9-8", "unknown TPU generation"),
    ("tpu", "expected"), ("v5e:2x2x2", "2 dimensions")])
def test_parse_errors_are_one_line(name, words):
  with pytest.raises(topologies.TopologyError) as e:
    topologies.parse(name)
  assert words in str(e.value) and "\n" not in str(e.value)


def test_chip_table_and_capacity():
  assert topologies.CHIPS["v5p"].hbm_bytes == 95 * GiB
  assert topologies.CHIPS["v5e"].hbm_bytes == 16 * GiB
  assert topologies.CHIPS["v6e"].peak_bf16_flops == 918e12
  v4 = topologies.parse("v4-8")
  assert topologies.hbm_per_device(v4, 4) == 32 * GiB
  assert topologies.hbm_per_device(v4, 8) == 16 * GiB   # both cores listed: half a chip each


def test_fit_line():
  assert topologies.fit_line(12 * GiB, 16 * GiB).startswith("fits: 12.00 of 16.00 GiB")
  assert "4.00 GiB free" in topologies.fit_line(12 * GiB, 16 * GiB)
  line = topologies.fit_line(int(20.5 * GiB), 16 * GiB)
  assert line.startswith("does not fit by 4.50 GiB") and "20.50 GiB needed" in line
  assert topologies.fit_line(16 * GiB, 16 * GiB).startswith("fits")


def test_count_collectives_text():
  hlo = """
  %all-gather-start.1 = (f32[4], f32[32]) all-gather-start(f32[4] %p), dimensions={0}
  %all-gather-done.1 = f32[32] all-gather-done(%all-gather-start.1)
  %ar = f32[8] all-reduce(f32[8] %x), to_apply=%add
  %rs.2 = f32[1] reduce-scatter(f32[8] %y), dimensions={0}
  %cp = f32[8] collective-permute-start(f32[8] %z), source_target_pairs={{0,1}}
  %fusion = f32[8] fusion(%all-reduce.3), calls=%fused_all-reduce
  """
  assert topologies.count_collectives(hlo) == {
      "all-gather": 1, "reduce-scatter": 1, "all-reduce": 1, "all-to-all": 0,
      "collective-permute": 1}


def test_count_collectives_of_a_compiled_8_device_program():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("x",))
  f = jax.jit(lambda a, b: (a @ b).sum(0),
              in_shardings=(NamedSharding(mesh, P("x")), NamedSharding(mesh, P(None, "x"))),
              out_shardings=NamedSharding(mesh, P()))
  compiled = f.lower(jax.ShapeDtypeStruct((64, 64), jnp.float32),
                     jax.ShapeDtypeStruct((64, 64), jnp.float32)).compile()
  counts = topologies.count_collectives(compiled.as_text())
  assert sum(counts.values()) >= 1
  assert counts["all-reduce"] + counts["all-gather"] + counts["reduce-scatter"] >= 1


def _train_main(*args, env_extra=None, timeout=600):
  env = dict(os.environ, **(env_extra or {}))
  return subprocess.run([sys.executable, "-m", "train.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_no_libtpu_is_one_clear_line(tmp_path):
  # A libtpu module that fails to import stands in for "not installed", whatever is installed.
  (tmp_path / "libtpu.py").write_text("raise ImportError('no libtpu here')\n")
  res = _train_main("--config=configs/legal_pretrain.py:tiny", "--aot_only",
                    "--aot_topology=v5e-8",
                    env_extra={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}, timeout=300)
  assert res.returncode == 2, res.stderr[-2000:]
  lines = [line for line in res.stderr.splitlines() if line.strip()]
  assert lines[-1] == ("error: --aot_topology=v5e-8 needs the TPU compiler (libtpu), which is "
                       "not installed: pip install -r requirements-tpu.txt"), res.stderr[-2000:]


def test_bad_topology_name_is_one_clear_line():
  res = _train_main("--config=configs/legal_pretrain.py:tiny", "--aot_only",
                    "--aot_topology=v5p-7", timeout=300)
  assert res.returncode == 2
  assert res.stderr.strip().splitlines()[-1].startswith("error: --aot_topology='v5p-7'")


def test_llama3_8b_preset_shape():
  from configs import legal_pretrain
  c = legal_pretrain.get_config("llama3_8b")
  m = c.model
  assert (m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim) == \
      (32, 4096, 32, 8, 128, 14336)
  assert (c.data.vocab_size, m.tie_embeddings, m.mlp_activation) == (128256, False, "swiglu")
  from model.config import ModelConfig
  d, v, f, L = 4096, 128256, 14336, 32
  attn = d * 128 * (32 + 8 + 8) + 32 * 128 * d
  expected = 2 * v * d + L * (attn + 3 * d * f + 2 * d) + d
  assert abs(expected - 8.03e9) / 8.03e9 < 0.01
  assert ModelConfig.from_config(m, c.data.vocab_size).mlp_dim == 14336


@pytest.mark.skipif(not topologies.have_libtpu(),
                    reason="libtpu is not installed (pip install -r requirements-tpu.txt): the "
                           "TPU compiler is optional, see requirements-tpu.txt")
def test_compile_tiny_for_v5e_8(tmp_path):
  out = tmp_path / "step.hlo"
  res = _train_main("--config=configs/legal_pretrain.py:tiny", "--aot_only",
                    "--aot_topology=v5e-8", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
                    "--config.model.num_layers=1", f"--aot_save={out}")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "8 TPU v5 lite devices" in res.stdout and "fits: " in res.stdout, res.stdout
  assert "collectives in the compiled step" in res.stdout
  assert "all-gather" in out.read_text()
  assert "collectives run per step (loops multiplied out)" in res.stdout, res.stdout
  assert "predicted step: " in res.stdout and "MFU bound" in res.stdout, res.stdout


def test_compiler_refusal_is_a_does_not_fit_row():
  from train import aot
  message = ("jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the "
             "total memory required for HLO temporaries (17.33G) exceeds available HBM (15.75G).")
  assert aot._hbm_shortfall(message) == int(17.33 * 2**30)
  assert aot._hbm_shortfall("INTERNAL: something else") is None


def test_tpu_table_extrapolates_depth_linearly():
  from bench import tpu_table
  gib = 2**30
  hbm = 16 * gib
  point = dict(preset="base", topology="v5e-8", remat="dots", sharding="fsdp", mesh={"fsdp": 8},
               hbm_per_device_bytes=hbm)
  one = dict(point, num_layers=1, fits=True, argument_size_in_bytes=1 * gib,
             temp_size_in_bytes=2 * gib, total_bytes=3 * gib, compile_s=10)
  two = dict(point, num_layers=2, fits=True, argument_size_in_bytes=int(1.5 * gib),
             temp_size_in_bytes=3 * gib, total_bytes=int(4.5 * gib), compile_s=20)
  mem = tpu_table.extrapolate(one, two, depth=24)     # + 1.5 GiB per layer
  assert mem["total_bytes"] == 3 * gib + 23 * int(1.5 * gib) and not mem["fits"]
  assert tpu_table.extrapolate(one, two, depth=6)["fits"]      # 10.5 GiB of 16
  # A point the compiler refused (only its temporaries are known) never fits.
  refused = dict(point, num_layers=2, fits=False, temp_size_in_bytes=20 * gib, compile_s=5)
  assert not tpu_table.extrapolate(one, refused, depth=2)["fits"]
  rows = tpu_table.table([one, two], [1, 2]).splitlines()
  assert len(rows) == 3 and "| base | v5e-8 | dots | fsdp | fsdp8 | 1,2 -> 24 |" in rows[2]
  assert "37.50 | 16 | no, by 21.5+ GiB | 30 |" in rows[2]
  # A full-depth (scanned) compile is reported as measured, not extrapolated.
  full = dict(point, num_layers=None, scan=True, fits=True, argument_size_in_bytes=gib,
              temp_size_in_bytes=4 * gib, total_bytes=5 * gib, compile_s=40)
  row = tpu_table.table([full], []).splitlines()[2]
  assert "| fsdp8 | 24 (scanned) | 1.00 | 4.00 | 5.00 | 16 | yes | 40 |" in row, row


@pytest.mark.parametrize("name,slices,chips,topology,accel", [
    ("2xv5p-128", 2, 128, "v5p:4x4x4", "v5p-128"),
    ("4xv6e-256", 4, 1024, "v6e:16x16", "v6e-256"),
    ("1xv5e-8", 1, 8, "v5e:2x4", "v5litepod-8"),
])
def test_parse_multi_slice(name, slices, chips, topology, accel):
  s = topologies.parse(name)
  assert (s.num_slices, s.num_chips, s.topology, s.accelerator_type) == (
      slices, chips, topology, accel)


def test_hybrid_mesh_on_fake_devices_keeps_slices_contiguous():
  # 8 CPU devices as 2 "slices" of 4: data spans the slices over DCN, fsdp 4 within each.
  from model import sharding
  cfg = dict(data=1, fsdp=-1, tensor=1, dcn_data=2, dcn_fsdp=1)
  assert sharding.mesh_shape(cfg, 8) == (2, 4, 1, 1)   # data, fsdp, context, tensor
  mesh = sharding.make_mesh(cfg, jax.devices()[:8])
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  assert ids[:, :, 0, 0].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
  # fsdp over 2 slices x 2 per slice, data 2 within: each slice's 4 devices stay together.
  cfg = dict(data=2, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=2)
  ids = np.vectorize(lambda d: d.id)(sharding.make_mesh(cfg, jax.devices()[:8]).devices)
  assert ids[:, :, 0, 0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_dcn_config_errors_name_the_keys():
  from model import sharding
  with pytest.raises(ValueError, match="config.mesh.dcn_fsdp=0"):
    sharding.mesh_shape(dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=0), 8)
  with pytest.raises(ValueError, match="dcn_. multiply to 3 slices"):
    sharding.mesh_shape(dict(data=1, fsdp=-1, tensor=1, dcn_data=3), 8)


def test_tpu_table_prediction_columns():
  from bench import tpu_table
  gib = 2**30
  row = dict(preset="llama3_8b", topology="v6e-256", remat="full", sharding="fsdp",
             mesh={"fsdp": 256}, num_layers=None, scan=True, fits=True, seq_len=8192,
             batch_size=768, argument_size_in_bytes=gib, temp_size_in_bytes=gib,
             total_bytes=2 * gib, hbm_per_device_bytes=32 * gib, compile_s=100,
             tokens_per_step=768 * 8192, devices=256, chips=256, predicted_step_s=2.0,
             predicted_step_no_overlap_s=3.0, bound="compute", mfu_bound=0.75)
  line = tpu_table.table([row], []).splitlines()[2]
  assert line.startswith("| llama3_8b (seq 8192, batch 768) | v6e-256 | full | fsdp |"), line
  assert line.endswith("| 100 | 2000 / 3000 | compute | 12,288 | 75% |"), line
