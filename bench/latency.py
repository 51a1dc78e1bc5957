r"""Inference latency, throughput, model size and memory of a forward pass, per batch size.

  python -m bench.latency --config=configs/legal_pretrain.py:tiny \
      --compare=configs/legal_pretrain.py:small --config.data.seq_len=256 \
      [--batch_sizes=1,32] [--task=lm|classify] [--out=latency.json]
  python -m bench.latency --config=configs/legal_pretrain.py:base --config.model.num_layers=2
  python -m bench.latency --config=configs/legal_pretrain.py:tiny --checkpoint=runs/tiny

Why: the train-step benchmark (bench/step_time.py) says nothing about serving, where the latency
of one request (its tail, not only its median) and the throughput of a full batch matter, and
where models of different sizes - later distilled or int8 versions of one - must be compared on
the same footing. `measure` is the reusable part (any apply function, any inputs); the CLI builds
models from configs and prints them side by side, one row per model and batch size.

Timing, per batch size: the inputs are put on the device first; the function is compiled
(`compile_s`, never mixed into the latencies); `warmup` untimed calls; then timed calls until
there are at least `iters` of them and they add up to at least `min_seconds`. One call is timed
from dispatch to `jax.block_until_ready` of its output, the only host sync in it. Throughput is
batch / mean latency (requests served back to back). With n calls, p99 interpolates between the
slowest ones: it needs n >= 100 to mean more than "the max"; the table prints n.

Memory, per batch size:
  xla_bytes       the compiled executable's memory_analysis, per device: arguments (params +
                  tokens), output (logits) and temporaries (activations, scratch). Static and
                  exact for what XLA plans to allocate; the same meaning on CPU and GPU.
  rss_peak_delta  how far the process's peak resident memory (Linux VmHWM, reset to the
                  current RSS before compiling) rose above its level then. On CPU the "device"
                  is host memory, so this counts the compiler, the executable, outputs and
                  temporaries (params and tokens were already resident). On GPU arrays live in
                  device memory and this is host-side only; read device_peak instead (the
                  allocator's peak_bytes_in_use, over the process's life: JAX cannot reset it).

Configs and overrides are ml_collections config_flags: `--config=FILE:PRESET` is the first
model, `--compare=FILE:PRESET[,...]` adds more to the same table, and each
`--config.KEY=VALUE` (after --config; parsed with the type of --config's key) applies to every
one of them, e.g. `--config.data.seq_len=256` (sequence length) or `--config.model.num_layers=2`.
The base preset (~1.7B params, bf16) is far too slow for a short CPU run, so it is measured cut
down: the table prints each model's overrides and, when they change the parameter count, the
preset's own count, so a 2-layer base reads as exactly that.
"""
import dataclasses
import json
import math
import os
import sys
import time

from absl import app, flags
import flax.linen as nn
from ml_collections import config_flags
import jax
import jax.numpy as jnp
import numpy as np
import psutil

from model import errors
from model.config import ModelConfig
from model.transformer import Transformer
from model import log_setup
from infer import loading

TASKS = {"lm": "LM forward (full-sequence logits)",
         "classify": "classify forward (final hidden states, mean-pooled)"}
_MIB = 2.0 ** 20


def xla_memory(compiled):
  """Per-device bytes of a compiled executable - argument, output, temp, alias (arguments
  donated to outputs) and total = argument + output + temp - alias - or None where the backend
  gives no analysis."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def _reset_peak_rss() -> bool:
  """Sets the process's peak RSS back to its current RSS (Linux >= 4.0); False if not allowed."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _peak_rss_bytes():
  """The process's peak resident set size (VmHWM), or None without Linux's /proc."""
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
  except (OSError, StopIteration):
    return None


