"""Writes a quantized run: a trained run's parameters quantized (infer/ptq.py) into a new
workdir that every reader opens like any run.

  python -m infer.quantize --workdir=runs/imdb_ft --mode=w8a8 --out=runs/imdb_ft_w8a8
  python -m infer.serve --workdir=runs/imdb_ft_w8a8      # a quantized run serves like any run

Modes: f32, bf16, int8_weight_only, w8a8 (infer/ptq.py says what each does).
"""
import dataclasses
import os

from absl import app, flags
import jax.numpy as jnp

from infer import loading, ptq
from model import checkpoint as checkpoint_lib
from model import errors
from model import log_setup


def main(argv):
  """Writes a quantized run: <out>/quantized/ (params + meta, which keeps the source run's
  record: config, tokenizer, step), so infer.main, infer.serve and the benchmarks load <out>
  like any other run."""
  log_setup.quiet_libraries()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  out = loading.resolve_path(f.out)
  if os.path.exists(out):
    raise app.UsageError(f"--out={f.out} exists; give a new folder")
  run = loading.open_run(f.workdir, prefer_best=True)
  if run.quantization != "none":
    raise loading.LoadError(f"--workdir={f.workdir} is already quantized "
                            f"({run.quantization}); quantize the float run it came from")
  loaded = loading.LoadedModel.from_run(run)
  tokens = jnp.zeros((1, loaded.config.data.seq_len), jnp.int32)
  qmodel, qparams = ptq.quantize(loaded.model, loaded.params, f.mode, tokens)
  # The quantized run records the float run's metadata as its own (what it does, its
  # tokenizer, its config) plus how it was quantized.
  ptq.save(os.path.join(out, loading.QUANTIZED_DIR), qparams, {
      "mode": f.mode, "model_config": dataclasses.asdict(qmodel.cfg), "run_meta": run.meta,
      "source_workdir": run.workdir, "source_step": run.step})
  mib = lambda n: f"{n / 2**20:.2f} MiB"
  before, after = ptq.param_bytes(loaded.params), ptq.param_bytes(qparams)
  print(f"{f.workdir} (step {loaded.step}, {loaded.kind}) -> {f.out} [{f.mode}]")
  print(f"params in memory: {mib(before)} -> {mib(after)} ({before / after:.2f}x smaller); "
        f"on disk: {mib(checkpoint_lib.folder_bytes(out))}")
  if f.mode not in ("f32", "bf16"):
    k_before, k_after = ptq.kernel_bytes(loaded.params, qparams)
    print(f"  of which quantized kernels: {mib(k_before)} -> {mib(k_after)} "
          f"({k_before / k_after:.2f}x); the rest (embedding, norms, heads) stays float")
  print(f"serve it like any run: python -m infer.serve --workdir={f.out}")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A training run's workdir (its best state if kept).",
                      required=True)
  flags.DEFINE_enum("mode", "w8a8", list(ptq.MODES), "Quantization mode.")
  flags.DEFINE_string("out", None, "New folder for the quantized checkpoint.", required=True)
  app.run(errors.exit_on_user_error(main))
