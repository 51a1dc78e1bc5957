r"""Run an ablation grid as one train.main pre-training run per point, then tabulate and plot.

  python -m launch.sweep --config=configs/ablate_attention.py:tiny --sweep_dir=runs/ablate
  python -m launch.sweep --config=configs/ablate_attention.py:tiny --sweep_dir=DIR --print_jobs

The sweep config (see configs/ablate_attention.py) holds `base`, a training config, and a grid
of dotted keys. Its file must also be a train.main config returning `base` for
`get_config("<preset>:base")`: each point runs, in its own DIR/<point name>, as the subprocess
  python -m train.main --config=<file>:<preset>:base --workdir=DIR/<name> --config.<k>=<v> ...
so the printed command reproduces the run exactly (`--print_jobs` prints only these, one per
line, for a cluster scheduler). `--config.base.<key>=<v>` overrides are forwarded to every point.

Points run one after another. A finished point (its final checkpoint is at num_steps) is
skipped; an interrupted one resumes through train.main's own resume; a SIGTERM to the sweep
preempts the running point and stops. Peak RSS is the point process's own (wait4). Then
DIR/results.csv, DIR/results.md (sorted by best validation loss), DIR/loss_curves.png and
DIR/quality_vs_speed.png are written from every point's metrics.jsonl and checkpoint.
"""
import csv
import dataclasses
import itertools
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from model import errors

RUN_RECORD = "sweep_run.json"   # command, exit code, wall time and peak RSS of the last run
COLUMNS = ("name", "overrides", "status", "steps", "final_val_loss", "final_val_ppl",
           "best_val_loss", "best_val_ppl", "best_step", "tokens_per_s", "step_time_ms",
           "peak_rss_mib", "params", "wall_s")


class SweepError(errors.UserError):
  """A sweep spec that cannot expand; the message names the axis or key."""


@dataclasses.dataclass(frozen=True)
class Point:
  name: str
  overrides: tuple   # ((dotted key, value), ...) applied to the base config


def flag_value(value) -> str:
  """How config_flags reads a value back: strings verbatim, tuples as Python literals."""
  return value if isinstance(value, str) else repr(value)


