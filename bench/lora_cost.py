r"""LoRA against full fine-tuning on the same model and data: optimizer-state bytes, the XLA
memory of the compiled train step and its step time.

  python -m bench.lora_cost --shapes=imdb_lm,d512 --rank=8 --steps=5

Both variants are built by train/build.py from configs/sentiment_finetune.py (a classifier, the
LoRA run's shape) with the architecture set here, and run the real compiled step on the same
random batch (weights random too: the cost does not depend on their values). Prints one Markdown
row per (shape, variant).
"""
import time

import jax
import numpy as np
from absl import app, flags

from configs import sentiment_finetune
from model import errors
from model import log_setup
from train import build

SHAPES = {   # model.* updates; data.seq_len x batch_size
    "imdb_lm": (dict(num_layers=4, d_model=128, num_heads=4, num_kv_heads=4, head_dim=32,
                     mlp_dim=512), 8192, 256, 32),
    "d512": (dict(num_layers=6, d_model=512, num_heads=8, num_kv_heads=8, head_dim=64,
                  mlp_dim=2048), 8192, 256, 8),
}


def _bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def measure(shape: str, rank: int, steps: int) -> dict:
  model, vocab, seq_len, batch = SHAPES[shape]
  config = sentiment_finetune.get_config("imdb")
  config.model.update(dropout_rate=0.0, **model)
  config.data.update(vocab_size=vocab, seq_len=seq_len, batch_size=batch)
  config.train.update(num_steps=1000)
  config.train.lora.rank = rank
  parts = build.build(config)
  state = parts.init_state()
  batch_arrays = parts.dummy_batch()
  rng = np.random.default_rng(0)
  batch_arrays["tokens"] = rng.integers(1, vocab, batch_arrays["tokens"].shape).astype(np.int32)
  batch_arrays["label"] = rng.integers(0, 2, batch_arrays["label"].shape).astype(np.int32)
  compiled = parts.compile_train_step()
  memory = compiled.memory_analysis()
  times = []
  for _ in range(steps + 1):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch_arrays)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  trained = sum(int(np.prod(x.shape)) for p, x in jax.tree_util.tree_leaves_with_path(
      parts.abstract.params) if parts.trainable is None or parts.trainable(
          tuple(k.key for k in p)))
  return {"shape": shape, "variant": f"LoRA r={rank}" if rank else "full",
          "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(parts.abstract.params)),
          "trained": trained, "opt_bytes": _bytes(parts.abstract.opt_state),
          "xla_args": memory.argument_size_in_bytes, "xla_temp": memory.temp_size_in_bytes,
          "step_ms": 1e3 * float(np.median(times[1:]))}


def main(argv):
  del argv
  log_setup.quiet_libraries()
  f = flags.FLAGS
  mib = lambda n: f"{n / 2**20:.2f}"
  print("| model | variant | params | trained | optimizer state MiB | XLA args MiB | "
        "XLA temp MiB | step ms |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for shape in f.shapes.split(","):
    for rank in (0, f.rank):
      r = measure(shape, rank, f.steps)
      print(f"| {r['shape']} | {r['variant']} | {r['params']:,} | {r['trained']:,} | "
            f"{mib(r['opt_bytes'])} | {mib(r['xla_args'])} | {mib(r['xla_temp'])} | "
            f"{r['step_ms']:,.0f} |", flush=True)


if __name__ == "__main__":
  flags.DEFINE_string("shapes", "imdb_lm,d512", f"Comma-separated, from {sorted(SHAPES)}.")
  flags.DEFINE_integer("rank", 8, "LoRA rank.")
  flags.DEFINE_integer("steps", 5, "Timed steps (after one compiling step).")
  app.run(errors.exit_on_user_error(main))
