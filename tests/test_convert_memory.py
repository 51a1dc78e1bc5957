"""train.hf.convert import's host memory (bench/import_memory.py, measured in a fresh subprocess)
and the per-parameter checksums it computes on the host instead of over the whole placed tree.
Needs no transformers: the checkpoint is written with safetensors directly."""
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bench import import_memory
from infer import loading
from model import checkpoint as checkpoint_lib
from model.transformer import Transformer


def test_host_checksum_equals_the_device_checksum():
  rng = np.random.default_rng(0)
  for x in (rng.standard_normal((3, 5), np.float32), rng.standard_normal(5003, np.float32),
            rng.standard_normal((7, 9)) > 0, rng.integers(0, 100, 17).astype(np.int32),
            np.asarray(jnp.asarray(rng.standard_normal((4, 33)), jnp.bfloat16))):
    want = int(jax.jit(checkpoint_lib._leaf_checksum)(jnp.asarray(x)))
    assert checkpoint_lib.host_checksum(x, chunk=1000) == want


def test_import_peak_memory_is_near_the_checkpoint(tmp_path):
  """An 87 MB float32 Llama-shaped checkpoint: the import's peak RSS above the ready interpreter
  is at most 1.2x the checkpoint, with 32 MB of slack for fixed costs and noise (measured
  98 MB, 1.12x, on a 2-core AVX2 CPU; an import without row blocks read into buffers XLA
  adopts, host checksums and a bounded Orbax write: 277 MB, 3.2x; docs/results/hf_import.md)."""
  hf_dir = str(tmp_path / "hf")
  import_memory.write_checkpoint(hf_dir, import_memory.llama_config(384, 6, 16000))
  row = import_memory.measure(hf_dir, str(tmp_path / "run"))
  print(row)
  assert 80 < row["checkpoint_mb"] < 95
  assert row["added_mb"] <= 1.2 * row["checkpoint_mb"] + 32, row
  # The run restores, and its parameters pass the checksums recorded at import.
  run = loading.open_run(str(tmp_path / "run"))
  state = {"params": loading.restore_params(run, Transformer(run.model_config()))}
  recorded = run.checkpointer.manager.restore(run.step, args=ocp.args.Composite(
      integrity=ocp.args.JsonRestore())).integrity
  assert recorded["checksums"] == checkpoint_lib.state_checksums(state)