def _safe(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def _lookup(base, key: str):
  node = base
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      raise SweepError(f"sweep key {key!r} is not in the base config (configs/common.py lists "
                       "every key)")
    node = node[part]
  return node


def point_config(base, overrides):
  """The base config with the point's values; a value of the wrong type fails here, up front."""
  config = base.copy_and_resolve_references()
  for key, value in overrides:
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    try:
      node[leaf] = value
    except TypeError as e:
      raise SweepError(f"sweep value {key}={value!r}: {e}") from None
  return config


def expand(sweep) -> list:
  """Grid points (product, relevant_if, exclude, deduplicated) + explicit points, named."""
  keys = [k for k, _ in sweep.grid]
  used = set(keys)
  used.update(k for rule in sweep.exclude for k, _ in rule)
  used.update(k for point in sweep.points for k, _ in point)
  used.update(k for r in sweep.relevant_if for k in r[:2])
  for key in sorted(used):
    _lookup(sweep.base, key)
  combos = [tuple(zip(keys, values)) for values in itertools.product(*(v for _, v in sweep.grid))]
  seen, unique = set(), []
  relevant = _relevance(sweep.relevant_if, sweep.base)
  for combo in [*map(relevant, combos), *map(tuple, sweep.points)]:
    if combo in seen or any(all(pair in combo for pair in rule) for rule in sweep.exclude):
      continue
    seen.add(combo)
    unique.append(combo)
  points = [Point(_name(c, short=True), c) for c in unique]
  if len({p.name for p in points}) < len(points):   # two keys share their last component
    points = [Point(_name(c, short=False), c) for c in unique]
  for p in points:
    point_config(sweep.base, p.overrides)
  return points


def _relevance(rules, base):
  """combo -> combo without the keys whose condition fails (they keep the base value)."""
  def apply(combo):
    values = dict(combo)
    return tuple((k, v) for k, v in combo if not any(
        k == key and values.get(cond, _lookup(base, cond)) not in allowed
        for key, cond, allowed in rules))
  return apply


def _name(overrides, short: bool) -> str:
  if not overrides:
    return "base"
  return ",".join(_safe(f"{k.rsplit('.', 1)[-1] if short else k}={flag_value(v)}")
                  for k, v in overrides)


def command(spec: str, workdir: str, forwarded: dict, overrides) -> list:
  return [sys.executable, "-m", "train.main", f"--config={spec}", f"--workdir={workdir}",
          *(f"--config.{k}={flag_value(v)}" for k, v in [*forwarded.items(), *overrides])]


def tracking_overrides(base, forwarded: dict, sweep_dir: str, point: Point) -> tuple:
  """With an experiment tracker configured (tracking.mlflow_uri / wandb_project, in the base
  config or forwarded), every point is one tracker run named after the point, all under one
  experiment: the sweep folder's name unless tracking.experiment is set. Nothing otherwise."""
  def value(key):
    return forwarded.get(f"tracking.{key}", base.tracking[key]) if "tracking" in base else ""
  if not (value("mlflow_uri") or value("wandb_project")):
    return ()
  out = []
  if not value("experiment"):
    out.append(("tracking.experiment", os.path.basename(sweep_dir.rstrip("/"))))
  if not value("run_name"):
    out.append(("tracking.run_name", point.name))
  return tuple(out)


def final_checkpoint_step(workdir: str):
  d = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
  return max(steps, default=None)


def is_done(workdir: str, num_steps: int) -> bool:
  # The final checkpoint, not a marker: raising num_steps later makes the point resume, and
  # points run elsewhere from --print_jobs count as done too.
  return final_checkpoint_step(workdir) == num_steps


def run_point(cmd: list, workdir: str, num_steps: int) -> dict:
  """Runs one point, its output into workdir/sweep.log; peak RSS from the child's own rusage."""
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  with open(os.path.join(workdir, "sweep.log"), "ab") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    preempted = []

    def forward(signum, frame):
      # A preempted sweep preempts its run, which checkpoints; the next sweep resumes it.
      del frame
      preempted.append(signum)
      proc.send_signal(signum)
    previous = signal.signal(signal.SIGTERM, forward)
    try:
      _, status, usage = os.wait4(proc.pid, 0)
    finally:
      signal.signal(signal.SIGTERM, previous)
  proc.returncode = os.waitstatus_to_exitcode(status)   # reaped here: Popen must not wait again
  result = {"command": shlex.join(cmd), "returncode": proc.returncode,
            "wall_s": time.perf_counter() - t0, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "preempted": bool(preempted)}
  if proc.returncode == 0 and is_done(workdir, num_steps):
    with open(os.path.join(workdir, RUN_RECORD), "w") as f:
      json.dump(result, f, indent=2)
  return result


def collect(point: Point, workdir: str, num_steps: int) -> tuple:
  """(results row, {step: validation row}) from the point's metrics.jsonl, run record and
  final checkpoint meta."""
  from eval import plot_run
  row = {"name": point.name, "status": "not run",
         "overrides": " ".join(f"{k}={flag_value(v)}" for k, v in point.overrides)}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return row, {}
  metrics = plot_run.read_metrics(path)
  val, train = metrics.get("validation", {}), metrics.get("train", {})
  row["status"] = "done" if is_done(workdir, num_steps) else "partial"
  if val:
    last, best = max(val), min(val, key=lambda s: val[s]["loss"])
    row.update(final_val_loss=val[last]["loss"], final_val_ppl=val[last]["perplexity"],
               best_val_loss=val[best]["loss"], best_val_ppl=val[best]["perplexity"],
               best_step=best)
  timed = [train[s] for s in sorted(train) if "tokens_per_s" in train[s]][1:]   # 1st: compile
  if timed:
    row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in timed)
    row["step_time_ms"] = 1e3 * statistics.median(r["step_time_s"] for r in timed)
  row["steps"] = max(train, default=0)
  if os.path.exists(os.path.join(workdir, RUN_RECORD)):   # absent for runs made elsewhere
    with open(os.path.join(workdir, RUN_RECORD)) as f:
      record = json.load(f)
    row.update(peak_rss_mib=record["peak_rss_bytes"] / 2**20, wall_s=record["wall_s"])
  step = final_checkpoint_step(workdir)
  if step is not None:
    from model.checkpoint import Checkpointer
    ckpt = Checkpointer(workdir, every=1, keep=1)
    try:
      row["params"] = ckpt.restore_meta(step).get("params")
    finally:
      ckpt.close()
  return row, val


