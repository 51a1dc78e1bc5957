"""The platform the attention kernels are chosen for (full.choose, local's cuDNN path): this
process's backend, or the one an ahead-of-time compile targets - a TPU slice compiled on a CPU
host must get the kernels a TPU process would run, not the CPU's (flash.py)."""
import contextlib

import jax

_target = None


def name() -> str:
  """"cpu", "gpu", "tpu": the compile target if one is set, else jax.default_backend()."""
  return _target or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str):
  """Kernels traced inside are chosen for `platform` (train/aot.py, --aot_topology)."""
  global _target
  previous, _target = _target, platform
  try:
    yield
  finally:
    _target = previous
