"""Post-training quantization of a trained Transformer with qwix (AQT's successor), and its
Orbax save/load. The command that writes a quantized run is infer/quantize.py.

Why: serving wants smaller, cheaper models without retraining or a second copy of the model
code. qwix's PTQ provider intercepts the `jax.lax.dot_general` calls made inside Linen modules
whose path matches a rule, so model/ stays as it is: the same `Transformer`, wrapped by
`qwix.quantize_model`, reads int8 kernels (qvalue + per-output-channel float scale) in place of
float ones.

Modes:
  f32 / bf16         the float model, compute dtype float32 / bfloat16 (bf16 also stores its
                     matrices in bf16).
  int8_weight_only   int8 kernels, dequantized to the compute dtype before a float matmul.
  w8a8               int8 kernels and dynamic (per-token, absmax) int8 activations: the
                     projection is an int8 x int8 -> int32 matmul, rescaled after.

What is quantized (QUANTIZED_MODULES): every projection inside the blocks (attention
query/key/value/out, MLP wi/wg/wo) and an untied `lm_head`. Kept float: the token embedding (a
gather) and hence the tied LM head, because `Embed.attend` reads the same table and qwix replaces
the parameter itself, which the gather cannot read; RMSNorm scales; the attention score and
value einsums (activations against activations); and the classifier head ([d_model, classes]:
nothing to save, and its logits are the decision).

Use: `qmodel, qparams = quantize(model, params, mode, tokens)` (or `load(folder)`), then
`qmodel.apply({"params": qparams}, tokens)` exactly as the float model.

Saved format: one Orbax checkpoint, items `params` (a plain nested dict: a quantized kernel is
{"qvalue": int8, "scale": float32}, the layout of qwix's pre-quantized checkpoints; everything
else as it is) and `meta` (JSON: the mode and the ModelConfig, enough to rebuild the model).
The command writes it as `<out>/quantized/` with the source run's record in `meta["run_meta"]`:
a quantized run, which infer/loading.py opens like any other (batch inference, serving,
evaluation).
"""
import dataclasses
import functools
import math
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import qwix

from model.config import ModelConfig
from model.transformer import Transformer

MODES = ("f32", "bf16", "int8_weight_only", "w8a8")
QUANTIZED_MODULES = r"block_\d+/(attn/(query|key|value|out)|mlp/(wi|wg|wo))|lm_head"


@functools.cache
def _with_aux() -> type:
  """qwix's quantized-parameter node, WithAux (the array and how it was quantized). qwix 0.1.8
  defines it only in the private qwix._src.providers.ptq and exports no name for it, so it is
  taken here as the type of the kernel that the public PTQ provider gives a one-unit Dense,
  initialised abstractly (nothing allocated; once, outside any model trace: _PtqProvider asks
  when it is made)."""
  dense = qwix.quantize_model(nn.Dense(1, use_bias=False), qwix.PtqProvider(
      [qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.int8)]))
  variables = jax.eval_shape(dense.init, jax.ShapeDtypeStruct((2,), jnp.uint32),
                             jax.ShapeDtypeStruct((1, 1), jnp.float32))
  return type(variables["params"]["kernel"])


def _is_quantized(x) -> bool:
  return isinstance(x, _with_aux())


@functools.cache
def _castable_with_aux() -> type:
  """WithAux whose astype works. `Projection` casts its kernel to the compute dtype before the
  dot; qwix 0.1.8's WithAux.astype hands the QArray to `update_boxed`, which accepts only boxed
  or plain arrays and raises. Casting a QArray sets its scale's (dequant) dtype. A subclass of
  the type _with_aux() finds, hence made on first use."""

  @flax.struct.dataclass
  class _CastableWithAux(_with_aux()):

    def astype(self, dtype):
      return self.replace(array=self.array.astype(dtype))

  return _CastableWithAux


class _PtqProvider(qwix.PtqProvider):
  """qwix's PTQ provider, handing modules castable WithAux kernels (_castable_with_aux) and
  keeping the caller's result dtype: qwix 0.1.8 drops `preferred_element_type`, so under
  bfloat16 compute an `output_f32` projection (the LM head) would return bfloat16 logits."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._castable = _castable_with_aux()   # found now, not inside the model's trace

  def nn_param(self, module, name, *args, **kwargs):
    value = super().nn_param(module, name, *args, **kwargs)
    return self._castable(value.array, value.how) if _is_quantized(value) else value

  def dot_general(self, *args, preferred_element_type=None, **kwargs):
    out = super().dot_general(*args, preferred_element_type=preferred_element_type, **kwargs)
    return out if preferred_element_type is None else out.astype(preferred_element_type)


def _bf16_storage(x):
  """The dtype mode "bf16" stores a parameter in: matrices bfloat16 (half the bytes, no
  per-call cast); vectors (norm scales, applied in float32 anyway) as they are."""
  return jnp.bfloat16 if x.ndim >= 2 else x.dtype


def _check_mode(mode: str):
  if mode not in MODES:
    raise ValueError(f"quantization mode {mode!r}; expected one of {MODES}")


def rules(mode: str) -> list:
  """qwix rules for an int8 mode: int8 weights, and for w8a8 also dynamic int8 activations."""
  act_qtype = jnp.int8 if mode == "w8a8" else None
  return [qwix.QuantizationRule(module_path=QUANTIZED_MODULES, weight_qtype=jnp.int8,
                                act_qtype=act_qtype)]


def build_model(cfg: ModelConfig, mode: str) -> nn.Module:
  """The model a mode runs: float modes set the compute dtype; int8 modes keep the config's
  compute dtype and wrap the model with qwix's PTQ provider."""
  _check_mode(mode)
  if mode in ("f32", "bf16"):
    dtype = "float32" if mode == "f32" else "bfloat16"
    return Transformer(dataclasses.replace(cfg, dtype=dtype))
  return qwix.quantize_model(Transformer(cfg), _PtqProvider(rules(mode)))


