"""Quiet library logs for the command-line entry points (train/, infer/, bench/ main()s).

By default a run shows its own progress lines and the warnings and errors of every library, but
not the INFO chatter of Orbax, grain, JAX, TFDS and absl, nor TFDS's progress bars and the
"Downloading and preparing dataset ..." banners it prints to stdout. absl's `--verbosity=1` (or
higher) keeps everything, as the libraries print it.

  from model import log_setup
  def main(argv):
    log_setup.quiet_libraries()
"""
import importlib.abc
import importlib.util
import os
import sys

from absl import logging

# Library source paths whose INFO records are dropped (records carry the emitting file's path;
# jax logs "Unable to initialize backend 'tpu'" and its compile-cache lines at INFO).
NOISY = ("/orbax/", "/grain/", "/jax/_src/", "/jaxlib/", "/tensorflow_datasets/", "/absl/",
         "/etils/")
# Library WARNINGs that describe the normal case here, not a problem (message prefixes).
BENIGN_WARNINGS = (
    "Using custom data configuration",      # tfds: every corpus is a custom builder config
)
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class QuietLibraries:
  """A logging filter: drops the INFO records of the NOISY libraries and their BENIGN_WARNINGS."""

  def filter(self, record):
    path = record.pathname
    if (path.startswith(_REPO) and "site-packages" not in path) or not any(
        part in path for part in NOISY):
      return True   # this project's own lines (wherever the checkout lives) and other code
    if record.levelno >= 40:   # Python's ERROR
      return True
    if record.levelno >= 30:   # WARNING
      return not str(record.msg).startswith(BENIGN_WARNINGS)
    return False


def quiet_libraries(verbosity: int | None = None) -> None:
  """Installs the quiet defaults unless `verbosity` (default: absl's --verbosity) is >= 1.
  Call it first thing in an entry point's main(); calling it twice is harmless."""
  if verbosity is None:
    verbosity = logging.get_verbosity()
  if verbosity >= 1:
    return
  # C++ INFO lines of XLA / libtpu, read when jaxlib loads (entry points import jax lazily).
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  # ABSLHandler.handle skips its own filters; its python_handler applies them.
  handler = logging.get_absl_handler().python_handler
  if not any(isinstance(f, QuietLibraries) for f in handler.filters):
    handler.addFilter(QuietLibraries())
  after_import("tensorflow_datasets", _quiet_tfds)


def _quiet_tfds(tfds) -> None:
  """No tqdm bars, and not the two bold stdout banners around a dataset's preparation."""
  tfds.display_progress_bar(False)
  try:
    from tensorflow_datasets.core import dataset_builder
  except ImportError:
    return
  if hasattr(dataset_builder, "termcolor"):
    dataset_builder.termcolor = _NoTermcolor


class _NoTermcolor:
  @staticmethod
  def cprint(text, *args, **kwargs):
    del text, args, kwargs

  @staticmethod
  def colored(text, *args, **kwargs):
    del args, kwargs
    return text


def after_import(name: str, callback) -> None:
  """Calls callback(module) once the top-level package `name` is imported: now if it already
  is, else right after its import (so an entry point does not pay for importing it)."""
  if name in sys.modules:
    callback(sys.modules[name])
  elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterImport(name, callback))


class _AfterImport(importlib.abc.MetaPathFinder):
  """Finds `name` with the other finders and runs callback on the module after it executes."""

  def __init__(self, name, callback):
    self.name, self.callback = name, callback

  def find_spec(self, fullname, path=None, target=None):
    if fullname != self.name:
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(fullname)
    if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
      return spec
    exec_module, callback = spec.loader.exec_module, self.callback

    def exec_then_callback(module):
      exec_module(module)
      callback(module)
    spec.loader.exec_module = exec_then_callback
    return spec
