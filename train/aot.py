"""Ahead-of-time check for big configs: build, shard and compile the train step, no data.

Reports parameter count, per-device memory of the compiled step and model FLOPs, so a pod-sized
config can be checked on a laptop (8 fake CPU devices) before it is launched.
"""
import jax

from train import build
from train import metrics as metrics_lib


def report(config) -> dict:
  """Resolves `config` like a run does, builds it and compiles its train step."""
  config, _ = build.resolve(config)
  parts = build.build(config)
  compiled = parts.compile_train_step()
  model_cfg, mesh = parts.model_cfg, parts.mesh
  n_params = parts.param_count()
  mem = compiled.memory_analysis()
  per_device = {}
  if mem is not None:
    per_device = {k: getattr(mem, k) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                               "temp_size_in_bytes")}
  tokens = config.data.batch_size * config.data.seq_len
  flops = metrics_lib.train_flops_per_token(model_cfg, config.data.seq_len) * tokens
  out = {"params": n_params, "mesh": dict(mesh.shape), "devices": jax.device_count(),
         "model_flops_per_step": flops, **per_device}
  print(f"AOT compile OK: {n_params / 1e6:.1f}M params on mesh {dict(mesh.shape)} "
        f"({jax.device_count()} {jax.devices()[0].platform} devices)")
  for k, v in per_device.items():
    print(f"  per-device {k}: {v / 2**30:.2f} GiB")
  print(f"  model FLOPs per step: {flops:.3e} ({tokens} tokens)")
  return out
