"""A frozen, hashable view of `config.model` (Flax module attributes must be hashable)."""
import dataclasses

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_CHOICES = {
    "mlp_activation": ("swiglu", "gelu"),
    "positions": ("rope", "learned"),
    "remat": ("none", "full", "dots"),
    "dtype": tuple(_DTYPES),
    "pooling": ("mean", "last"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  mlp_activation: str = "swiglu"
  positions: str = "rope"
  rope_theta: float = 10_000.0
  max_len: int = 8192
  tie_embeddings: bool = True
  dtype: str = "float32"
  remat: str = "none"
  dropout_rate: float = 0.0
  attention_kind: str = "full"
  attention_implementation: str = "auto"
  attention_block_size: int = 128
  attention_window: int = 512      # used by attention_kind="local" only
  attention_num_global: int = 0
  num_classes: int = 0             # > 0: the model is a classifier (pooled state -> classes)
  pooling: str = "mean"

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int) -> "ModelConfig":
    m = model_cfg
    attn = m.attention
    out = cls(vocab_size=vocab_size, num_layers=m.num_layers, d_model=m.d_model,
              num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
              mlp_dim=m.mlp_dim, mlp_activation=m.mlp_activation, positions=m.positions,
              rope_theta=m.rope_theta, max_len=m.max_len, tie_embeddings=m.tie_embeddings,
              dtype=m.dtype, remat=m.remat, dropout_rate=m.dropout_rate,
              attention_kind=attn.kind, attention_implementation=attn.implementation,
              attention_block_size=attn.block_size, attention_window=attn.window,
              attention_num_global=attn.num_global, num_classes=m.num_classes,
              pooling=m.pooling)
    out.validate()
    return out

  def validate(self):
    for key, choices in _CHOICES.items():
      if getattr(self, key) not in choices:
        raise ValueError(f"config.model.{key}={getattr(self, key)!r}; expected one of {choices}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"config.model.num_heads={self.num_heads} must be a multiple of "
                       f"config.model.num_kv_heads={self.num_kv_heads}")
    if self.num_classes < 0 or self.num_classes == 1:
      raise ValueError(f"config.model.num_classes={self.num_classes}: expected 0 (language "
                       "model) or at least 2 classes")
    for key, low in (("block_size", 1), ("window", 1), ("num_global", 0)):
      if getattr(self, f"attention_{key}") < low:
        raise ValueError(f"config.model.attention.{key}={getattr(self, f'attention_{key}')} "
                         f"must be >= {low}")
    for key in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim",
                "mlp_dim"):
      if getattr(self, key) <= 0:
        raise ValueError(f"config.model.{key}={getattr(self, key)} must be positive")
