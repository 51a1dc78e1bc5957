r"""Train-step time and memory against sequence length, per attention kernel, at fixed tokens.

  python -m bench.long_context [--kinds=full,local,blocked] [--lengths=512,1024,...,16384] \
      [--tokens_per_batch=16384] [--out_dir=runs/long_context]

For every kernel in model/attention's registry (kinds asked for but not registered are listed
and skipped) and every length, a small model (by default 2 layers, d_model 256, 4 heads) is
trained on batch = tokens_per_batch / length random-token rows with the project's real step
(eval/step_time.build_project). Each point runs in its own subprocess so its peak RSS is its
own; a point that runs out of memory, in compilation or in the step, is reported as OOM and the
sweep goes on. Writes a table to stdout, <out_dir>/long_context.json and long_context.png.
"""
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import threading

from absl import app, flags

from model import errors
from model import log_setup

_KINDS = flags.DEFINE_list("kinds", ["full", "local", "blocked"], "Attention kernels to time.")
_LENGTHS = flags.DEFINE_list("lengths", ["512", "1024", "2048", "4096", "8192", "16384"],
                             "Sequence lengths.")
_TOKENS = flags.DEFINE_integer("tokens_per_batch", 16384, "Tokens per step (batch = this / len).")
_OUT_DIR = flags.DEFINE_string("out_dir", "runs/long_context", "Where the JSON and PNG go.")
_LAYERS = flags.DEFINE_integer("num_layers", 2, "Model layers.")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width (head_dim = d_model / num_heads).")
_HEADS = flags.DEFINE_integer("num_heads", 4, "Attention heads.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "Vocabulary.")
_WINDOW = flags.DEFINE_integer("window", 512, "model.attention.window, where the schema has it.")
_BLOCK = flags.DEFINE_integer("block_size", 128, "model.attention.block_size.")
_TIMED = flags.DEFINE_integer("timed_steps", 3, "Timed steps per point (median reported).")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 1, "Untimed steps after compiling.")
_POINT_TIMEOUT = flags.DEFINE_integer("point_timeout_s", 1800, "Give up on a point after this.")
_ISOLATE = flags.DEFINE_bool("isolate", True, "Run each point in its own subprocess (its own "
                             "peak RSS; survives the OOM killer). False: in this process, faster.")
_POINT = flags.DEFINE_string("point", None, "Internal: 'kind:length', time one point in-process "
                             "and write its JSON to --point_json.")
_POINT_JSON = flags.DEFINE_string("point_json", None, "Internal: see --point.")

# Shape flags a point's subprocess must see exactly as the parent did.
_SHAPE_FLAGS = (_TOKENS, _LAYERS, _D_MODEL, _HEADS, _VOCAB, _WINDOW, _BLOCK, _TIMED,
                _WARMUP_STEPS)
_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "MemoryError",
                "std::bad_alloc", "Cannot allocate memory")


