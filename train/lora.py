"""LoRA (low-rank adapters) on the Transformer through qwix: the model a LoRA run trains.

Why qwix: its LoRA provider intercepts the `jax.lax.dot_general` of every Linen module whose
path matches a rule (as infer/ptq.py's PTQ does), so model/ stays unchanged: a projection
`y = x W` of a targeted module becomes `y = x W + (alpha / rank) * dropout(x) A B`, with A
[fan-in, rank] (he-uniform) and B [rank, fan-out] (zeros, so a fresh adapter changes nothing)
stored beside the kernel as `kernel_lora_a` / `kernel_lora_b`, carrying the kernel's logical
axis names (sharded like it).

Configured by `train.lora` (configs/common.py): rank (0 = off), alpha, dropout and targets, a
regex over module paths such as `block_0/attn/query` or `block_3/mlp/wo`; only the blocks'
projections (attention query/key/value/out, MLP wi/wg/wo) can be targeted.

A LoRA run's checkpoint holds the whole tree (frozen base + adapters; the optimizer state only
the adapters' and the task head's moments), so it resumes, evaluates and serves without its base
run. Every reader merges it without this model: `infer/loading.py` restores a LoRA run's tree and
returns merged plain-Transformer parameters (infer/lora_weights.py, which also holds the spec
and the tree's layout shared with training), so inference, serving, quantization, distillation
and `train.init_from` take a LoRA run like any other; `python -m infer.lora_merge` writes the
merged run to disk (the export; and the adapters alone with --adapters_only).
"""
import dataclasses
import re

import flax.linen as nn
import qwix
from qwix._src.utils import flax_util   # the module an intercepted op runs in (no public name)

# The spec and the tree's layout are shared with inference, which merges without this model;
# LoraSpec and is_trained are the names training uses.
from infer import lora_weights
from infer.lora_weights import LoraSpec, is_trained  # noqa: F401
from model import errors
from model.config import ModelConfig
from model.transformer import Transformer


class LoraConfigError(errors.UserError):
  """A train.lora value that cannot work; the message names the key."""


def check(spec: LoraSpec, cfg: ModelConfig) -> list[str]:
  """The module paths `spec` targets; LoraConfigError (one line, naming the key) otherwise."""
  if spec.rank < 1:
    raise LoraConfigError(f"config.train.lora.rank={spec.rank} must be >= 1 (0 turns LoRA off)")
  if not spec.alpha > 0:
    raise LoraConfigError(f"config.train.lora.alpha={spec.alpha} must be > 0")
  if not 0 <= spec.dropout < 1:
    raise LoraConfigError(f"config.train.lora.dropout={spec.dropout} must be in [0, 1)")
  if cfg.dtype != "float32":
    # qwix adds its adapter where it intercepts a dot_general; the bf16 projections run their
    # dots inside a custom VJP (model/layers.py), where an adapter's params would leak tracers.
    raise LoraConfigError(f"config.train.lora needs config.model.dtype='float32' (got "
                          f"{cfg.dtype!r}): the bf16 projections' custom gradients hide their "
                          "matmuls from qwix's LoRA")
  try:
    pattern = re.compile(spec.targets)
  except re.error as e:
    raise LoraConfigError(f"config.train.lora.targets={spec.targets!r} is not a regex: {e}"
                          ) from None
  shapes = lora_weights.projection_shapes(cfg)
  candidates = sorted(shapes)
  targets = [p for p in candidates if pattern.fullmatch(p)]
  if not targets:
    names = sorted({re.sub(r"^block_\d+/", r"block_\\d+/", p) for p in candidates})
    raise LoraConfigError(f"config.train.lora.targets={spec.targets!r} matches no projection; "
                          f"the model's are {', '.join(names)}")
  smallest = min(min(lora_weights.fan_in_out(p, shapes[p])) for p in targets)
  if spec.rank > smallest:
    raise LoraConfigError(f"config.train.lora.rank={spec.rank} exceeds the smallest targeted "
                          f"projection's input or output size ({smallest}): a low rank is the "
                          "point")
  return targets


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