def call_seconds(fn, args, *, iters: int, warmup: int = 1, min_seconds: float = 0.0) -> list:
  """Wall seconds of each timed call of fn(*args), each blocked on until its result is ready:
  `warmup` untimed calls first (compile, caches), then at least `iters` calls lasting at least
  `min_seconds` in all. The one timing loop every benchmark here shares."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  while len(times) < iters or sum(times) < min_seconds:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return times


def _measure_one(apply_fn, args, batch, *, warmup, iters, min_seconds, seq_len, device) -> dict:
  jax.block_until_ready(args)
  # After a reset, VmHWM itself is the baseline (the same counter the peak is read from).
  whole_life = not _reset_peak_rss()
  rss_before = psutil.Process().memory_info().rss if whole_life else _peak_rss_bytes()
  t0 = time.perf_counter()
  compiled = jax.jit(apply_fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  times = call_seconds(compiled, args, iters=iters, warmup=warmup, min_seconds=min_seconds)
  peak = _peak_rss_bytes()
  stats = device.memory_stats()   # None on CPU
  ms = 1e3 * np.asarray(times)
  p50, p95, p99 = (float(p) for p in np.percentile(ms, [50, 95, 99]))
  per_s = batch / (float(ms.mean()) / 1e3)
  return {"iters": len(times), "compile_s": compile_s, "p50_ms": p50, "p95_ms": p95,
          "p99_ms": p99, "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
          "max_ms": float(ms.max()), "examples_per_s": per_s,
          "tokens_per_s": per_s * seq_len if seq_len else None,
          "xla_bytes": xla_memory(compiled), "rss_peak_bytes": peak,
          # max: the kernel's RSS counters are per-CPU sums read approximately (~MiB off).
          "rss_peak_delta_bytes": None if peak is None else max(0, peak - rss_before),
          "rss_peak_over_whole_process_life": whole_life,
          "device_peak_bytes": stats.get("peak_bytes_in_use") if stats else None}


def measure(apply_fn, args_for_batch, *, batch_sizes=(1, 32), warmup=3, iters=20,
            min_seconds=0.0, seq_len=None, device=None) -> dict:
  """{batch size: latency percentiles (ms), throughput, compile time and memory} of
  `apply_fn(*args_for_batch(batch))` on `device` (default: the first); see the module docstring
  for what is timed and what each memory number means. seq_len, if given, adds tokens_per_s."""
  device = device or jax.devices()[0]
  return {b: _measure_one(apply_fn, jax.device_put(args_for_batch(b), device), b, warmup=warmup,
                          iters=iters, min_seconds=min_seconds, seq_len=seq_len, device=device)
          for b in batch_sizes}


def model_size(params, checkpoint_dir=None) -> dict:
  """Parameter count and in-memory bytes of `params` (arrays or ShapeDtypeStructs), in total
  and by dtype; with checkpoint_dir, the bytes of every file under it (a local folder)."""
  by_dtype = {}
  for x in jax.tree.leaves(params):
    dtype = jnp.dtype(x.dtype)
    entry = by_dtype.setdefault(dtype.name, {"params": 0, "bytes": 0})
    entry["params"] += math.prod(x.shape)
    entry["bytes"] += math.prod(x.shape) * dtype.itemsize
  out = {"params": sum(e["params"] for e in by_dtype.values()),
         "bytes": sum(e["bytes"] for e in by_dtype.values()), "by_dtype": by_dtype}
  if checkpoint_dir is not None:
    out["disk_bytes"] = sum(os.path.getsize(os.path.join(root, name))
                            for root, _, names in os.walk(checkpoint_dir) for name in names)
  return out


def forward_fn(model, task: str):
  """(params, tokens [B, T]) -> what one inference request computes: LM logits [B, T, vocab],
  or for classify the mean-pooled final hidden states [B, D] (a classifier head on top is one
  small [D, classes] matmul)."""
  if task == "lm":
    return lambda params, tokens: model.apply({"params": params}, tokens, deterministic=True)
  def pooled(params, tokens):
    hidden = model.apply({"params": params}, tokens, deterministic=True, return_hidden=True)
    return hidden.astype(jnp.float32).mean(axis=1)
  return pooled


def _init_params(model, seed: int, abstract: bool = False):
  """The model's own initialisation (its shapes only, with abstract: nothing allocated)."""
  init = jax.eval_shape if abstract else lambda f, *args: jax.jit(f)(*args)
  variables = init(model.init, jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))
  return nn.meta.unbox(variables["params"])


def restore_params(workdir: str, model, device):
  """(params of the run's newest checkpoint (any run infer/loading.py opens), placed on
  device; that checkpoint's step folder, whose files hold params + optimizer state + metadata)."""
  run = loading.open_run(workdir, what="--checkpoint")
  params = jax.device_put(loading.restore_params(run, model), device)
  return params, os.path.join(run.checkpointer.directory, str(run.step))


