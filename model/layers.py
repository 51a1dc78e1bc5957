"""Basic layers: token embedding, RMSNorm / LayerNorm and the feed-forward block.

Every parameter carries logical axis names (see model/sharding.py for how they map onto the
device mesh). Parameters are stored in float32; `dtype` is the compute dtype they are cast to.

With a bfloat16 compute dtype (the accelerator presets) the layers also choose what the
backward pass keeps: a norm keeps only its bf16 input (its float32 intermediates are
recomputed), and the MLP keeps only its up (and gate) projections (the activation and its
output are recomputed) - elementwise work traded for most of the activation memory of a step
without remat (docs/results/gpu.md, "Memory"). Float32 runs (the small CPU presets) keep what
autodiff keeps.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

Dtype = Any
_init = nn.initializers


class Embed(nn.Module):
  """Token embedding; `attend` reuses the table as the (tied) output projection. Also the
  token-type table of the BERT family (axes ("types", "embed"))."""
  vocab_size: int
  features: int
  dtype: Dtype = jnp.float32
  axes: tuple = ("vocab", "embed")
  stddev: float = 1.0

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(_init.normal(stddev=self.stddev), self.axes),
        (self.vocab_size, self.features), jnp.float32)

  def __call__(self, tokens):
    # A gather, not a one-hot matmul: memory traffic dominates on CPU.
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, x):
    """Logits against the embedding table, accumulated in float32."""
    return jnp.einsum("btd,vd->btv", x, self.embedding.astype(self.dtype),
                      preferred_element_type=jnp.float32)


class RMSNorm(nn.Module):
  """Root-mean-square norm, computed in float32 whatever the compute dtype; with plus_one the
  scale is (1 + w), w starting at 0 (Gemma's parametrisation)."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  plus_one: bool = False

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(
        _init.zeros if self.plus_one else _init.ones, ("norm",)), (x.shape[-1],), jnp.float32)
    norm_fn = functools.partial(_rms_norm, eps=self.eps, plus_one=self.plus_one,
                                dtype=self.dtype)
    return _keep_input_only(norm_fn, self.dtype)(x, scale)


def _keep_input_only(fn, dtype):
  """`fn`, saving only its inputs for the backward pass when computing in low precision: a
  norm's float32 intermediates are 2-4x its bf16 input, and recomputing them is a few cheap
  elementwise ops and one reduction."""
  if jnp.dtype(dtype) == jnp.float32:
    return fn
  return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)


def _rms_norm(x, scale, *, eps, plus_one, dtype):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (y * (1.0 + scale if plus_one else scale)).astype(dtype)


