r"""Step time of the project's real train step against a plain-JAX reference of the same shape.

  python -m bench.step_time --config=configs/bench_step.py:cpu [--packed] [--json_out=r.json]
  python -m bench.step_time --config=configs/bench_step.py:cpu --mode=inference [--batch_sizes=1,32]

Both steps start from the same initial params (the project's init) and see the same fixed
random-token batch, so their first losses agree. By default a row is one document (plain
causal mask, the attention fast path); `--packed` adds segment ids and positions so the masked
path is timed. Timing alternates rounds (project, reference, project, ...) so a noisy machine
slows both alike; `ratio` = reference median / project median (>= 1: the project is as fast).

`--mode=inference` times the same config's forward pass instead (bench/latency.py: p50/p95/p99
latency per batch size, throughput, model size and peak memory) on the first device.
"""
import dataclasses
import json
import re
import resource
import statistics
import time

from absl import app, flags
from ml_collections import config_flags
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from bench import latency, reference_step
from model import errors
from model import sharding as sharding_lib
from model.config import ModelConfig
from train import build
from train import metrics as metrics_lib
from train import state as state_lib
from model import log_setup

def _define_flags():
  # Only when run as a command: other entry points (train.main) define --config too, and
  # tests import this module beside them.
  global _CONFIG, _STEPS, _ROUNDS, _WARMUP, _PACKED, _PEAK, _DEVICES, _JSON, _MODE
  global _BATCH_SIZES, _ITERS, _VARIANT
  _CONFIG = config_flags.DEFINE_config_file(
      "config", "configs/bench_step.py", "Benchmark config, e.g. configs/bench_step.py:cpu",
      lock_config=True)
  _STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per round.")
  _ROUNDS = flags.DEFINE_integer("rounds", 3, "Timing rounds per step, alternating the two.")
  _WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compiling.")
  _PACKED = flags.DEFINE_bool("packed", False, "Add segment_ids/positions (masked attention).")
  _PEAK = flags.DEFINE_float("peak_flops", 0.0, "Per-device peak FLOP/s for MFU (0: config/table).")
  _DEVICES = flags.DEFINE_integer("devices", 0, "Use the first N devices (0: all).")
  _JSON = flags.DEFINE_string("json_out", None, "Also write the results here as JSON.")
  _MODE = flags.DEFINE_enum("mode", "train", ["train", "inference"],
                            "train: the train step against the reference; inference: "
                            "forward-pass latency (bench/latency.py).")
  _BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "32"], "--mode=inference: batch sizes.")
  _VARIANT = flags.DEFINE_list(
      "variant", [],
      "Config overrides key=value (e.g. model.dtype=bfloat16,train.xla_cpu_dot_library=xla): "
      "also time the project's step built with them, in the same alternating rounds (row "
      "'variant'; variant_ratio = project median / variant median), so a setting is compared "
      "without a second run's noise.")
  _ITERS = flags.DEFINE_integer("iters", 20, "--mode=inference: timed calls per batch size, at "
                                "least (--warmup untimed calls come first).")


def packed_layout(rng, batch: int, length: int, min_docs: int = 1, max_docs: int = 4):
  """(segment_ids, positions) [batch, length] int32 of rows packed with min_docs..max_docs
  documents at random cut points, each document's positions restarting at 0."""
  seg = np.zeros((batch, length), np.int32)
  pos = np.zeros((batch, length), np.int32)
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, length), rng.integers(min_docs - 1, max_docs),
                              replace=False))
    for doc, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, length])):
      seg[row, lo:hi], pos[row, lo:hi] = doc + 1, np.arange(hi - lo)
  return seg, pos


def make_batch(config, packed: bool, seed: int = 0) -> dict:
  """Random tokens [B, T]; packed: 1-4 documents per row, their positions restarting at 0."""
  rng = np.random.default_rng(seed)
  b, t = config.data.batch_size, config.data.seq_len
  batch = {"tokens": rng.integers(0, config.data.vocab_size, (b, t), dtype=np.int32)}
  if packed:
    seg, pos = packed_layout(rng, b, t)
    batch.update(segment_ids=seg, positions=pos)
  return batch


def with_overrides(config, overrides: dict):
  """A copy of `config` with dotted keys set from strings, cast to each key's current type."""
  out = config.copy_and_resolve_references()
  for key, text in overrides.items():
    *parents, leaf = key.split(".")
    node = out
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ValueError(f"--variant: config has no key {key!r}")
    old = node[leaf]
    if isinstance(old, bool):
      if text.lower() not in ("true", "false"):
        raise ValueError(f"--variant {key}={text!r}: expected true or false")
      value = text.lower() == "true"
    else:
      value = type(old)(text) if old is not None else text
    node[leaf] = value
  return out


