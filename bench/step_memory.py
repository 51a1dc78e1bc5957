r"""What a train step keeps from its forward pass for its backward pass, by where it was made.

  python -m bench.step_memory --config=configs/bench_step.py:anchor [--top=20]

Reads the saved residuals of the loss's gradient (jax's own partial evaluation of the step,
before any compiler): the arrays held from forward to backward, grouped by the source line
that made them, largest first. They are the same on every backend except inside kernels that
pick a backend's own path (attention: `model.attention.full.choose`), so a CPU reads the
activation memory an accelerator's program starts from; the compiler may then recompute or fuse
some of them (TPU's does, docs/results/gpu.md "Memory"). No array is allocated: the params are
abstract.
"""
import collections
import re

from absl import app, flags
import jax
from jax._src import ad_checkpoint
from ml_collections import config_flags

from model import log_setup
from train import build

GiB = 2.0 ** 30


def saved_residuals(config, parts=None) -> list[tuple]:
  """[(bytes, dtype[shape], where made)] of one step's loss gradient on config's batch."""
  parts = parts or build.build(config)
  batch, task = parts.dummy_batch(), parts.task
  rng = jax.random.key(0)
  residuals = ad_checkpoint.saved_residuals(
      lambda p: task.loss(p, batch, rng, True)[0], parts.abstract.params)
  out = []
  for aval, why in residuals:
    if "from the argument" in why:   # the params themselves: held anyway
      continue
    where = re.sub(r"\S*/(model|train|infer|bench)/", r"\1/", why)
    out.append((aval.size * aval.dtype.itemsize, f"{aval.dtype.name}{list(aval.shape)}", where))
  return out


def by_source(residuals: list[tuple]) -> list[tuple]:
  """[(total bytes, count, dtype[shape], where)] summed over identical (array, source), largest
  first."""
  sums, counts = collections.Counter(), collections.Counter()
  for nbytes, array, where in residuals:
    sums[(array, where)] += nbytes
    counts[(array, where)] += 1
  return [(total, counts[key], *key) for key, total in sums.most_common()]


def report(config, top: int = 20) -> str:
  parts = build.build(config)
  residuals = saved_residuals(config, parts)
  rows = by_source(residuals)
  total = sum(r[0] for r in residuals)
  lines = [f"saved for the backward pass: {total / GiB:.2f} GiB in {len(residuals)} arrays "
           f"(batch {config.data.batch_size} x {config.data.seq_len}, "
           f"dtype {config.model.dtype}, remat {config.model.remat}, "
           f"LM-head loss chunk {parts.task.loss_chunk or 'none'})", "",
           "| GiB | arrays | each | made by |", "| ---: | ---: | --- | --- |"]
  for nbytes, count, array, where in rows[:top]:
    lines.append(f"| {nbytes / GiB:.2f} | {count} | {array} | {where.replace('|', '/')} |")
  if len(rows) > top:
    rest = sum(r[0] for r in rows[top:])
    lines.append(f"| {rest / GiB:.2f} | {sum(r[1] for r in rows[top:])} | | the other "
                 f"{len(rows) - top} sources |")
  return "\n".join(lines)


def main(argv):
  del argv
  log_setup.quiet_libraries()
  print(report(_CONFIG.value, _TOP.value))


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file(
      "config", "configs/bench_step.py:anchor", "Step config, e.g. configs/bench_step.py:anchor")
  _TOP = flags.DEFINE_integer("top", 20, "Rows: the largest sources.")
  app.run(main)
