"""Exact attention over all keys; the implementation is chosen per backend.

- GPU, bf16/fp16, plain causal mask: the fused cuDNN flash kernel via
  `jax.nn.dot_product_attention(implementation="cudnn")` (no T x T matrix in memory).
- CPU, causal self-attention without a prefix: flash.py (cache-sized tiles, key blocks above the
  diagonal never visited, hand-written recompute backward): 1.8x faster fwd+bwd than
  causal_blocks at B=8, T=512, 8 heads, D=64 on a 2-core AVX2 CPU (267 vs 475 ms;
  docs/results/step_time.md).
- Other backends, the same masks: causal_blocks, which skips the key blocks above the diagonal
  (2.1x faster fwd+bwd than XLA's dense kernel on a 2-core CPU at T=512;
  docs/results/step_time.md).
  Both mask with masks.allowed, so segments and windows stay exact.
- Anything else (prefix-LM, cross-attention, odd lengths): XLA's dense kernel with the mask.
For long contexts use the `blocked` kernel (O(N x block) memory) or `local` (sliding window).
`implementation` = "xla" or "cudnn" forces one of the library kernels.
"""
import jax
import jax.numpy as jnp

from model.attention import causal_blocks, flash, masks


def _use_cudnn(implementation: str, dtype, plain_causal: bool) -> bool:
  if implementation == "cudnn":
    return True
  return (implementation == "auto" and jax.default_backend() == "gpu"
          and dtype in (jnp.bfloat16, jnp.float16) and plain_causal)


def attend(q, k, v, *, spec: masks.MaskSpec, mask_inputs: masks.MaskInputs,
           implementation: str = "auto", block_size: int = 128):
  """q [B, T, H, D], k/v [B, S, K, D] (GQA when K < H) -> [B, T, H, D]."""
  mi = mask_inputs
  plain = masks.is_plain_causal(spec, mi.q_pos, mi.q_seg, mi.prefix_len)
  use_cudnn = _use_cudnn(implementation, q.dtype, plain)
  if (implementation == "auto" and not use_cudnn and jax.default_backend() == "cpu" and
      flash.applies(spec, mi, q.shape[1], k.shape[1])):
    return flash.attend(q, k, v, spec=spec, mask_inputs=mi, block=block_size)
  if (implementation == "auto" and not use_cudnn and
      causal_blocks.applies(spec, mi, q.shape[1], k.shape[1], block_size)):
    return causal_blocks.attend(q, k, v, spec=spec, mask_inputs=mi, block=block_size)
  impl = "cudnn" if use_cudnn else "xla"
  if plain:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
  mask = mi.dense(spec, q.shape[0], q.shape[1], k.shape[1])[:, None]   # [B, 1, T, S]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
