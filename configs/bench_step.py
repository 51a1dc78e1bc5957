"""Step-time benchmark shapes for bench/step_time.py (no data or tokenizer is read).

  python -m bench.step_time --config=configs/bench_step.py:cpu

Presets: `cpu` (default; ~30M params, minutes on 2 CPU cores), `gpu` (the project's `base`
model, 1.7B params, with a 50k vocabulary on one GPU), `anchor` (the shape of the plain-JAX
anchor step, 1.4B params: GELU MLP, untied head; docs/results/gpu.md) and `tiny` (seconds on
CPU, for tests). The optimizer, z-loss and clipping keep the
training defaults so the project's real step is timed; num_steps is large so that the lr
schedule is warm (past warmup, not decayed) for the steps measured.
"""
import ml_collections

from configs import common


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  preset = arg or "cpu"
  if preset not in PRESETS:
    raise ValueError(f"configs/bench_step.py: unknown preset {preset!r}; "
                     f"expected one of {sorted(PRESETS)}")
  config = common.base_config()
  config.preset = preset
  config.optim.warmup_steps = 10
  config.train.num_steps = 100_000
  PRESETS[preset](config)
  return config


def _cpu(config):
  config.data.update(vocab_size=8192, seq_len=512, batch_size=8)
  config.model.update(num_layers=6, d_model=512, num_heads=8, num_kv_heads=8, head_dim=64,
                      mlp_dim=2048, mlp_activation="swiglu", tie_embeddings=True,
                      dtype="float32")


def _gpu(config):
  # Batch 8 fits one 80 GiB GPU since the bf16 layers keep only their inputs for the backward
  # pass and the LM-head loss is chunked (docs/results/gpu.md, "Memory").
  config.data.update(vocab_size=50304, seq_len=2048, batch_size=8)
  config.model.update(num_layers=24, d_model=2048, num_heads=16, num_kv_heads=16, head_dim=128,
                      mlp_dim=8192, mlp_activation="swiglu", tie_embeddings=True,
                      dtype="bfloat16")
  config.train.peak_flops = 989e12   # H100 SXM dense bf16


def _anchor(config):
  # The plain-JAX anchor's shape: f32 params, bf16 compute, AdamW, no remat, one GPU.
  _gpu(config)
  config.model.update(mlp_activation="gelu", tie_embeddings=False)


def _tiny(config):
  # GQA and a separate head here so the tests cover the paths the larger presets skip.
  config.data.update(vocab_size=512, seq_len=32, batch_size=4)
  config.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
                      mlp_dim=128, mlp_activation="swiglu", tie_embeddings=False,
                      dtype="float32")


PRESETS = {"cpu": _cpu, "gpu": _gpu, "anchor": _anchor, "tiny": _tiny}