def _cell(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
  return "" if value is None else str(value)


def _sort_key(row):
  return (row.get("best_val_loss") is None, row.get("best_val_loss") or 0.0)


def write_results(rows: list, curves: dict, sweep_dir: str):
  rows = sorted(rows, key=_sort_key)
  with open(os.path.join(sweep_dir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, COLUMNS)
    writer.writeheader()
    writer.writerows({k: r.get(k) for k in COLUMNS} for r in rows)
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
  lines += ["| " + " | ".join(_cell(r.get(k)) for k in COLUMNS) + " |" for r in rows]
  with open(os.path.join(sweep_dir, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5))
  for name, val in curves.items():
    steps = sorted(val)
    ax.plot(steps, [val[s]["loss"] for s in steps], "o-", ms=3, label=name)
  ax.set(xlabel="step", ylabel="validation loss (nats/token)", title="validation loss")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(sweep_dir, "loss_curves.png"), dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(8, 5))
  for r in rows:
    if r.get("best_val_loss") is not None and r.get("step_time_ms") is not None:
      ax.scatter(r["step_time_ms"], r["best_val_loss"])
      ax.annotate(r["name"], (r["step_time_ms"], r["best_val_loss"]), fontsize=7,
                  xytext=(3, 3), textcoords="offset points")
  ax.margins(x=0.3, y=0.2)   # room for the labels at the edges
  ax.set(xlabel="median step time (ms)", ylabel="best validation loss",
         title="quality vs speed (lower left is better)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(sweep_dir, "quality_vs_speed.png"), dpi=110)
  plt.close(fig)


def define_flags():
  """Called only when run as a program: bench.step_time, imported beside this module in tests,
  defines its own --config."""
  config_flags.DEFINE_config_file(
      "config", None, "Sweep config, e.g. configs/ablate_attention.py:tiny", lock_config=True)
  flags.DEFINE_string("sweep_dir", None, "One subfolder per point, plus the results.")
  flags.DEFINE_bool("dry_run", False, "List the points, their state and commands; run nothing.")
  flags.DEFINE_bool("print_jobs", False, "Print one command per unfinished point and exit (for "
                    "a cluster scheduler).")
  flags.mark_flags_as_required(["config", "sweep_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fl = flags.FLAGS
  logging.set_verbosity(logging.WARNING)   # Orbax's INFO chatter when reading checkpoint meta
  sweep = fl.config
  points = expand(sweep)
  config_file = config_flags.get_config_filename(fl["config"]).split(":", 1)[0]
  spec = f"{config_file}:{sweep.preset}:base"
  forwarded = {k[len("base."):]: v for k, v in config_flags.get_override_values(fl["config"]).items()
               if k.startswith("base.")}
  sweep_dir = os.path.abspath(fl.sweep_dir)
  num_steps = sweep.base.train.num_steps
  jobs = [(p, os.path.join(sweep_dir, p.name)) for p in points]
  if fl.print_jobs or fl.dry_run:
    for p, workdir in jobs:
      done = is_done(workdir, num_steps)
      cmd = shlex.join(command(spec, workdir, forwarded, p.overrides + tracking_overrides(
          sweep.base, forwarded, sweep_dir, p)))
      if fl.dry_run:
        print(f"{'done' if done else 'todo'}  {p.name}\n  {cmd}")
      elif not done:
        print(cmd)
    return

  os.makedirs(sweep_dir, exist_ok=True)
  failed = []
  for i, (p, workdir) in enumerate(jobs):
    if is_done(workdir, num_steps):
      print(f"[{i + 1}/{len(jobs)}] {p.name}: done, skipped", flush=True)
      continue
    cmd = command(spec, workdir, forwarded, p.overrides + tracking_overrides(
        sweep.base, forwarded, sweep_dir, p))
    print(f"[{i + 1}/{len(jobs)}] {p.name}: {shlex.join(cmd)}", flush=True)
    res = run_point(cmd, workdir, num_steps)
    print(f"  exit {res['returncode']} in {res['wall_s']:.0f}s, peak RSS "
          f"{res['peak_rss_bytes'] / 2**20:.0f} MiB (log: {workdir}/sweep.log)", flush=True)
    if res["preempted"]:
      print("preempted: rerun the same command to resume", flush=True)
      break
    if res["returncode"] != 0:
      failed.append(p.name)
  collected = [collect(p, workdir, num_steps) for p, workdir in jobs]
  write_results([row for row, _ in collected],
                {row["name"]: val for row, val in collected if val}, sweep_dir)
  print(open(os.path.join(sweep_dir, "results.md")).read())
  if failed:
    print(f"error: {len(failed)} point(s) failed: {', '.join(failed)}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(errors.exit_on_user_error(main))
