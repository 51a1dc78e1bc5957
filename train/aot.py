"""Ahead-of-time check for big configs: build, shard and compile the train step, no data.

Reports parameter count, per-device memory of the compiled step and model FLOPs, so a pod-sized
config can be checked on a laptop before it is launched: on 8 fake CPU devices (XLA:CPU's
memory numbers say little about an accelerator), or, with `topology="v5p-128"` (train.main's
--aot_topology), for a real TPU slice by the real TPU compiler (libtpu) on a host without a TPU:
per-chip HBM against the chip's capacity, a fits / does-not-fit line, the compiler's FLOPs and
bytes per step, the collectives in the compiled program (train/topologies.py), and a predicted
step time from the program's FLOPs, HBM bytes and collective bytes with loops multiplied out
(train/hlo_walk.py, train/step_model.py).
"""
import contextlib
import pickle
import re
import time

import jax

from model import sharding as sharding_lib
from model.attention import platform
from train import build
from train import hlo_walk
from train import metrics as metrics_lib
from train import step_model
from train import topologies

_MEMORY_KEYS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                "generated_code_size_in_bytes", "alias_size_in_bytes")


def memory(compiled) -> dict:
  """Per-device bytes of a compiled step; total = arguments + outputs - aliased (donated) +
  temporaries + generated code."""
  mem = compiled.memory_analysis()
  if mem is None:
    return {}
  out = {k: int(getattr(mem, k, 0) or 0) for k in _MEMORY_KEYS}
  out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                        - out["alias_size_in_bytes"] + out["temp_size_in_bytes"]
                        + out["generated_code_size_in_bytes"])
  return out


def cost(compiled) -> dict:
  """The compiler's FLOPs and bytes accessed per step, per device (empty where it has none)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  return {k: float(analysis[key]) for k, key in (("compiler_flops", "flops"),
                                                  ("compiler_bytes_accessed", "bytes accessed"))
          if key in analysis}


def save(compiled, path: str) -> str:
  """Writes the compiled step: HLO text for *.hlo / *.txt, else the serialized executable
  (jax.experimental.serialize_executable, pickled), falling back to HLO text."""
  if not path.endswith((".hlo", ".txt")):
    try:
      from jax.experimental import serialize_executable
      blob = serialize_executable.serialize(compiled)
      with open(path, "wb") as f:
        pickle.dump(blob, f)
      return "serialized executable"
    except Exception:  # pylint: disable=broad-except
      pass
  with open(path, "w") as f:
    f.write(compiled.as_text())
  return "HLO text"


def _hbm_shortfall(message: str) -> int | None:
  """Bytes of temporaries in libtpu's "Ran out of memory on HBM" refusal, else None."""
  found = re.search(r"RESOURCE_EXHAUSTED: Ran out of memory on HBM.*?temporaries "
                    r"\(([0-9.]+)([KMGT])\)", message, re.S)
  if not found:
    return None
  return int(float(found.group(1)) * 1024 ** " KMGT".index(found.group(2)))


def _target(config, topology: str | None):
  """(resolved config, its build.Sources, TPU slice or None, devices, mesh or None, HBM bytes
  per device, peak FLOP/s per device): this host's devices, or the TPU slice `topology` names."""
  if not topology:
    config, sources = build.resolve(config)
    return config, sources, None, jax.devices(), None, None, None
  tpu_slice = topologies.parse(topology)
  topologies.quiet_libtpu_env(tpu_slice)
  devices = topologies.devices(tpu_slice)
  capacity = topologies.hbm_per_device(tpu_slice, len(devices))
  peak = tpu_slice.chip.peak_bf16_flops * tpu_slice.num_chips / len(devices)
  hosts = len({d.process_index for d in devices})
  config, sources = build.resolve(config, num_devices=len(devices), process_count=hosts)
  try:
    mesh = sharding_lib.make_mesh(config.mesh, devices)
  except ValueError as e:
    raise topologies.TopologyError(f"--aot_topology={topology}: {e}") from None
  return config, sources, tpu_slice, devices, mesh, capacity, peak


