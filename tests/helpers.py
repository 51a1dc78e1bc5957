"""Shared builders for the model / sharding / checkpoint tests: tiny configs, meshes, batches.

Random initialisation through jax.random compiles slowly on small CPU machines, so tests that
only need *some* parameter values fill the abstract (eval_shape'd) parameter tree with numpy
draws instead; tests that need the real initialiser (sharding, checkpoints) use create_state.
"""
import dataclasses

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from configs import common
from model import sharding as sharding_lib
from model.config import ModelConfig

# Tolerances used throughout, stated once.
F32_RTOL, F32_ATOL = 1e-5, 1e-5
BF16_RTOL, BF16_ATOL = 2e-2, 2e-2


def tiny_model_cfg(**overrides) -> ModelConfig:
  """2 layers, d_model 32, 4 query heads over 2 KV heads, vocab 64."""
  base = dict(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
              mlp_dim=64)
  base.update(overrides)
  cfg = ModelConfig(**base)
  cfg.validate()
  return cfg


def numpy_params(model, tokens, seed: int = 0):
  """A float32 parameter tree of the model's real structure, drawn with numpy (no compile)."""
  abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:          # RMSNorm scales: around 1
      x = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    elif "'embedding'" in name:  # token table: N(0, 1) rows, as the real init
      x = rng.standard_normal(leaf.shape)
    else:                        # projections and the position table
      x = 0.2 * rng.standard_normal(leaf.shape)
    return np.asarray(x, leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, abstract)


def mesh_from(devices, shape) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh of exactly `devices`, in order."""
  return Mesh(np.asarray(devices).reshape(shape), sharding_lib.MESH_AXES)


def optim_cfg(**overrides):
  c = common.base_config().optim
  c.update(warmup_steps=0, lr=1e-2)
  c.update(**overrides)
  return c


def lm_batch(batch: int, seq_len: int, vocab: int, seed: int = 0, packed: bool = True) -> dict:
  """int32 tokens/segment_ids/positions; with `packed`, rows hold 2-3 documents and padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, size=(batch, seq_len), dtype=np.int32)
  segs = np.ones((batch, seq_len), np.int32)
  pos = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy()
  if packed:
    for r in range(batch):
      cuts = sorted(rng.choice(np.arange(2, seq_len - 2), size=2, replace=False))
      bounds = [0, *cuts, seq_len]
      for d, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        segs[r, a:b] = d + 1
        pos[r, a:b] = np.arange(b - a)
      if r % 2:   # trailing padding on odd rows
        segs[r, -2:] = 0
        pos[r, -2:] = 0
        tokens[r, -2:] = 0
  return {"tokens": tokens, "segment_ids": segs, "positions": pos}


def replace_cfg(cfg: ModelConfig, **changes) -> ModelConfig:
  return dataclasses.replace(cfg, **changes)
