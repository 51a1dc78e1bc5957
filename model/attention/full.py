"""Exact attention over all keys via `jax.nn.dot_product_attention`.

On GPU with bf16/fp16 and a plain causal mask this dispatches to the fused cuDNN flash kernel
(no T x T matrix in memory); with packed segments or a prefix it passes a dense boolean mask to
XLA's implementation.
"""
import jax
import jax.numpy as jnp

from model.attention import masks


def _use_cudnn(implementation: str, dtype, plain_causal: bool) -> bool:
  if implementation == "cudnn":
    return True
  return (implementation == "auto" and jax.default_backend() == "gpu"
          and dtype in (jnp.bfloat16, jnp.float16) and plain_causal)


def attend(q, k, v, *, spec: masks.MaskSpec, mask_inputs: masks.MaskInputs,
           implementation: str = "auto"):
  """q [B, T, H, D], k/v [B, S, K, D] (GQA when K < H) -> [B, T, H, D]."""
  mi = mask_inputs
  plain = masks.is_plain_causal(spec, mi.q_pos, mi.q_seg, mi.prefix_len)
  impl = "cudnn" if _use_cudnn(implementation, q.dtype, plain) else "xla"
  if plain:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
  mask = mi.dense(spec, q.shape[0], q.shape[1], k.shape[1])[:, None]   # [B, 1, T, S]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
