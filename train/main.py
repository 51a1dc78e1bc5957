r"""Train a model: `python -m train.main --config=configs/legal_pretrain.py:tiny --workdir=DIR`.

Rerunning the same command resumes from the newest checkpoint in DIR. Override any config key
with `--config.section.key=value`, e.g. `--config.train.num_steps=50`. `--aot_only` builds,
shards and compiles the train step for the configured mesh without reading data (use it to check
that a pod-sized config fits, e.g. on 8 fake CPU devices with
XLA_FLAGS=--xla_force_host_platform_device_count=8).

Multi-host: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (launch/ does),
or pass --distributed=on where the platform lets jax.distributed auto-detect (TPU pods, SLURM).
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file with get_config(preset), e.g. configs/legal_pretrain.py:tiny",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "auto: initialise jax.distributed when JAX_COORDINATOR_ADDRESS is set; on: always "
    "(auto-detected cluster); off: single process.")
_AOT_ONLY = flags.DEFINE_bool("aot_only", False,
                              "Compile the sharded train step and report memory; no data, no run.")


def init_distributed(mode: str):
  import jax
  env = os.environ
  if mode == "off":
    return
  if "JAX_COORDINATOR_ADDRESS" in env:
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env["JAX_NUM_PROCESSES"]),
                               process_id=int(env["JAX_PROCESS_ID"]))
  elif mode == "on":
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/legal_pretrain.py:tiny")
  init_distributed(_DISTRIBUTED.value)

  import jax
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)   # one progress log per job, not one per host
  from train import config_check
  config_check.validate(config, jax.device_count(), jax.process_count())
  if _AOT_ONLY.value:
    from train import aot
    aot.report(config)
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (where checkpoints and metrics go)")
  from train import run
  # ABSLHandler.handle skips its own filters; its python_handler applies them.
  logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())
  run.train(config, os.path.abspath(os.path.expanduser(_WORKDIR.value)))


class _QuietLibraries:
  """Drops INFO chatter from Orbax and other libraries so the progress lines stay readable."""
  NOISY = ("/orbax/", "/grain/", "/jax/_src/", "/tensorflow_datasets/", "/absl/")

  def filter(self, record):
    return record.levelno >= 30 or not any(   # 30: Python's WARNING
        part in record.pathname for part in self.NOISY)


def _friendly_errors(argv):
  """Known user errors end in one clear line (exit 2), not a traceback wall."""
  from model.checkpoint import CheckpointError
  from train.config_check import ConfigError
  from model.errors import DataError
  from train.loop import NonFiniteLossError
  try:
    main(argv)
  except (CheckpointError, ConfigError, DataError, NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3 if isinstance(e, NonFiniteLossError) else 2)


def parse_flags(argv):
  """absl's parser, with config-override mistakes reported in one line (exit 2)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip("\"'")
    if isinstance(e, AttributeError):
      message = f"unknown config key {message!r}"
    bad = [a for a in argv[1:] if a.startswith("--config.") and
           a.split("=")[0][len("--config."):].split(".")[-1] in message]
    where = f" in {bad[0]}" if bad else ""
    print(f"error: bad command-line flag{where}: {type(e).__name__}: {message}\n"
          f"See --helpfull and configs/common.py for every config key.", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(_friendly_errors, flags_parser=parse_flags)