def point_config(kind: str, seq_len: int):
  from configs import common
  config = common.base_config()
  config.preset = f"long_context:{kind}:{seq_len}"
  config.data.update(vocab_size=_VOCAB.value, seq_len=seq_len,
                     batch_size=max(1, _TOKENS.value // seq_len))
  config.model.update(num_layers=_LAYERS.value, d_model=_D_MODEL.value,
                      num_heads=_HEADS.value, num_kv_heads=_HEADS.value,
                      head_dim=_D_MODEL.value // _HEADS.value, mlp_dim=4 * _D_MODEL.value)
  config.model.attention.kind = kind
  config.model.attention.block_size = _BLOCK.value
  # Only kernels that have a window read it; older schemas have no such key at all.
  if "window" in config.model.attention:
    config.model.attention.window = _WINDOW.value
  config.optim.warmup_steps = 10
  config.train.num_steps = 100_000   # a warm, undecayed lr schedule, as in configs/bench_step.py
  return config


def time_point(kind: str, seq_len: int) -> dict:
  """Compiles and times the project's step for one point, in this process."""
  import jax
  from bench import step_time
  from model import sharding as sharding_lib
  rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  config = point_config(kind, seq_len)
  devices = jax.devices()[:1]
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  runner = step_time.build_project(config, step_time.make_batch(config, packed=False), mesh)
  mem = runner.compiled.memory_analysis()
  runner.run(_WARMUP_STEPS.value, timed=False)
  runner.run(_TIMED.value)
  median = statistics.median(runner.times)
  stats = devices[0].memory_stats() if devices[0].platform == "gpu" else None
  return {"step_ms": 1e3 * median, "min_step_ms": 1e3 * min(runner.times),
          "tokens_per_s": config.data.batch_size * seq_len / median,
          "xla_bytes": step_time._xla_bytes(runner.compiled),   # pylint: disable=protected-access
          "xla_temp_bytes": mem.temp_size_in_bytes if mem else None,
          "xla_argument_bytes": mem.argument_size_in_bytes if mem else None,
          "rss_before_bytes": rss_before,
          "device_peak_bytes": stats.get("peak_bytes_in_use") if stats else None,
          "params": runner.params, "compile_s": runner.compile_s,
          "last_loss": runner.losses[-1], "platform": devices[0].platform}


def run_isolated(kind: str, seq_len: int, out_dir: str) -> dict:
  """One point in a subprocess: its own peak RSS (wait4), and an OOM cannot take us down."""
  result = {"kind": kind, "seq_len": seq_len, "batch": max(1, _TOKENS.value // seq_len)}
  point_json = os.path.join(out_dir, f"point_{kind}_{seq_len}.json")
  cmd = [sys.executable, "-m", "bench.long_context", f"--point={kind}:{seq_len}",
         f"--point_json={point_json}", *(f"--{f.name}={f.value}" for f in _SHAPE_FLAGS)]
  with open(os.path.join(out_dir, f"point_{kind}_{seq_len}.log"), "w+") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    timed_out = threading.Event()
    timer = threading.Timer(_POINT_TIMEOUT.value, lambda: (timed_out.set(), proc.kill()))
    timer.start()
    try:
      _, status, usage = os.wait4(proc.pid, 0)   # this child's own rusage, not all children's
    finally:
      timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)   # reaped: Popen must not wait again
    log.seek(0)
    output = log.read()
  result["peak_rss_bytes"] = usage.ru_maxrss * 1024
  if timed_out.is_set():
    return {**result, "status": "timeout"}
  if proc.returncode == 0:
    with open(point_json) as f:
      return {**result, "status": "ok", **json.load(f)}
  # SIGKILL without a Python error is the kernel's OOM killer.
  oom = proc.returncode == -9 or any(m in output for m in _OOM_MARKERS)
  tail = output.strip().splitlines()[-1:] or [""]
  return {**result, "status": "OOM" if oom else "error", "error": tail[0][-300:],
          "command": shlex.join(cmd)}


def run_in_process(kind: str, seq_len: int) -> dict:
  """One point here: no per-point RSS, but allocation failures are still reported, not raised."""
  result = {"kind": kind, "seq_len": seq_len, "batch": max(1, _TOKENS.value // seq_len),
            "peak_rss_bytes": None}
  try:
    return {**result, "status": "ok", **time_point(kind, seq_len)}
  except Exception as e:   # pylint: disable=broad-except
    message = f"{type(e).__name__}: {e}"
    oom = isinstance(e, MemoryError) or any(m in message for m in _OOM_MARKERS)
    return {**result, "status": "OOM" if oom else "error", "error": message[:300]}


def format_table(results: list) -> str:
  mib = 2.0 ** 20
  lines = [f"{'kind':8} {'seq_len':>7} {'batch':>5} {'status':>7} {'step ms':>9} {'tokens/s':>9} "
           f"{'XLA MiB':>8} {'temp MiB':>9} {'RSS MiB':>8}"]
  for r in results:
    if r["status"] != "ok":
      lines.append(f"{r['kind']:8} {r['seq_len']:7d} {r['batch']:5d} {r['status']:>7} "
                   f"{r.get('error', '')}")
      continue
    lines.append(f"{r['kind']:8} {r['seq_len']:7d} {r['batch']:5d} {'ok':>7} {r['step_ms']:9.1f} "
                 f"{r['tokens_per_s']:9.0f} {r['xla_bytes'] / mib:8.1f} "
                 f"{r['xla_temp_bytes'] / mib:9.1f} "
                 f"{r['peak_rss_bytes'] / mib if r['peak_rss_bytes'] else float('nan'):8.0f}")
  return "\n".join(lines)


def plot(results: list, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
  for kind in dict.fromkeys(r["kind"] for r in results):
    ok = [r for r in results if r["kind"] == kind and r["status"] == "ok"]
    lengths = [r["seq_len"] for r in ok]
    line, = ax_mem.plot(lengths, [r["xla_bytes"] / 2**20 for r in ok], "o-",
                        label=f"{kind} (XLA compiled)")
    if all(r["peak_rss_bytes"] for r in ok):
      ax_mem.plot(lengths, [r["peak_rss_bytes"] / 2**20 for r in ok], "s--",
                  color=line.get_color(), label=f"{kind} (process peak RSS)")
    ax_time.plot(lengths, [r["step_ms"] for r in ok], "o-", label=kind)
    for r in results:
      if r["kind"] == kind and r["status"] != "ok":   # mark failures where the line stops
        ax_time.annotate(r["status"], (r["seq_len"], ax_time.get_ylim()[1]), fontsize=7)
  for ax, ylabel in ((ax_mem, "compiled step memory (MiB)"), (ax_time, "step time (ms)")):
    ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=ylabel)
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  fig.suptitle(f"train step at {_TOKENS.value} tokens per batch")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  log_setup.quiet_libraries()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _POINT.value:
    kind, seq_len = _POINT.value.split(":")
    with open(_POINT_JSON.value, "w") as f:
      json.dump(time_point(kind, int(seq_len)), f)
    return
  from model import attention
  missing = [k for k in _KINDS.value if k not in attention.KERNELS]
  if missing:
    print(f"not in the attention registry, skipped: {', '.join(missing)} "
          f"(registered: {', '.join(sorted(attention.KERNELS))})", flush=True)
  out_dir = os.path.abspath(_OUT_DIR.value)
  os.makedirs(out_dir, exist_ok=True)
  results = []
  for kind in (k for k in _KINDS.value if k in attention.KERNELS):
    for seq_len in sorted(int(n) for n in _LENGTHS.value):
      results.append(run_isolated(kind, seq_len, out_dir) if _ISOLATE.value else
                     run_in_process(kind, seq_len))
      print(format_table(results[-1:]).splitlines()[-1], flush=True)
  print(format_table(results))
  with open(os.path.join(out_dir, "long_context.json"), "w") as f:
    json.dump({"tokens_per_batch": _TOKENS.value, "missing_kinds": missing,
               "results": results}, f, indent=2)
  plot(results, os.path.join(out_dir, "long_context.png"))
  print(f"wrote {out_dir}/long_context.json and long_context.png")


if __name__ == "__main__":
  app.run(errors.exit_on_user_error(main))
