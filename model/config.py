"""A frozen, hashable view of `config.model` (Flax module attributes must be hashable).

Its fields, defaults and choices come from the one declaration of the model's keys,
configs/model_schema.py: `config.model.<key>` is field <key>, `config.model.attention.<key>`
is field attention_<key>, and vocab_size comes from config.data.vocab_size.
"""
import dataclasses

import jax.numpy as jnp

from configs import model_schema

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _fields():
  """(field name, schema Key, dotted path under config.model) of every declared key."""
  for key in model_schema.MODEL_KEYS:
    yield key.name, key, key.name
  for key in model_schema.ATTENTION_KEYS:
    yield f"attention_{key.name}", key, f"attention.{key.name}"


class _Methods:
  """ModelConfig's behaviour; its fields are made from the schema below."""

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int) -> "ModelConfig":
    """The validated ModelConfig of a config.model section that holds every declared key (a
    recorded run's config is brought up to date by infer.loading.open_run first)."""
    missing = [path for _, _, path in _fields() if _lookup(model_cfg, path) is _MISSING]
    if missing:
      raise ValueError(f"config.model lacks {', '.join(missing)}: expected every key of "
                       "configs/model_schema.py (open a recorded run with "
                       "infer.loading.open_run, which brings its config up to date)")
    out = cls(vocab_size=vocab_size,
              **{field: _lookup(model_cfg, path) for field, _, path in _fields()})
    out.validate()
    return out

  def validate(self):
    for field, key, path in _fields():
      value = getattr(self, field)
      if key.choices and value not in key.choices:
        raise ValueError(f"config.model.{path}={value!r}; expected one of {key.choices}")
      if key.minimum is not None and value < key.minimum:
        raise ValueError(f"config.model.{path}={value} must be >= {key.minimum}")
    if self.vocab_size <= 0:
      raise ValueError(f"config.model.vocab_size={self.vocab_size} must be positive")
    if self.norm_plus_one and self.norm != "rmsnorm":
      raise ValueError("config.model.norm_plus_one needs config.model.norm='rmsnorm'")
    if self.norm_bias and self.norm != "layernorm":
      raise ValueError("config.model.norm_bias needs config.model.norm='layernorm'")
    if self.position_offset and self.positions != "learned":
      raise ValueError("config.model.position_offset needs config.model.positions='learned'")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"config.model.num_heads={self.num_heads} must be a multiple of "
                       f"config.model.num_kv_heads={self.num_kv_heads}")
    if self.num_classes == 1:
      raise ValueError(f"config.model.num_classes={self.num_classes}: expected 0 (language "
                       "model) or at least 2 classes")


_MISSING = object()


def _lookup(model_cfg, path: str):
  """model_cfg[path] for a dotted path (a ConfigDict or a dict), _MISSING if absent."""
  node = model_cfg
  for part in path.split("."):
    if part not in node:
      return _MISSING
    node = node[part]
  return node


ModelConfig = dataclasses.make_dataclass(
    "ModelConfig",
    [("vocab_size", int)] + [(field, type(key.default), dataclasses.field(default=key.default))
                             for field, key, _ in _fields()],
    bases=(_Methods,), frozen=True)
ModelConfig.__module__ = __name__   # pickles and reprs as model.config.ModelConfig
ModelConfig.__doc__ = ("The model's hyper-parameters: vocab_size, then every key of "
                       "configs/model_schema.py (attention.<key> as attention_<key>).")
