"""bf16 compute: model/layers.low_precision_matmul (bf16 operands in the forward *and* both
gradient matmuls, float32 accumulation) and the CPU dot-library choice for it (train/step.py)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import layers
from train import step as step_lib


def _inputs(x_shape, k_shape, seed=0):
  kx, kk = jax.random.split(jax.random.PRNGKey(seed))
  return jax.random.normal(kx, x_shape, jnp.float32), jax.random.normal(kk, k_shape) * 0.1


@pytest.mark.parametrize("x_shape,k_shape,n_in", [
    ((2, 5, 16), (16, 24), 1),            # an MLP / q-k-v projection
    ((2, 5, 4, 8), (4, 8, 16), 2),        # the attention output: [heads, head_dim] -> embed
])
def test_low_precision_matmul_matches_float32_autodiff_to_bf16_tolerance(x_shape, k_shape, n_in):
  x, k = _inputs(x_shape, k_shape)
  bf16 = jnp.bfloat16

  def ours(x, k):
    return jnp.sum(jnp.sin(layers.low_precision_matmul(x, k, n_in, bf16).astype(jnp.float32)))

  def plain(x, k):   # JAX's own autodiff of the same forward, in float32
    return jnp.sum(jnp.sin(layers._contract_last(x, k, n_in)))

  out = layers.low_precision_matmul(x, k, n_in, bf16)
  want = layers._contract_last(x.astype(bf16), k.astype(bf16), n_in).astype(bf16)
  chex.assert_trees_all_equal(out, want)          # the forward is the plain bf16 product
  gx, gk = jax.grad(ours, argnums=(0, 1))(x, k)
  rx, rk = jax.grad(plain, argnums=(0, 1))(x, k)
  assert gx.dtype == x.dtype and gk.dtype == jnp.float32   # each gradient in its input's dtype
  chex.assert_trees_all_close((gx, gk), (rx, rk), atol=5e-2, rtol=5e-2)
  # And not exactly float32: the gradient matmuls did round their operands to bf16.
  assert not np.allclose(np.asarray(gk), np.asarray(rk), atol=1e-6, rtol=1e-6)


def test_both_gradient_matmuls_take_bf16_operands():
  x, k = _inputs((3, 16), (16, 8))
  jaxpr = jax.make_jaxpr(jax.grad(
      lambda x, k: jnp.sum(layers.low_precision_matmul(x, k, 1, jnp.bfloat16)
                           .astype(jnp.float32) ** 2), argnums=(0, 1)))(x, k)
  dots = []

  def walk(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name == "dot_general":
        dots.append([v.aval.dtype for v in eqn.invars])
      for value in eqn.params.values():   # pjit / custom_vjp bodies
        inner = getattr(value, "jaxpr", value)
        if hasattr(inner, "eqns"):
          walk(inner)
  walk(jaxpr.jaxpr)
  assert len(dots) == 3, dots                    # forward + d/dx + d/dkernel
  assert all(d == [jnp.bfloat16, jnp.bfloat16] for d in dots), dots


def test_float32_projection_keeps_jax_autodiff():
  proj = layers.Projection((8,), ("embed", "mlp"), 0.1, jnp.float32)
  x = jnp.ones((2, 4))
  params = proj.init(jax.random.PRNGKey(0), x)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(proj.apply(p, x))))(params))
  assert "custom_vjp" not in jaxpr and "bf16" not in jaxpr


def test_auto_dot_library_follows_dtype_and_cpu(monkeypatch):
  monkeypatch.setattr(step_lib, "cpu_has_native_bf16", lambda: True)
  assert step_lib.resolve_cpu_dot_library("auto", "bfloat16") == "onednn"
  assert step_lib.resolve_cpu_dot_library("auto", "float32") == "ynn"
  monkeypatch.setattr(step_lib, "cpu_has_native_bf16", lambda: False)
  assert step_lib.resolve_cpu_dot_library("auto", "bfloat16") == "ynn"
  assert step_lib.resolve_cpu_dot_library("xla", "bfloat16") == "xla"
  with pytest.raises(ValueError, match="xla_cpu_dot_library='mkl'"):
    step_lib.resolve_cpu_dot_library("mkl")


def _saved_matmul_outputs(dtype: str, remat: str) -> int:
  """How many of the residuals remat keeps for the backward are matmul / projection outputs."""
  import contextlib
  import io
  from jax.ad_checkpoint import print_saved_residuals
  from model import transformer
  from tests import helpers
  cfg = helpers.tiny_model_cfg(vocab_size=97, remat=remat, dtype=dtype)
  model, tokens = transformer.Transformer(cfg), jnp.zeros((2, 16), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(lambda p: jnp.sum(model.apply({"params": p}, tokens)), params)
  return sum("dot_general" in line or layers.PROJECTION_NAME in line
             for line in out.getvalue().splitlines())


def test_remat_dots_saves_the_bf16_projections_too():
  # The bf16 projections' dots sit inside a custom VJP: without their checkpoint name the
  # "dots" policy would save none of them and act like "full".
  f32 = _saved_matmul_outputs("float32", "dots")
  assert f32 > 0 and _saved_matmul_outputs("float32", "full") == 0
  assert _saved_matmul_outputs("bfloat16", "dots") == f32
  assert _saved_matmul_outputs("bfloat16", "full") == 0


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "gelu_exact", "relu"])
def test_activated_down_projection_is_the_plain_composition(activation):
  """The fused activation + down projection computes what activation-then-projection computes,
  forward exactly and gradients to float tolerance, while saving only its inputs."""
  bf16 = jnp.bfloat16
  gated = activation in layers.GATED
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  pre = tuple(jax.random.normal(k, (2, 5, 32), jnp.float32).astype(bf16)
              for k in keys[:1 + gated])
  kernel = jax.random.normal(keys[2], (32, 16)) * 0.1
  act = layers._activation(activation)

  def fused(pre, k):
    out = layers.activated_down_projection(pre, k, activation, bf16)
    return jnp.sum(jnp.sin(out.astype(jnp.float32)))

  def plain(pre, k):
    out = layers.low_precision_matmul(act(*pre), k, 1, bf16)
    return jnp.sum(jnp.sin(out.astype(jnp.float32)))

  chex.assert_trees_all_equal(layers.activated_down_projection(pre, kernel, activation, bf16),
                              layers.low_precision_matmul(act(*pre), kernel, 1, bf16))
  got, want = (jax.grad(f, argnums=(0, 1))(pre, kernel) for f in (fused, plain))
  chex.assert_trees_all_equal_dtypes(got, want)
  chex.assert_trees_all_close(got, want, atol=1e-2, rtol=1e-2)
  from jax._src import ad_checkpoint
  saved = [(aval.shape, why) for aval, why in ad_checkpoint.saved_residuals(fused, pre, kernel)
           if "from the argument" not in why and "layers.py" in why]
  assert saved == [], saved   # nothing of the MLP's beyond its inputs


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_bf16_norms_keep_only_their_input_and_compute_the_same(norm):
  x = (jax.random.normal(jax.random.PRNGKey(2), (2, 6, 16)) * 3).astype(jnp.bfloat16)
  make = {"rmsnorm": lambda dt: layers.RMSNorm(1e-6, dt),
          "layernorm": lambda dt: layers.LayerNorm(1e-5, dt, True)}[norm]
  module = make(jnp.bfloat16)
  params = module.init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda p: p + 0.1 * jnp.arange(p.size).reshape(p.shape) / p.size,
                        params)
  ref = make(jnp.float32)   # the same math with autodiff's residuals; cast to bf16 after

  def loss(m, p, x):
    return jnp.sum(jnp.sin(m.apply(p, x).astype(jnp.bfloat16).astype(jnp.float32)))

  chex.assert_trees_all_equal(module.apply(params, x),
                              ref.apply(params, x).astype(jnp.bfloat16))
  chex.assert_trees_all_close(jax.grad(loss, argnums=(1, 2))(module, params, x),
                              jax.grad(loss, argnums=(1, 2))(ref, params, x),
                              atol=2e-2, rtol=2e-2)
  from jax._src import ad_checkpoint
  saved = [(aval.dtype, why) for aval, why in ad_checkpoint.saved_residuals(
      lambda x: loss(module, params, x), x) if "layers.py" in why]
  assert saved == [], saved   # the norm's float32 intermediates are recomputed, not kept
