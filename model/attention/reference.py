"""Naive O(N^2) masked attention in float32: the yardstick every kernel is tested against."""
import jax
import jax.numpy as jnp

from model.attention import masks


def attend(q, k, v, *, spec: masks.MaskSpec, mask_inputs: masks.MaskInputs, **unused):
  """q [B, T, H, D], k/v [B, S, K, D] with H % K == 0 -> [B, T, H, D]."""
  del unused
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  k = jnp.repeat(k, h // kv_heads, axis=2).astype(jnp.float32)
  v = jnp.repeat(v, h // kv_heads, axis=2).astype(jnp.float32)
  scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k) / jnp.sqrt(d)
  ok = mask_inputs.dense(spec, b, t, k.shape[1])[:, None]
  scores = jnp.where(ok, scores, -1e30)
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bhts,bshd->bthd", probs, v).astype(q.dtype)