def benchmark_config(config, *, batch_sizes=(1, 32), task="lm", warmup=3, iters=20,
                     min_seconds=0.0, checkpoint=None, label="", model_cfg=None) -> dict:
  """Builds config's model - random params, or restored from the training workdir
  `checkpoint` - and measures its forward pass on random tokens [batch, config.data.seq_len];
  model_cfg: config.model's ModelConfig when the caller built it."""
  model_cfg = model_cfg or ModelConfig.from_config(config.model, config.data.vocab_size)
  model = Transformer(model_cfg)
  device = jax.devices()[0]
  checkpoint_dir = None
  if checkpoint:
    params, checkpoint_dir = restore_params(checkpoint, model, device)
  else:
    params = _init_params(model, config.seed)
  seq_len, vocab = config.data.seq_len, config.data.vocab_size
  rng = np.random.default_rng(config.seed)
  results = measure(
      forward_fn(model, task), lambda b: (params, rng.integers(0, vocab, (b, seq_len), np.int32)),
      batch_sizes=batch_sizes, warmup=warmup, iters=iters, min_seconds=min_seconds,
      seq_len=seq_len, device=device)
  return {"label": label or config.preset, "task": task, "seq_len": seq_len,
          "warmup": warmup, "min_iters": iters, "min_seconds": min_seconds,
          "platform": device.platform, "device_kind": device.device_kind,
          "model": dataclasses.asdict(model_cfg), "size": model_size(params, checkpoint_dir),
          "checkpoint": checkpoint_dir, "results": results}


def _describe(r: dict) -> str:
  m, size = r["model"], r["size"]
  text = (f"{m['num_layers']} layers, d_model {m['d_model']}, {m['num_heads']} heads "
          f"({m['num_kv_heads']} kv) x {m['head_dim']}, mlp {m['mlp_dim']} {m['mlp_activation']},"
          f" vocab {m['vocab_size']}, compute {m['dtype']}; {size['params'] / 1e6:.2f}M params = "
          + " + ".join(f"{e['bytes'] / _MIB:.1f} MiB {d}" for d, e in size["by_dtype"].items()))
  if "preset_params" in r:
    text += f" (the preset itself: {r['preset_params'] / 1e6:.1f}M)"
  if r["checkpoint"]:
    text += f"; checkpoint {r['checkpoint']}: {size['disk_bytes'] / _MIB:.1f} MiB on disk"
  return text


def format_table(reports: list) -> str:
  """One row per (model, batch size), after a line per model saying exactly what was run."""
  first = reports[0]
  lines = [f"inference latency on 1 {first['platform']} device ({first['device_kind']}); "
           f"{first['warmup']} warm-up calls excluded, compile time separate; n = timed calls "
           f"(>= {first['min_iters']} and >= {first['min_seconds']:g} s)"]
  for r in reports:
    overrides = ", ".join(r.get("overrides", ())) or "none"
    spec = f" {r['spec']}" if "spec" in r else ""
    lines.append(f"[{r['label']}]{spec} {TASKS[r['task']]}, seq {r['seq_len']}; "
                 f"overrides: {overrides}\n    {_describe(r)}")
  lines.append(f"{'model':20} {'batch':>5} {'n':>5} {'compile s':>9} {'p50 ms':>9} {'p95 ms':>9} "
               f"{'p99 ms':>9} {'mean ms':>9} {'examples/s':>10} {'tokens/s':>9} "
               f"{'XLA MiB arg/out/temp':>21} {'RSS +MiB':>8} {'dev peak MiB':>12}")
  for r in reports:
    for batch, s in r["results"].items():
      x = s["xla_bytes"]
      xla = "-" if x is None else "/".join(f"{x[k] / _MIB:.1f}" for k in ("argument", "output",
                                                                         "temp"))
      rss, dev = s["rss_peak_delta_bytes"], s["device_peak_bytes"]
      lines.append(
          f"{r['label'][:20]:20} {batch:>5} {s['iters']:>5} {s['compile_s']:9.2f} "
          f"{s['p50_ms']:9.2f} {s['p95_ms']:9.2f} {s['p99_ms']:9.2f} {s['mean_ms']:9.2f} "
          f"{s['examples_per_s']:10.1f} {s['tokens_per_s']:9.0f} {xla:>21} "
          f"{'-' if rss is None else f'{rss / _MIB:.0f}':>8} "
          f"{'-' if dev is None else f'{dev / _MIB:.0f}':>12}")
  lines.append("XLA MiB: the executable's arguments (params + tokens) / output / temporaries, per "
               "device. RSS +MiB: rise of the process's peak RSS over its level before compiling "
               "(CPU: compiler + outputs + temporaries; GPU: host side only, see dev peak = the "
               "device allocator's peak over the process's life).")
  return "\n".join(lines)


