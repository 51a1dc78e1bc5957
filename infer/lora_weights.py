"""A LoRA run's parameter tree, read without the LoRA model: the spec it trained with, which
leaves are adapters, where they sit, and merging them into the base kernels.

A LoRA run (train/lora.py builds its model) saves the whole tree: the frozen base plus, beside
each targeted kernel W, `kernel_lora_a` A [fan-in, rank] and `kernel_lora_b` B [rank, fan-out]
(qwix's layout: W's leading input axes flattened into fan-in, its output axes into fan-out).
Inference restores that tree and merges it, W + (alpha / rank) A B, into plain Transformer
parameters: array arithmetic on the tree, so infer/ never builds the LoRA model.
"""
import dataclasses
import math
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.transformer import Transformer

DEFAULT_TARGETS = r"block_\d+/(attn/(query|key|value|out)|mlp/(wi|wg|wo))"
ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
# Parameter groups a LoRA run trains fully besides the adapters: the classifier head (new in a
# classifier fine-tuned from a language model or encoder) and its hidden layer (RoBERTa's and
# DistilBERT's heads have one). BERT's pooler belongs to the pre-trained encoder: frozen.
TRAINED_GROUPS = ("cls_head", "cls_hidden")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """The hashable view of config.train.lora a model is built with."""
  rank: int
  alpha: float
  dropout: float = 0.0
  targets: str = DEFAULT_TARGETS

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_config(cls, lora_cfg) -> "LoraSpec | None":
    """None when LoRA is off (rank 0)."""
    if not lora_cfg["rank"]:
      return None
    return cls(int(lora_cfg["rank"]), float(lora_cfg["alpha"]), float(lora_cfg["dropout"]),
               str(lora_cfg["targets"]))


def spec_of_run_config(config) -> "LoraSpec | None":
  """The LoRA spec a run's recorded config (ConfigDict or dict) trained with, or None."""
  train = config["train"]
  return LoraSpec.from_config(train["lora"])


def _boxed_params(cfg: ModelConfig) -> dict:
  """The Transformer's parameters as flat {path tuple: ShapeDtypeStruct in its logical box}."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = jax.eval_shape(lambda r: Transformer(cfg).init(r, tokens), jax.random.PRNGKey(0))
  return _flat_boxed(params["params"])


def _flat_boxed(params) -> dict:
  return flax.traverse_util.flatten_dict(
      params, is_leaf=lambda _, v: isinstance(v, nn.meta.AxisMetadata))


def _is_projection(key: tuple) -> bool:
  """A kernel inside the blocks (attention query/key/value/out, MLP wi/wg/wo): LoRA's candidates."""
  return key[-1] == "kernel" and re.fullmatch(r"block_\d+", str(key[0])) is not None


def projection_shapes(cfg: ModelConfig) -> dict:
  """{module path: kernel shape} of what LoRA can target: every projection (a module with a
  `kernel`) in the blocks."""
  return {"/".join(k[:-1]): nn.meta.unbox(v).shape for k, v in _boxed_params(cfg).items()
          if _is_projection(k)}


def projection_paths(cfg: ModelConfig) -> list[str]:
  """Module paths LoRA can target, sorted."""
  return sorted(projection_shapes(cfg))


def _n_out(path: str, ndim: int) -> int:
  """Output axes of a block kernel: query/key/value [embed, heads, head_dim] -> 2; out
  [heads, head_dim, embed] and the MLP's [in, out] -> 1."""
  return 2 if re.search(r"attn/(query|key|value)$", path) and ndim == 3 else 1


def fan_in_out(path: str, shape: tuple) -> tuple[int, int]:
  """(fan-in, fan-out) of a block kernel as LoRA contracts it (its leading axes, like
  Projection): the shapes of A [fan-in, rank] and B [rank, fan-out]."""
  n_in = len(shape) - _n_out(path, len(shape))
  return math.prod(shape[:n_in]), math.prod(shape[n_in:])


def with_adapters(params, spec: LoraSpec):
  """A plain Transformer's abstract parameters (boxed with their logical axis names, as
  `init` under eval_shape gives them) plus the adapters a LoRA run trained with `spec` holds:
  A [fan-in, rank] named (the kernel's first axis, None) and B [rank, fan-out] named (None, its
  first output axis), in the kernel's dtype: the tree and placement qwix's LoRA model has."""
  flat = _flat_boxed(params)
  out = dict(flat)
  for key, box in flat.items():
    path = "/".join(key[:-1])
    if not (_is_projection(key) and re.fullmatch(spec.targets, path)):
      continue
    kernel = nn.meta.unbox(box)
    fan_in, fan_out = fan_in_out(path, kernel.shape)
    n_in = kernel.ndim - _n_out(path, kernel.ndim)
    names = box.names if isinstance(box, nn.LogicallyPartitioned) else (None,) * kernel.ndim
    for suffix, shape, axes in (("_lora_a", (fan_in, spec.rank), (names[0], None)),
                                ("_lora_b", (spec.rank, fan_out), (None, names[n_in]))):
      leaf = jax.ShapeDtypeStruct(shape, kernel.dtype)
      out[key[:-1] + (key[-1] + suffix,)] = (box.replace(value=leaf, names=axes)
                                             if isinstance(box, nn.LogicallyPartitioned) else leaf)
  return flax.traverse_util.unflatten_dict(out)


def is_adapter(path: tuple) -> bool:
  """Whether a flattened parameter path (tuple of names) is a LoRA adapter matrix."""
  return str(path[-1]).endswith(ADAPTER_SUFFIXES)


def is_trained(path: tuple) -> bool:
  """What a LoRA run trains: the adapters and TRAINED_GROUPS; everything else is frozen."""
  return is_adapter(path) or str(path[0]) in TRAINED_GROUPS


def adapters(params) -> dict:
  """Only the adapter matrices (and fully trained groups) of a LoRA parameter tree: what the
  run learned, for saving alone."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({k: v for k, v in flat.items() if is_trained(k)})


def merge(params, spec: LoraSpec):
  """Plain Transformer parameters from a LoRA tree: each targeted kernel W becomes
  W + (alpha / rank) * (A B) reshaped to W's shape (qwix contracts W's leading axes, so A B
  [fan-in, fan-out] is W flattened that way), computed in float32; the adapters are dropped."""
  flat = flax.traverse_util.flatten_dict(params)
  out = {}
  for key, value in flat.items():
    if is_adapter(key):
      continue
    a_key = key[:-1] + (f"{key[-1]}_lora_a",)
    if a_key in flat:
      a, b = flat[a_key], flat[key[:-1] + (f"{key[-1]}_lora_b",)]
      delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
      value = (value.astype(jnp.float32) + spec.scale * delta.reshape(value.shape)
               ).astype(value.dtype)
    out[key] = value
  return flax.traverse_util.unflatten_dict(out)
