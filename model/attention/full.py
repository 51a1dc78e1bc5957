"""Exact attention over all keys; the implementation is chosen per backend (`choose`).

- GPU, bf16/fp16, causal self-attention without a prefix or window: the fused cuDNN flash
  kernel via `jax.nn.dot_product_attention(implementation="cudnn")` (no T x T matrix in
  memory) - plain rows by index, packed rows (segment ids, positions) with their mask, which
  cuDNN computes equal to the reference (docs/results/gpu.md).
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

from model.attention import causal_blocks, flash, masks, platform


def _causal_self(spec: masks.MaskSpec, mi: masks.MaskInputs, q_len: int, kv_len: int) -> bool:
  """A causal self-attention mask (plain or packed rows), no prefix, window or global tokens."""
  return spec == masks.MaskSpec(causal=True) and mi.prefix_len is None and q_len == kv_len


def choose(implementation: str, dtype, spec: masks.MaskSpec, mi: masks.MaskInputs, q_len: int,
           kv_len: int, block_size: int = 128, backend: str | None = None) -> str:
  """The kernel `attend` runs - "cudnn", "flash", "causal_blocks" or "xla" - on `backend`
  (default: platform.name(), this process's or an ahead-of-time compile's target)."""
  if implementation in ("cudnn", "xla"):
    return implementation
  backend = backend or platform.name()
  if (backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
      and _causal_self(spec, mi, q_len, kv_len)):
    return "cudnn"
  if backend == "cpu" and flash.applies(spec, mi, q_len, kv_len):
    return "flash"
  if causal_blocks.applies(spec, mi, q_len, kv_len, block_size):
    return "causal_blocks"
  return "xla"


def attend(q, k, v, *, spec: masks.MaskSpec, mask_inputs: masks.MaskInputs,
           implementation: str = "auto", block_size: int = 128):
  """q [B, T, H, D], k/v [B, S, K, D] (GQA when K < H) -> [B, T, H, D]."""
  mi = mask_inputs
  kernel = choose(implementation, q.dtype, spec, mi, q.shape[1], k.shape[1], block_size)
  if kernel == "flash":
    return flash.attend(q, k, v, spec=spec, mask_inputs=mi, block=block_size)
  if kernel == "causal_blocks":
    return causal_blocks.attend(q, k, v, spec=spec, mask_inputs=mi, block=block_size)
  if masks.is_plain_causal(spec, mi.q_pos, mi.q_seg, mi.prefix_len):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=kernel)
  mask = mi.dense(spec, q.shape[0], q.shape[1], k.shape[1])[:, None]   # [B, 1, T, S]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=kernel)
