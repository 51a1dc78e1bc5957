r"""Train a model: `python -m train.main --config=configs/legal_pretrain.py:tiny --workdir=DIR`.

Rerunning the same command resumes from the newest checkpoint in DIR. Override any config key
with `--config.section.key=value`, e.g. `--config.train.num_steps=50`; `--print_config` lists
every key with its preset default and the value the run would use. `--aot_only` builds,
shards and compiles the train step for the configured mesh without reading data (use it to check
that a pod-sized config fits, e.g. on 8 fake CPU devices with
XLA_FLAGS=--xla_force_host_platform_device_count=8).

Multi-host: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (launch/ does),
or pass --distributed=on where the platform lets jax.distributed auto-detect (TPU pods, SLURM).
"""
import os

from absl import app, flags, logging

from model import errors
from model import log_setup
from train import cli

_CONFIG = cli.CONFIG
_WORKDIR = cli.WORKDIR
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "auto: initialise jax.distributed when JAX_COORDINATOR_ADDRESS is set; on: always "
    "(auto-detected cluster); off: single process.")
_AOT_ONLY = flags.DEFINE_bool("aot_only", False,
                              "Compile the sharded train step and report memory; no data, no run.")
_AOT_TOPOLOGY = flags.DEFINE_string(
    "aot_topology", None, "With --aot_only: compile for this TPU slice with the TPU compiler "
    "(libtpu, pip install -r requirements-tpu.txt) instead of this host's devices, e.g. "
    "v5p-128, v5e-256, v6e-256, v4-8 or v5e:16x16; prints per-chip HBM against capacity "
    "(fits / does not fit), FLOPs, bytes and collectives per step (train/topologies.py).")
_AOT_SAVE = flags.DEFINE_string(
    "aot_save", None, "With --aot_only: write the compiled train step here (a serialized "
    "executable; HLO text when the path ends in .hlo or .txt).")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print every config key: the value this run would use, its preset "
    "default, and * where a --config.KEY flag set it; then exit without training.")


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
  if _PRINT_CONFIG.value:
    cli.print_config()
    return
  log_setup.quiet_libraries()
  if _AOT_TOPOLOGY.value:
    if not _AOT_ONLY.value:
      raise app.UsageError("--aot_topology compiles for a TPU slice: add --aot_only")
    from train import topologies   # before jax loads libtpu: quiet its host probing
    topologies.quiet_libtpu_env(topologies.parse(_AOT_TOPOLOGY.value))
  init_distributed(_DISTRIBUTED.value)

  import jax
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)   # one progress log per job, not one per host
  # Both paths resolve the config first (train/build.py: finish, validate, freeze).
  if _AOT_ONLY.value:
    from train import aot
    aot.report(config, topology=_AOT_TOPOLOGY.value, save_path=_AOT_SAVE.value)
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (where checkpoints and metrics go)")
  from train import run
  run.train(config, os.path.abspath(os.path.expanduser(_WORKDIR.value)))


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(errors.exit_on_user_error(main), flags_parser=cli.parse_flags)
