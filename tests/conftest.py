"""Test setup: 8 fake CPU devices (set before jax is imported), the repo on sys.path, and the
fixtures several test modules share (plain helpers: helpers.py).

Data fixtures are module-scoped: every module that uses them gets its own folder.
"""
import os
import sys


def _xla_knows(flag: str) -> bool:
  """Whether the installed jaxlib's XLA defines `flag`: an unknown flag in XLA_FLAGS aborts
  every process, and XLA adds and retires its CPU flags from release to release."""
  import glob
  import importlib.util
  import mmap
  spec = importlib.util.find_spec("jaxlib")
  for path in glob.glob(os.path.join(os.path.dirname(spec.origin), "*.so")) if spec else ():
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as lib:
      if lib.find(flag.encode()) >= 0:
        return True
  return False


# The suite's tiny programs are compile-bound and the tests check the math, not codegen speed,
# so XLA:CPU compiles them cheaply (docs/results/tests.md): LLVM without optimisation passes
# (a 30-step tiny run: 10.5 s of CPU against 17 s with them, identical losses) and loop fusions
# through the classic LLVM emitters instead of the MLIR fusion emitters (a tiny train step
# compiles 2-3x faster). Children get the same flags (helpers.xla_flags).
_FUSION_FLAG = "--xla_cpu_use_fusion_emitters=false"
if (_FUSION_FLAG not in os.environ.get("XLA_FLAGS", "")     # xdist workers inherit it
    and not _xla_knows("xla_cpu_use_fusion_emitters")):
  _FUSION_FLAG = ""
os.environ["XLA_FLAGS"] = " ".join(" ".join((os.environ.get("XLA_FLAGS", ""),
                                             "--xla_backend_optimization_level=0", _FUSION_FLAG,
                                             "--xla_force_host_platform_device_count=8")).split())
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the test session, inherited by every `python -m train.main`
# the tests start: the suite compiles the same tiny programs again and again (each resume,
# drill and evaluator run), and a cache hit skips XLA's compile, which dominates a tiny run
# (docs/results/tests.md). Per test session, so no stale entry outlives it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax_test_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gzip  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers import _review, write_corpus  # noqa: E402


@pytest.fixture(scope="module")
def one_device():
  """Meshes built from a config (`model.sharding.make_mesh` without devices) use only the first
  of the 8 fake devices while the module runs. For the modules that train tiny models in-process
  to test fine-tuning, decoding or serving, an 8-way split is pure overhead on a few cores;
  sharded training is what test_sharding, test_harness and the launch tests cover.
  Use as `pytestmark = pytest.mark.usefixtures("one_device")` (it precedes the module's fixtures).
  """
  import jax
  from model import sharding as sharding_lib
  make_mesh = sharding_lib.make_mesh

  def first_device_mesh(mesh_cfg, devices=None):
    return make_mesh(mesh_cfg, jax.devices()[:1] if devices is None else devices)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sharding_lib, "make_mesh", first_device_mesh)
    yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A folder of small deterministic pseudo-legal documents (.txt and .jsonl)."""
  return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """An empty dataset cache folder (tokenizer, packed arrays) for runs on `corpus`."""
  return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def sentiment_files(tmp_path_factory):
  """train.jsonl.gz (240) and test.jsonl (64) of generated reviews a tiny model separates."""
  root = tmp_path_factory.mktemp("sentiment")
  rng = np.random.default_rng(0)
  for name, n in (("train.jsonl.gz", 240), ("test.jsonl", 64)):
    opener = gzip.open if name.endswith(".gz") else open
    with opener(root / name, "wt", encoding="utf-8") as f:
      for i in range(n):
        label = i % 2
        f.write(json.dumps({"id": f"{name}:{i}", "text": _review(rng, label), "label": label,
                            "source": "a" if i % 3 else "b"}) + "\n")
  return root