def _define_flags(flag_values=flags.FLAGS):
  # Only when run as a script: bench/step_time.py imports this module and has its own --config.
  config_flags.DEFINE_config_file(
      "config", None, "The config to measure, 'configs/<file>.py:<preset>'; override its keys "
      "with --config.KEY=VALUE, which also apply to every --compare config.",
      flag_values=flag_values, lock_config=True)
  flags.DEFINE_list("compare", [], "More configs, comma-separated, measured side by side with "
                    "--config (with the same --config.KEY overrides).", flag_values=flag_values)
  flags.DEFINE_list("batch_sizes", ["1", "32"], "Batch sizes timed.", flag_values=flag_values)
  flags.DEFINE_enum("task", "lm", list(TASKS), "lm: logits of every position; classify: the "
                    "mean-pooled final hidden states (a classifier's input).",
                    flag_values=flag_values)
  flags.DEFINE_integer("warmup", 3, "Untimed calls per batch size after compiling.",
                       flag_values=flag_values)
  flags.DEFINE_integer("iters", 20, "Timed calls per batch size, at least.",
                       flag_values=flag_values)
  flags.DEFINE_float("min_seconds", 0.0, "Keep timing each batch size until this much time.",
                     flag_values=flag_values)
  flags.DEFINE_string("checkpoint", None, "Training workdir whose newest params are measured "
                      "(one config only; it must describe the checkpoint's architecture).",
                      flag_values=flag_values)
  flags.DEFINE_string("out", None, "Also write the results here as JSON.",
                      flag_values=flag_values)


def configs_from_flags(flag_values=flags.FLAGS) -> list[dict]:
  """The models to measure, from the parsed flags: --config, then each --compare config, every
  one with the --config.KEY overrides applied. Each is {"spec", "label" ('<file>:<preset>'),
  "config", "model_cfg" (its ModelConfig), "overrides" (['key=value', ...]), "preset_params"
  (the preset's parameter count as written, counted abstractly)}. A compare config that cannot
  load or take an override, or an invalid model, is an app.UsageError."""
  flag = flag_values["config"]
  if flag.value is None:
    raise app.UsageError("give --config (and --compare for more configs)")
  overrides = config_flags.get_override_values(flag)
  first = config_flags.get_config_filename(flag)
  models = []
  for spec in [first, *flag_values["compare"].value]:
    try:
      preset = flag.parser.parse(spec)   # loaded as config_flags loads --config
      if spec == first:
        config = flag.value
      else:
        config = flag.parser.parse(spec)
        config.update_from_flattened_dict(overrides)
      model_cfg = ModelConfig.from_config(config.model, config.data.vocab_size)   # validated
      preset_params = model_size(_init_params(Transformer(
          ModelConfig.from_config(preset.model, preset.data.vocab_size)), 0, abstract=True))
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as e:
      raise app.UsageError(f"{spec}: {type(e).__name__}: {e}") from e
    models.append({
        "spec": spec, "config": config, "model_cfg": model_cfg,
        "preset_params": preset_params["params"],
        "label": f"{os.path.splitext(os.path.basename(spec.partition(':')[0]))[0]}:"
                 f"{config.preset}",
        "overrides": [f"{key}={value}" for key, value in overrides.items()]})
  return models


def main(argv):
  log_setup.quiet_libraries()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  models = configs_from_flags(f)
  if f.checkpoint and len(models) != 1:
    raise app.UsageError("--checkpoint measures one model: give no --compare")
  reports = []
  for m in models:
    report = benchmark_config(
        m["config"], batch_sizes=[int(b) for b in f.batch_sizes], task=f.task, warmup=f.warmup,
        iters=f.iters, min_seconds=f.min_seconds, checkpoint=f.checkpoint, label=m["label"],
        model_cfg=m["model_cfg"])
    report.update(spec=m["spec"], overrides=m["overrides"])
    if report["size"]["params"] != m["preset_params"]:
      report["preset_params"] = m["preset_params"]
    reports.append(report)
  print(format_table(reports))
  if f.out:
    with open(f.out, "w") as out:
      json.dump(reports, out, indent=2)


def _parse_flags(argv):
  """absl's parser; config_flags reports an unknown --config.KEY as an AttributeError or
  KeyError with a traceback, here one line like absl's own flag errors."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    while e.args and isinstance(e.args[0], Exception):   # AttributeError(KeyError(text))
      e = e.args[0]
    text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    print(f"FATAL Flags parsing error: unknown --config key {' '.join(text.split())}",
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  app.run(errors.exit_on_user_error(main), flags_parser=_parse_flags)
