"""Ahead-of-time check for big configs: build, shard and compile the train step, no data.

Reports parameter count, per-device memory of the compiled step and model FLOPs, so a pod-sized
config can be checked on a laptop (8 fake CPU devices) before it is launched.
"""
import jax

from model import sharding as sharding_lib
from model.config import ModelConfig
from model.transformer import Transformer
from train import optim, state as state_lib, step as step_lib, tasks
from train import metrics as metrics_lib


def compile_train_step(config):
  """Returns (compiled step, abstract state, model config, mesh) for `config`."""
  model_cfg = ModelConfig.from_config(config.model, config.data.vocab_size)
  model = Transformer(model_cfg)
  task = tasks.get_task(config.task)(model, config)
  tx, schedule = optim.make_optimizer(config.optim, config.train.num_steps)
  mesh = sharding_lib.make_mesh(config.mesh)
  abstract, shardings = state_lib.state_shardings(
      model, tx, task.dummy_batch(1, config.data.seq_len), mesh)
  compiled = step_lib.compile_train_step(
      task, tx, schedule, config.optim.grad_accum_steps, mesh, abstract, shardings,
      task.dummy_batch(config.data.batch_size, config.data.seq_len))
  return compiled, abstract, model_cfg, mesh


def report(config) -> dict:
  compiled, abstract, model_cfg, mesh = compile_train_step(config)
  n_params = state_lib.param_count(abstract.params)
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