def _slice_fit(out: dict, compiled, mem: dict, tpu_slice, capacity: int, peak: float, mesh):
  """Adds to `out` and prints what a TPU slice's compile tells: the collectives, whether it
  fits in HBM (`mem`: the step's per-device bytes), the step time at 100% MFU and the
  predicted step time."""
  text = compiled.as_text()
  out["collectives"] = topologies.count_collectives(text)
  counts = hlo_walk.walk(text, out["devices"])
  out["collectives_per_step"] = hlo_walk.count_by_kind(counts.collectives)
  out["hbm_per_device_bytes"] = capacity
  out["chips"] = tpu_slice.num_chips
  out["fits"] = bool(mem) and mem["total_bytes"] <= capacity
  ideal_s = out["model_flops_per_step"] / out["devices"] / peak
  out["ideal_step_s"] = ideal_s
  print("  collectives in the compiled step (static count): " +
        ", ".join(f"{k} {v}" for k, v in out["collectives"].items()))
  # The FSDP weight gathers and gradient reductions sit in the scanned layers' while body:
  # a static count sees each once; run counts multiply by the trip count.
  print("  collectives run per step (loops multiplied out): " +
        ", ".join(f"{k} {v}" for k, v in out["collectives_per_step"].items()) +
        f"; loops (body, trips): {counts.loops[:6]}")
  print(f"  at 100% MFU ({peak / 1e12:.0f} TFLOP/s bf16 per device) a step takes "
        f"{1e3 * ideal_s:.3g} ms")
  pred = step_model.predict(counts, tpu_slice.chip, step_model.Layout.of_mesh(mesh),
                            out["devices"] / tpu_slice.num_chips, ideal_s * peak)
  out.update(pred)
  for line in step_model.summary(pred, out["tokens_per_step"], tpu_slice.num_chips):
    print(line)
  if mem:
    print(f"  {topologies.fit_line(mem['total_bytes'], capacity)} "
          f"({tpu_slice.chip.generation}, {capacity / 2**30:.0f} GiB HBM per device)")


def report(config, topology: str | None = None, save_path: str | None = None) -> dict:
  """Resolves `config` like a run does, builds it and compiles its train step, for this host's
  devices or for the TPU slice `topology` names (v5p-128, v5e-256, v6e-256, v4-8, v5e:16x16)."""
  config, sources, tpu_slice, devices, mesh, capacity, peak = _target(config, topology)
  t0 = time.perf_counter()
  # A TPU slice's step is traced with the kernels a TPU process would choose, not this host's.
  target = lambda: platform.compiling_for("tpu") if tpu_slice else contextlib.nullcontext()
  with target():
    parts = build.build(config, mesh, sources.model_cfg)
  try:
    with target():
      compiled = parts.compile_train_step()
  except jax.errors.JaxRuntimeError as e:
    needed = _hbm_shortfall(str(e)) if tpu_slice else None
    if needed is None:
      raise
    # The TPU compiler refuses a program whose temporaries exceed HBM; that is the answer.
    print(f"AOT compile for {tpu_slice.name}: does not fit: the TPU compiler needs "
          f"{needed / 2**30:.2f} GiB of temporaries per device, more than the "
          f"{capacity / 2**30:.0f} GiB of HBM ({time.perf_counter() - t0:.0f} s)")
    return {"params": parts.param_count(), "mesh": dict(parts.mesh.shape),
            "devices": len(devices), "remat": config.model.remat, "fits": False,
            "temp_size_in_bytes": needed, "hbm_per_device_bytes": capacity,
            "compile_s": time.perf_counter() - t0}
  compile_s = time.perf_counter() - t0
  model_cfg, mesh = parts.model_cfg, parts.mesh
  n_params = parts.param_count()
  mem = memory(compiled)
  tokens = config.data.batch_size * config.data.seq_len
  flops = metrics_lib.train_flops_per_token(model_cfg, config.data.seq_len) * tokens
  kind = devices[0].device_kind if tpu_slice else devices[0].platform
  out = {"params": n_params, "mesh": dict(mesh.shape), "devices": len(devices),
         "device_kind": kind, "model_flops_per_step": flops, "tokens_per_step": tokens,
         "compile_s": compile_s, "remat": config.model.remat, **mem, **cost(compiled)}
  where = f"{len(devices)} {kind} devices"
  if tpu_slice:
    slices = f"{tpu_slice.num_slices} x " if tpu_slice.num_slices > 1 else ""
    where += f", {tpu_slice.name} = {slices}{tpu_slice.topology}, {tpu_slice.num_chips} chips"
  print(f"AOT compile OK in {compile_s:.0f} s: {n_params / 1e6:.1f}M params on mesh "
        f"{dict(mesh.shape)} ({where}), remat={config.model.remat}, "
        f"batch {config.data.batch_size} x seq {config.data.seq_len}")
  for k in _MEMORY_KEYS[:4]:
    if k in mem:
      print(f"  per-device {k}: {mem[k] / 2**30:.2f} GiB")
  if mem:
    print(f"  per-device total (arguments + outputs - donated aliases + temporaries + code): "
          f"{mem['total_bytes'] / 2**30:.2f} GiB")
  print(f"  model FLOPs per step: {flops:.3e} ({tokens} tokens; "
        f"{flops / len(devices):.3e} per device)")
  if "compiler_flops" in out:
    # XLA's cost analysis counts a loop body once: with scanned layers that is one block.
    loop = (" (the scanned block counted once, not x num_layers)"
            if config.model.scan_layers else "")
    print(f"  compiler cost analysis per device: {out['compiler_flops']:.3e} FLOPs, "
          f"{out.get('compiler_bytes_accessed', float('nan')):.3e} bytes accessed{loop}")
  if tpu_slice:
    _slice_fit(out, compiled, mem, tpu_slice, capacity, peak, mesh)
  if save_path:
    what = save(compiled, save_path)
    print(f"  saved the compiled step ({what}) to {save_path}")
  return out
