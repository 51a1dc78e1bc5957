"""The GPU suite's inference section (bench/gpu_suite.py): a model served through
infer/loading.py, or a random-init one of configs/bench_step.py's shape, as f32 / bf16 / int8
(infer/ptq.py) forward latency at batch 1 and 32 on each device, and KV-cache greedy decode
tokens/s."""
import functools
import time

import jax
import numpy as np

from bench import gpu_table


def serving_model(student, shapes):
  """(label, float model, float32 params, task, seq_len) of --student or a random-init model."""
  from bench import latency
  from model.config import ModelConfig
  from model.transformer import Transformer
  if student:
    from infer import loading
    loaded = loading.LoadedModel.from_workdir(student, what="--student")
    if loaded.quantization != "none":
      raise ValueError(f"--student={student} is a quantized run; give the float run it was "
                       "made from (the suite quantizes it itself)")
    task = "classify" if loaded.kind == "classify" else "lm"
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), loaded.params)
    return (f"{student} (step {loaded.step})", loaded.model, params, task,
            min(loaded.config.data.seq_len, shapes.serve_seq))
  from configs import bench_step
  config = bench_step.get_config(shapes.serve_preset)
  model = Transformer(ModelConfig.from_config(config.model, config.data.vocab_size))
  params = jax.tree.map(np.asarray,
                        latency._init_params(model, 0))  # pylint: disable=protected-access
  return (f"random init, bench_step:{shapes.serve_preset} shape", model, params, "lm",
          min(config.data.seq_len, shapes.serve_seq))


def inference_section(table, shapes, devices, student, deadline):
  from bench import latency
  from infer import decode, ptq
  label, model, params, task, seq_len = serving_model(student, shapes)
  vocab = model.cfg.vocab_size
  rng = np.random.default_rng(0)
  sample = np.ones((1, 8), np.int32)
  table.add("inference", f"model: {label}, {latency.model_size(params)['params'] / 1e6:.1f}M "
            f"params, {task}, seq {seq_len}")
  for mode in ("f32", "bf16", "int8_weight_only"):
    qmodel, qparams = ptq.quantize(model, params, mode, sample)
    fn = latency.forward_fn(qmodel, task)
    for device in devices:
      if time.monotonic() > deadline:
        table.add("inference", f"{mode} on {device.platform}", result="skipped: time budget")
        continue
      try:
        res = latency.measure(fn, lambda b: (qparams, rng.integers(0, vocab, (b, seq_len),
                                                                  np.int32)),
                              batch_sizes=(1, 32), warmup=2, iters=10, seq_len=seq_len,
                              device=device)
      except Exception as e:  # pylint: disable=broad-except
        table.add("inference", f"{mode} on {device.platform}", result=gpu_table.one_line(e))
        continue
      for batch, r in res.items():
        x = r["xla_bytes"]
        table.add("inference", f"{mode} forward, batch {batch}, {device.platform}", r["p50_ms"],
                  f"{r['examples_per_s']:,.1f} examples/s", None if x is None else x["total"],
                  f"p95 {r['p95_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")
    if mode == "int8_weight_only":
      continue
    for batch in (1, 32):
      case = (f"{mode} KV-cache greedy decode, batch {batch}, prompt {shapes.decode_prompt} + "
              f"{shapes.decode_new} new, {devices[0].platform}")
      if time.monotonic() > deadline:
        table.add("inference", case, result="skipped: time budget")
        continue
      try:
        total = shapes.decode_prompt + shapes.decode_new
        tokens = jax.device_put(rng.integers(1, vocab, (batch, total), np.int32), devices[0])
        prompt_len = jax.device_put(np.full((batch,), shapes.decode_prompt, np.int32),
                                    devices[0])
        step = jax.jit(functools.partial(decode.greedy, qmodel, max_new=shapes.decode_new,
                                         eos_id=-1, prefix_lm=False))
        args = (jax.device_put(qparams, devices[0]), tokens, prompt_len)
        ms = gpu_table.time_ms(step, args)
        table.add("inference", case, ms,
                  f"{batch * shapes.decode_new / ms * 1e3:,.0f} new tokens/s")
      except Exception as e:  # pylint: disable=broad-except
        table.add("inference", case, result=gpu_table.one_line(e))