@dataclasses.dataclass
class _Runner:
  """One compiled step with its (donated) state and batch, timed step by step."""
  name: str
  fn: object
  state: object
  batch: dict
  loss_of: object         # step output -> scalar loss
  compiled: object
  params: int
  compile_s: float
  times: list = dataclasses.field(default_factory=list)
  losses: list = dataclasses.field(default_factory=list)

  def run(self, n: int, timed: bool = True):
    for _ in range(n):
      t0 = time.perf_counter()
      self.state, out = self.fn(self.state, self.batch)
      jax.block_until_ready((self.state, out))
      if timed:
        self.times.append(time.perf_counter() - t0)
      self.losses.append(float(self.loss_of(out)))


def build_project(config, batch, mesh, name: str = "project", model_cfg=None) -> _Runner:
  """The training run's step: real sharded state, optimizer and step, compiled ahead of time."""
  t0 = time.perf_counter()
  parts = build.build(config, mesh, model_cfg)
  state = parts.init_state()
  compiled = parts.compile_train_step(batch)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  return _Runner(name, compiled, state, jax.device_put(batch, batch_sharding),
                 lambda m: m["loss"], compiled, parts.param_count(), time.perf_counter() - t0)


def build_reference(config, batch, mesh, project_params, c: ModelConfig) -> _Runner:
  """reference_step.py's step from the project's initial params (copied: those are donated);
  data parallel over the same devices, params replicated."""
  t0 = time.perf_counter()
  tx, step = reference_step.make_train_step(c, config.optim, config.train.num_steps)
  params = jax.tree.map(jnp.copy, reference_step.from_project(project_params, c))
  state = jax.device_put((params, tx.init(params)), NamedSharding(mesh, PartitionSpec()))
  batch = jax.device_put(batch, sharding_lib.batch_sharding(mesh))
  compiled = step.lower(state, batch).compile()
  return _Runner("reference", compiled, state, batch, lambda loss: loss, compiled,
                 state_lib.param_count(params), time.perf_counter() - t0)


def hlo_op_counts(hlo_text: str) -> dict:
  """Static counts of layout copies and transposes in an optimized HLO module, outside fusion
  bodies (inside a fusion a copy is an index remap, not a pass over memory), and of fusions."""
  counts = {"copy": 0, "transpose": 0, "fusion": 0}
  in_fused = False
  for line in hlo_text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):   # a computation header
      in_fused = "fused" in line.split("(")[0] or "fusion" in line.split("(")[0]
      continue
    if in_fused or " = " not in line:
      continue
    for op in counts:
      if re.search(rf"\s{op}\(", line.split(" = ", 1)[1]):
        counts[op] += 1
  return counts


def _xla_bytes(compiled) -> float:
  """Per-device bytes the compiled step holds: arguments + outputs + temps, less donated aliases."""
  mem = latency.xla_memory(compiled)
  return float("nan") if mem is None else float(mem["total"])