def _abstract_params(qmodel, sample_tokens):
  """The parameter tree `qmodel` reads, as ShapeDtypeStructs; quantized kernels are WithAux
  nodes that also carry how to quantize them (which axes get their own scale)."""
  variables = jax.eval_shape(qmodel.init, jax.random.PRNGKey(0), sample_tokens)
  return nn.meta.unbox(variables["params"])


def quantize(model: Transformer, params, mode: str, sample_tokens):
  """(model to apply, its params) for `mode`, from a float model and its float32 params
  (unboxed; numpy or jax arrays). `sample_tokens` [B, T] int32 only traces the model (any
  values): which dot_generals qwix quantizes, and how, is found by initialising it abstractly."""
  qmodel = build_model(model.cfg, mode)
  params = jax.tree.map(jnp.asarray, params)
  if mode == "f32":
    return qmodel, jax.tree.map(lambda x: x.astype(jnp.float32), params)
  if mode == "bf16":
    return qmodel, jax.tree.map(lambda x: x.astype(_bf16_storage(x)), params)
  abstract = _abstract_params(qmodel, sample_tokens)
  if not any(_is_quantized(x) for x in jax.tree.leaves(abstract, is_leaf=_is_quantized)):
    raise ValueError(f"no module of the model matches {QUANTIZED_MODULES!r}: nothing to "
                     "quantize (were the projections renamed?)")
  qparams = jax.jit(lambda p: qwix.quantize_params(p, abstract))(params)
  return qmodel, qparams


def param_bytes(params) -> int:
  """In-memory bytes of a (possibly quantized) parameter tree: int8 values and scales count."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


def kernel_bytes(params, qparams) -> tuple:
  """(float bytes, int8 + scale bytes) of the kernels that `qparams` holds quantized."""
  flat, flat_q = flax.traverse_util.flatten_dict(params), flax.traverse_util.flatten_dict(qparams)
  keys = [k for k, v in flat_q.items() if _is_quantized(v)]
  return sum(param_bytes(flat[k]) for k in keys), sum(param_bytes(flat_q[k]) for k in keys)


def _to_plain(qparams):
  """WithAux(QArray) nodes -> {"qvalue", "scale"} dicts: a tree of plain arrays for Orbax."""
  def plain(x):
    if not _is_quantized(x):
      return x
    if x.array.zero_point is not None:
      raise ValueError("asymmetric (zero-point) quantization is not supported by save()")
    return {"qvalue": x.array.qvalue, "scale": x.array.scale}
  return jax.tree.map(plain, qparams, is_leaf=_is_quantized)


def _from_plain(plain, abstract):
  """The inverse of _to_plain, the WithAux nodes (and how they quantize) taken from `abstract`."""
  def rebuild(abs_leaf, saved):
    if not _is_quantized(abs_leaf):
      return saved
    qarray = dataclasses.replace(abs_leaf.array, qvalue=saved["qvalue"], scale=saved["scale"])
    return abs_leaf.replace(array=qarray)
  return jax.tree.map(rebuild, abstract, plain, is_leaf=_is_quantized)


def save(path: str, qparams, meta: dict):
  """Writes `qparams` as they are (int8 values + scales) and `meta` to the new folder `path`.
  meta must hold "mode" and "model_config" (a dict of ModelConfig fields), which load() uses
  to rebuild the model; anything else JSON-serialisable rides along."""
  missing = {"mode", "model_config"} - set(meta)
  if missing:
    raise ValueError(f"save(): meta lacks {sorted(missing)} (load() rebuilds the model from "
                     "them)")
  _check_mode(meta["mode"])
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    ckpt.save(os.path.abspath(path), args=ocp.args.Composite(
        params=ocp.args.StandardSave(_to_plain(qparams)), meta=ocp.args.JsonSave(meta)))


def load_meta(path: str) -> dict:
  """The meta dict save() wrote to `path`."""
  path = os.path.abspath(path)
  if not os.path.isdir(os.path.join(path, "params")):
    raise FileNotFoundError(f"{path}: not a quantized checkpoint (no params/ folder; write "
                            "one with `python -m infer.quantize`)")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    return ckpt.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def load(path: str):
  """(model to apply, params, meta) from a folder written by save(); the params are bit
  identical to the saved ones, on the default device."""
  path = os.path.abspath(path)
  meta = load_meta(path)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    qmodel = build_model(ModelConfig(**meta["model_config"]), meta["mode"])
    abstract = _abstract_params(qmodel, jnp.zeros((1, 8), jnp.int32))
    if meta["mode"] == "bf16":
      abstract = jax.tree.map(lambda x: x.update(dtype=_bf16_storage(x)), abstract)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          _to_plain(abstract))
    plain = ckpt.restore(path, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target))).params
  return qmodel, _from_plain(plain, abstract), meta