class LayerNorm(nn.Module):
  """Mean-and-variance norm with a scale and (optionally) a bias, computed in float32."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(_init.ones, ("norm",)), (d,),
                       jnp.float32)
    bias = (self.param("bias", nn.with_logical_partitioning(_init.zeros, ("norm",)), (d,),
                       jnp.float32) if self.use_bias else None)
    norm_fn = functools.partial(_layer_norm, eps=self.eps, dtype=self.dtype)
    return _keep_input_only(norm_fn, self.dtype)(x, scale, bias)


def _layer_norm(x, scale, bias, *, eps, dtype):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale
  return (y if bias is None else y + bias).astype(dtype)


def norm(cfg, name: str):
  """The norm layer `cfg` (a ModelConfig) asks for."""
  if cfg.norm == "layernorm":
    return LayerNorm(cfg.norm_eps, cfg.compute_dtype, cfg.norm_bias, name=name)
  return RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.norm_plus_one, name=name)


PROJECTION_NAME = "projection"   # checkpoint_name of the bf16 projections' outputs


def _contract_last(x, k, n_in: int):
  """x [..., in...] . k [in..., out...] -> [..., out...], accumulated in float32."""
  return jax.lax.dot_general(x, k, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))),
                                    ((), ())), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def low_precision_matmul(x, kernel, n_in: int, dtype):
  """`x . kernel` with both cast to `dtype` (bf16), float32 accumulation, the result in `dtype`.
  Written out because JAX's own backward feeds the two gradient matmuls the float32 cotangent
  of the accumulator, so they run as float32 dots: here both take `dtype` operands (float32
  accumulation again), as mixed-precision training does on TPU. The gradients come back in
  the inputs' own dtypes (the float32 kernel's gradient stays float32)."""
  return _contract_last(x.astype(dtype), kernel.astype(dtype), n_in).astype(dtype)


def _lpm_fwd(x, kernel, n_in, dtype):
  return low_precision_matmul(x, kernel, n_in, dtype), (x, kernel)


def _lpm_bwd(n_in, dtype, residuals, g):
  x, kernel = residuals
  xl, kl, g = x.astype(dtype), kernel.astype(dtype), g.astype(dtype)
  n_out, lead = kernel.ndim - n_in, x.ndim - n_in
  dx = jax.lax.dot_general(g, kl, ((tuple(range(g.ndim - n_out, g.ndim)),
                                    tuple(range(n_in, kernel.ndim))), ((), ())),
                           preferred_element_type=jnp.float32)
  dk = jax.lax.dot_general(xl, g, ((tuple(range(lead)), tuple(range(lead))), ((), ())),
                           preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


low_precision_matmul.defvjp(_lpm_fwd, _lpm_bwd)


class Projection(nn.Module):
  """Bias-free linear map contracting the last `len(in_axes)` dims of x.

  The kernel is stored in its full named shape (e.g. [embed, heads, head_dim]) rather than
  flattened, so its logical axis names always match its rank. Accumulates in float32.
  """
  features: tuple
  axes: tuple            # logical names: input axes..., then one per feature dim
  stddev: float
  dtype: Dtype = jnp.float32
  output_f32: bool = False   # keep the float32 accumulator (e.g. for logits)
  use_bias: bool = False     # a bias over the feature dims (imported families)

  @nn.compact
  def __call__(self, x):
    n_in = len(self.axes) - len(self.features)
    kernel = _kernel(self, tuple(x.shape[-n_in:]) + tuple(self.features), self.axes,
                     self.stddev)
    if jnp.dtype(self.dtype) == jnp.bfloat16 and not self.output_f32:
      # Named: remat's "dots" policy cannot see the dot inside the custom VJP, so it saves the
      # projections by this name (model/transformer.py _REMAT_POLICIES).
      out = checkpoint_name(
          low_precision_matmul(x, kernel, n_in, jnp.dtype(self.dtype)), PROJECTION_NAME)
    else:
      out = _contract_last(x.astype(self.dtype), kernel.astype(self.dtype), n_in)
    if self.use_bias:
      out = out + _bias(self, tuple(self.features), self.axes[n_in:]).astype(self.dtype)
    return out if self.output_f32 else out.astype(self.dtype)


def _kernel(module: nn.Module, shape: tuple, axes: tuple, stddev: float):
  return module.param("kernel", nn.with_logical_partitioning(_init.normal(stddev=stddev), axes),
                      shape, jnp.float32)


def _bias(module: nn.Module, shape: tuple, axes: tuple):
  return module.param("bias", nn.with_logical_partitioning(_init.zeros, axes), shape,
                      jnp.float32)


def dense(features, axes, name, dtype, stddev, use_bias: bool = False):
  """A projection to `features` (int or tuple) whose kernel is named by `axes`."""
  features = (features,) if isinstance(features, int) else tuple(features)
  return Projection(features, tuple(axes), stddev, dtype, use_bias=use_bias, name=name)


_ACTIVATIONS = {
    "swiglu": lambda gate, up: nn.silu(gate) * up,   # gated SiLU (Llama)
    "geglu": lambda gate, up: nn.gelu(gate) * up,    # gated tanh-GELU (Gemma)
    "gelu": nn.gelu,                                 # tanh approximation (GPT-2's gelu_new)
    "gelu_exact": functools.partial(nn.gelu, approximate=False),   # erf GELU (BERT)
    "relu": nn.relu,
}
GATED = ("swiglu", "geglu")


def _activation(name: str):
  if name not in _ACTIVATIONS:
    raise ValueError(f"model.mlp_activation={name!r}; expected swiglu, geglu, gelu, gelu_exact "
                     "or relu")
  return _ACTIVATIONS[name]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def activated_down_projection(pre, kernel, activation: str, dtype):
  """`activation(*pre) . kernel` as low_precision_matmul computes it, saving only `pre` (the
  up, and gate, projections) for the backward pass: the activation's intermediates and its
  output [..., mlp] - 4 more arrays of that size for SwiGLU - are recomputed there."""
  return low_precision_matmul(_activation(activation)(*pre), kernel, 1, dtype)


def _adp_fwd(pre, kernel, activation, dtype):
  return activated_down_projection(pre, kernel, activation, dtype), (pre, kernel)


def _adp_bwd(activation, dtype, residuals, g):
  pre, kernel = residuals
  h, pullback = jax.vjp(_activation(activation), *pre)
  dh, dkernel = _lpm_bwd(1, dtype, (h, kernel), g)
  return tuple(pullback(dh)), dkernel


activated_down_projection.defvjp(_adp_fwd, _adp_bwd)


class ActivatedDown(nn.Module):
  """The MLP's down projection fed its activation's inputs (a Projection's params, "kernel"
  [mlp, embed] and "bias"): activated_down_projection, for bf16 compute."""
  features: int
  activation: str
  stddev: float
  dtype: Dtype = jnp.bfloat16
  use_bias: bool = False

  @nn.compact
  def __call__(self, pre: tuple):
    kernel = _kernel(self, (pre[0].shape[-1], self.features), ("mlp", "embed"), self.stddev)
    out = checkpoint_name(activated_down_projection(pre, kernel, self.activation,
                                                    jnp.dtype(self.dtype)), PROJECTION_NAME)
    if self.use_bias:
      out = out + _bias(self, (self.features,), ("embed",)).astype(self.dtype)
    return out


class Mlp(nn.Module):
  """Feed-forward block: GELU / ReLU (two matrices) or SwiGLU / GeGLU (three, gated)."""
  d_model: int
  mlp_dim: int
  activation: str = "swiglu"
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  use_bias: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    std_in, std_out = self.d_model ** -0.5, self.mlp_dim ** -0.5
    b = self.use_bias
    act = _activation(self.activation)
    up = dense(self.mlp_dim, ("embed", "mlp"), "wi", self.dtype, std_in, b)(x)
    pre = ((dense(self.mlp_dim, ("embed", "mlp"), "wg", self.dtype, std_in, b)(x), up)
           if self.activation in GATED else (up,))
    pre = tuple(nn.with_logical_constraint(
        p, ("activation_batch", "activation_length", "activation_mlp")) for p in pre)
    dropping = self.dropout_rate > 0 and not deterministic
    if jnp.dtype(self.dtype) == jnp.bfloat16 and not dropping:
      return ActivatedDown(self.d_model, self.activation, std_out, self.dtype, b,
                           name="wo")(pre)
    h = nn.Dropout(self.dropout_rate)(act(*pre), deterministic=deterministic)
    return dense(self.d_model, ("mlp", "embed"), "wo", self.dtype, std_out, b)(h)