def run_benchmark(config, *, packed=False, steps=3, rounds=3, warmup=1, peak_flops=0.0,
                  devices=None, variant=None, reference=True) -> dict:
  """Builds both steps (and the project's step with the `variant` overrides {"model.dtype":
  "bfloat16", ...}), times them in alternating rounds and returns the results as a dict.
  reference=False times the project's step alone (a shape the reference cannot hold)."""
  devices = jax.devices() if devices is None else list(devices)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  batch = make_batch(config, packed, config.seed)
  model_cfg = ModelConfig.from_config(config.model, config.data.vocab_size)
  project = build_project(config, batch, mesh, model_cfg=model_cfg)
  runners = [project] + ([build_reference(config, batch, mesh, project.state.params, model_cfg)]
                         if reference else [])
  if variant:
    runners.append(build_project(with_overrides(config, variant), batch, mesh, "variant"))
  for r in runners:
    r.run(warmup, timed=False)
  for _ in range(rounds):
    for r in runners:
      r.run(steps)

  tokens = config.data.batch_size * config.data.seq_len
  flops_per_step = metrics_lib.train_flops_per_token(model_cfg, config.data.seq_len) * tokens
  peak, source = ((peak_flops, "--peak_flops") if peak_flops > 0 else
                  metrics_lib.peak_flops_per_device(config.train.peak_flops))
  peak_total = peak * len(devices)
  out = {"preset": config.preset, "packed": packed, "batch_size": config.data.batch_size,
         "seq_len": config.data.seq_len, "devices": len(devices),
         "platform": devices[0].platform, "steps_per_round": steps, "rounds": rounds,
         "flops_per_step": flops_per_step, "peak_flops_per_device": peak,
         "peak_flops_source": source}
  for r in runners:
    med, mean = statistics.median(r.times), statistics.fmean(r.times)
    out[r.name] = {"median_ms": 1e3 * med, "mean_ms": 1e3 * mean, "min_ms": 1e3 * min(r.times),
                   "tokens_per_s": tokens / med, "model_flops_per_s": flops_per_step / med,
                   "mfu": flops_per_step / med / peak_total, "xla_bytes": _xla_bytes(r.compiled),
                   "params": r.params, "losses": r.losses, "compile_s": r.compile_s,
                   "times_ms": [1e3 * t for t in r.times],
                   "hlo_ops": hlo_op_counts(r.compiled.as_text())}
  if reference:
    out["ratio"] = out["reference"]["median_ms"] / out["project"]["median_ms"]
  out["runners"] = [r.name for r in runners]
  if variant:
    out["variant_overrides"] = dict(variant)
    out["variant_ratio"] = out["project"]["median_ms"] / out["variant"]["median_ms"]
    if reference:
      out["variant_vs_reference"] = out["reference"]["median_ms"] / out["variant"]["median_ms"]
  # Both steps share this process, so these peaks cover the whole run, not one step.
  out["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  stats = devices[0].memory_stats() if devices[0].platform == "gpu" else None
  out["device_peak_bytes"] = stats.get("peak_bytes_in_use") if stats else None
  return out


def format_table(res: dict) -> str:
  mib = 2.0 ** 20
  lines = [
      f"step time: preset {res['preset']}, batch {res['batch_size']} x seq {res['seq_len']}, "
      f"{'packed (segment mask)' if res['packed'] else 'unpacked (plain causal)'}, "
      f"{res['devices']} {res['platform']} device(s), {res['rounds']} alternating rounds x "
      f"{res['steps_per_round']} steps",
      f"MFU peak: {res['peak_flops_per_device']:.3g} FLOP/s per device from "
      f"{res['peak_flops_source']}, x {res['devices']} device(s); model FLOPs/step "
      f"{res['flops_per_step']:.4g}",
      f"{'':18} {'median ms':>10} {'mean ms':>10} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>7} "
      f"{'XLA MiB':>8} {'params':>11} {'last loss':>9} {'compile s':>9} {'copies':>6} "
      f"{'transp':>6}"]
  for name in res.get("runners", ("project", "reference")):
    r = res[name]
    lines.append(f"{name:18} {r['median_ms']:10.1f} {r['mean_ms']:10.1f} "
                 f"{r['tokens_per_s']:10.0f} {r['model_flops_per_s'] / 1e12:8.3f} "
                 f"{100 * r['mfu']:6.1f}% {r['xla_bytes'] / mib:8.1f} {r['params']:11,d} "
                 f"{r['losses'][-1]:9.4f} {r['compile_s']:9.1f} {r['hlo_ops']['copy']:6d} "
                 f"{r['hlo_ops']['transpose']:6d}")
  lines.append(f"ratio = reference / project median step time = {res['ratio']:.3f} "
               "(>= 1.0: the project is at least as fast); of the fastest steps = "
               f"{res['reference']['min_ms'] / res['project']['min_ms']:.3f}")
  if "variant_ratio" in res:
    lines.append(f"variant = project with {res['variant_overrides']}; variant_ratio = project / "
                 f"variant median = {res['variant_ratio']:.3f} (> 1.0: the variant is faster); "
                 f"reference / variant = {res['variant_vs_reference']:.3f}")
  peaks = f"process peak RSS {res['process_peak_rss_bytes'] / mib:.0f} MiB"
  if res["device_peak_bytes"] is not None:
    peaks += f", device peak_bytes_in_use {res['device_peak_bytes'] / mib:.0f} MiB"
  lines.append(f"{peaks} (whole run, both steps); XLA MiB = compiled arg + out + temp - "
               "donated aliases, per device; copies / transp = static copy and transpose ops in the "
               "compiled HLO outside fusions")
  return "\n".join(lines)


def main(argv):
  log_setup.quiet_libraries()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _MODE.value == "inference":
    res = latency.benchmark_config(_CONFIG.value, batch_sizes=[int(b) for b in _BATCH_SIZES.value],
                                   warmup=_WARMUP.value, iters=_ITERS.value)
    print(latency.format_table([res]))
  else:
    devices = jax.devices()[:_DEVICES.value] if _DEVICES.value else None
    res = run_benchmark(_CONFIG.value, packed=_PACKED.value, steps=_STEPS.value,
                        rounds=_ROUNDS.value, warmup=_WARMUP.value, peak_flops=_PEAK.value,
                        devices=devices,
                        variant=dict(kv.split("=", 1) for kv in _VARIANT.value))
    print(format_table(res))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(res, f, indent=2)


if __name__ == "__main__":
  _define_flags()
  app.run(errors.exit_on_user_error(main))
