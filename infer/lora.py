"""LoRA (low-rank adapters) on the Transformer through qwix, and merging adapters into the base.

Why qwix: its LoRA provider intercepts the `jax.lax.dot_general` of every Linen module whose
path matches a rule (as infer/quantize.py's PTQ does), so model/ stays unchanged: a projection
`y = x W` of a targeted module becomes `y = x W + (alpha / rank) * dropout(x) A B`, with A
[fan-in, rank] (he-uniform) and B [rank, fan-out] (zeros, so a fresh adapter changes nothing)
stored beside the kernel as `kernel_lora_a` / `kernel_lora_b`, carrying the kernel's logical
axis names (sharded like it).

Configured by `train.lora` (configs/common.py): rank (0 = off), alpha, dropout and targets, a
regex over module paths such as `block_0/attn/query` or `block_3/mlp/wo`; only the blocks'
projections (attention query/key/value/out, MLP wi/wg/wo) can be targeted.

A LoRA run's checkpoint holds the whole tree (frozen base + adapters; the optimizer state only
the adapters' and the task head's moments), so it resumes, evaluates and serves without its base
run. Every reader merges it: `infer/loading.py` restores a LoRA run's tree and returns merged
plain-Transformer parameters (`merge`), so inference, serving, quantization, distillation and
`train.init_from` take a LoRA run like any other; `python -m infer.lora_merge` writes the merged
run to disk (the export; and the adapters alone with --adapters_only).
"""
import dataclasses
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from qwix._src.utils import flax_util   # the module an intercepted op runs in (no public name)

from model import errors
from model.config import ModelConfig
from model.transformer import Transformer

DEFAULT_TARGETS = r"block_\d+/(attn/(query|key|value|out)|mlp/(wi|wg|wo))"
ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
# Parameter groups a LoRA run trains fully besides the adapters: the classifier head (new in a
# classifier fine-tuned from a language model or encoder) and its hidden layer (RoBERTa's and
# DistilBERT's heads have one). BERT's pooler belongs to the pre-trained encoder: frozen.
TRAINED_GROUPS = ("cls_head", "cls_hidden")


class LoraConfigError(errors.UserError):
  """A train.lora value that cannot work; the message names the key."""


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


def projection_paths(cfg: ModelConfig) -> list[str]:
  """Module paths LoRA can target: every projection (a module with a `kernel`) in the blocks."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = jax.eval_shape(lambda r: Transformer(cfg).init(r, tokens), jax.random.PRNGKey(0))
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(params["params"]))
  return sorted("/".join(k[:-1]) for k in flat
                if k[-1] == "kernel" and re.fullmatch(r"block_\d+", k[0]))


def check(spec: LoraSpec, cfg: ModelConfig) -> list[str]:
  """The module paths `spec` targets; LoraConfigError (one line, naming the key) otherwise."""
  if spec.rank < 1:
    raise LoraConfigError(f"config.train.lora.rank={spec.rank} must be >= 1 (0 turns LoRA off)")
  if not spec.alpha > 0:
    raise LoraConfigError(f"config.train.lora.alpha={spec.alpha} must be > 0")
  if not 0 <= spec.dropout < 1:
    raise LoraConfigError(f"config.train.lora.dropout={spec.dropout} must be in [0, 1)")
  try:
    pattern = re.compile(spec.targets)
  except re.error as e:
    raise LoraConfigError(f"config.train.lora.targets={spec.targets!r} is not a regex: {e}"
                          ) from None
  candidates = projection_paths(cfg)
  targets = [p for p in candidates if pattern.fullmatch(p)]
  if not targets:
    names = sorted({re.sub(r"^block_\d+/", r"block_\\d+/", p) for p in candidates})
    raise LoraConfigError(f"config.train.lora.targets={spec.targets!r} matches no projection; "
                          f"the model's are {', '.join(names)}")
  smallest = min(min(shape) for shape in _kernel_dims(cfg, targets))
  if spec.rank > smallest:
    raise LoraConfigError(f"config.train.lora.rank={spec.rank} exceeds the smallest targeted "
                          f"projection's input or output size ({smallest}): a low rank is the "
                          "point")
  return targets


def _kernel_dims(cfg: ModelConfig, paths: list[str]):
  """(fan-in, fan-out) of each targeted kernel, contracting its leading axes like Projection."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = jax.eval_shape(lambda r: Transformer(cfg).init(r, tokens), jax.random.PRNGKey(0))
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(params["params"]))
  for path in paths:
    shape = flat[tuple(path.split("/")) + ("kernel",)].shape
    n_out = _n_out(path, len(shape))
    yield (_prod(shape[:len(shape) - n_out]), _prod(shape[len(shape) - n_out:]))


def _n_out(path: str, ndim: int) -> int:
  """Output axes of a block kernel: query/key/value [embed, heads, head_dim] -> 2; out
  [heads, head_dim, embed] and the MLP's [in, out] -> 1."""
  return 2 if re.search(r"attn/(query|key|value)$", path) and ndim == 3 else 1


def _prod(xs) -> int:
  out = 1
  for x in xs:
    out *= int(x)
  return out


class _Provider(qwix.LoraProvider):
  """qwix's LoRA provider with dropout on the adapters' input only while training: qwix 0.1.8
  applies a rule's dropout on every call (and then needs a 'dropout' rng even in evaluation).
  Training applies the model with a 'dropout' rng (train/tasks/base.py), evaluation and
  decoding without one, so that decides."""

  def _get_current_rule_and_op_id(self, op_name, **kwargs):
    rule, op_id = super()._get_current_rule_and_op_id(op_name, **kwargs)
    if isinstance(rule, qwix.LoraRule) and rule.dropout > 0:
      module = flax_util.get_current_module()
      if not (isinstance(module, nn.Module) and module.has_rng("dropout")):
        rule = dataclasses.replace(rule, dropout=0.0)
    return rule, op_id


def lora_model(cfg: ModelConfig, spec: LoraSpec) -> nn.Module:
  """The Transformer with adapters on the projections `spec.targets` names (checked): applied
  and initialised exactly like the Transformer; its parameter tree adds the adapters.
  Apply it under jit or with jax arrays: qwix finds the kernel a dot_general reads among the
  module's jax-array params (by identity, or by tracing back a cast), so numpy params in an
  eager call would silently skip the adapters."""
  targets = check(spec, cfg)
  rule = qwix.LoraRule(module_path="|".join(re.escape(p) for p in targets), rank=spec.rank,
                       alpha=spec.alpha, dropout=spec.dropout)
  return qwix.apply_lora_to_model(Transformer(cfg), _Provider([rule]))


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
