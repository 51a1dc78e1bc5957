r"""Export a LoRA run: its adapters merged into the base, as a normal run (or the adapters alone).

  python -m infer.lora_merge --workdir=runs/imdb_lora --out=runs/imdb_lora_merged
  python -m infer.lora_merge --workdir=runs/imdb_lora --out=runs/imdb_lora_adapters --adapters_only

The merged run is a training run's layout (checkpoints/<step>/ with params and the run's record,
its config saying train.lora.rank=0): infer.main, infer.serve, infer.generate, infer.quantize,
`train.init_from` and distillation (as the teacher) read it like any run, and a later export
(e.g. to Hugging Face) sees plain weights. Every one of those also reads the LoRA run itself,
merging on load (infer/loading.py); this command makes the merge once and drops the adapters.

--adapters_only writes only what LoRA trained (the adapter matrices and the task head: a few
percent of the parameters) with the record of the base run they apply to (`lora_base`): the
small artefact to keep or share. It is not loadable as a run by itself.
"""
import json
import os
import sys

import jax
import numpy as np
from absl import app, flags

from infer import loading, lora_weights
from model import checkpoint as checkpoint_lib
from model import errors
from model import log_setup
from model.transformer import Transformer


def merged_meta(run: loading.Run) -> dict:
  """The LoRA run's record as a plain run's: train.lora.rank 0, and where it came from."""
  meta = json.loads(json.dumps(run.meta))
  meta["config"]["train"]["lora"]["rank"] = 0
  meta["lora_merged_from"] = {"workdir": run.workdir, "step": run.step,
                              "lora": dict(run.meta["config"]["train"]["lora"])}
  return meta


def _save(out: str, step: int, params, meta: dict):
  ckpt = checkpoint_lib.Checkpointer(out, every=1, keep=1, async_save=False)
  state = {"step": np.asarray(step, np.int32), "params": params}
  ckpt.save(step, state, None, meta, force=True)
  ckpt.close()


def write_merged(workdir: str, out: str) -> loading.Run:
  """Writes the merged run of the LoRA run at `workdir` (its best state if kept) to `out`."""
  run = loading.open_run(workdir, prefer_best=True)
  if run.lora is None:
    raise loading.LoadError(f"--workdir={workdir} is not a LoRA run (config.train.lora.rank "
                            "is 0): nothing to merge")
  loaded = loading.LoadedModel.from_run(run)          # restores and merges
  _save(out, run.step, jax.device_get(loaded.params), merged_meta(run))
  return run


def write_adapters(workdir: str, out: str) -> loading.Run:
  """Writes only the trained parameters of the LoRA run at `workdir` to `out`."""
  run = loading.open_run(workdir, prefer_best=True)
  if run.lora is None:
    raise loading.LoadError(f"--workdir={workdir} is not a LoRA run (config.train.lora.rank "
                            "is 0): it has no adapters")
  abstract = loading.abstract_params(Transformer(run.model_config()), lora=run.lora)
  params = run.checkpointer.restore_params(run.step, abstract)
  meta = dict(run.meta, lora_base=run.meta["config"]["train"]["init_from"],
              lora_adapters_of={"workdir": run.workdir, "step": run.step})
  _save(out, run.step, jax.device_get(lora_weights.adapters(params)), meta)
  return run


def main(argv):
  log_setup.quiet_libraries()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  out = loading.resolve_path(f.out)
  if os.path.exists(out):
    print(f"error: --out={f.out} exists; give a new folder", file=sys.stderr)
    sys.exit(2)
  write = write_adapters if f.adapters_only else write_merged
  try:
    run = write(f.workdir, out)
  except BaseException:
    if os.path.isdir(out):     # nothing half-written left behind
      import shutil
      shutil.rmtree(out, ignore_errors=True)
    raise
  what = "adapters" if f.adapters_only else "merged run"
  print(f"{f.workdir} (step {run.step}, LoRA rank {run.lora.rank}) -> {f.out}: {what}, "
        f"{checkpoint_lib.folder_bytes(out) / 2**20:.2f} MiB on disk (the LoRA run: {checkpoint_lib.folder_bytes(run.workdir) / 2**20:.2f} "
        "MiB)")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A LoRA fine-tuning run's workdir (its best state if "
                      "kept).", required=True)
  flags.DEFINE_string("out", None, "New folder for the merged run (or the adapters).",
                      required=True)
  flags.DEFINE_bool("adapters_only", False, "Write only the adapters and the task head.")
  app.run(errors.exit_on_user_error(main))
