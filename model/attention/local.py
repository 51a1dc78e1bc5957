"""Causal sliding-window attention, O(N * window) work and memory (needs `MaskSpec.window`).

Queries are cut into blocks of `block_size`. Query block i can only see keys whose index lies in
[(i - w) * block, (i + 1) * block), w = ceil((window - 1) / block), so the keys are laid out once
as [num_blocks, (w + 1) * block] overlapping windows (a static loop over the w + 1 offsets, not
over tokens) and all blocks go through one batched einsum: the graph size does not grow with T.
The mask inside each window comes from `masks.allowed`, so segments and positions still apply.

Global tokens (`num_global`) are the first `num_global` keys of the row, appended to every
window as extra keys; where a global key already lies inside a block's window range it is
masked out of the extra copy, so nothing is counted twice.

Index assumptions (as in causal_blocks): within a document, positions grow by at least one per
token, so an allowed key is never more than `window - 1` indices back (padding runs that repeat
position 0 break this; their outputs may differ from the reference, and they carry no loss).
Supported: causal self-attention, packed segments, GQA/MQA, any length. Not supported
(ValueError): prefix-LM (prefix keys can lie arbitrarily far back: use `blocked` or `full`), and
globals together with packed segments (each document's globals sit at a data-dependent index).

On GPU with bf16/fp16 and a plain row (no positions/segments/prefix/globals), "auto" runs
cuDNN's fused kernel with `local_window_size`.
"""
import math

import jax
import jax.numpy as jnp

from model.attention import masks, platform


def check_supported(spec: masks.MaskSpec, mi: masks.MaskInputs, t: int, s: int):
  if spec.window is None or not spec.causal:
    raise ValueError(f"local attention needs a causal MaskSpec with a window; got {spec}")
  if mi.prefix_len is not None:
    raise ValueError("local attention does not support prefix-LM (prefix keys may lie outside "
                     "the window); use model.attention.kind='blocked' or 'full'")
  if spec.num_global and mi.q_seg is not None:
    raise ValueError("local attention does not support global tokens with packed segments; "
                     "use model.attention.kind='blocked'")
  if t != s:
    raise ValueError(f"local attention is self-attention only; got {t} queries, {s} keys")


def _use_cudnn(implementation: str, dtype, spec: masks.MaskSpec, mi: masks.MaskInputs) -> bool:
  plain = spec.num_global == 0 and mi.q_pos is None and mi.q_seg is None
  if implementation == "cudnn":
    if not plain:   # the fused call has no positions/segments/globals: it would ignore them
      raise ValueError("implementation='cudnn' for local attention needs a plain row "
                       "(no positions, segments or global tokens)")
    return True
  return (implementation == "auto" and platform.name() == "gpu"
          and dtype in (jnp.bfloat16, jnp.float16) and plain)


def _windows(x, block: int, back: int, fill=0):
  """[B, N, ...] -> [B, N/block, (back+1)*block, ...]: each block's keys, `back` blocks back.

  N must be a multiple of block; the `back` blocks before the row start are `fill`.
  """
  nb = x.shape[1] // block
  x = jnp.pad(x, [(0, 0), (back * block, 0)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
  x = x.reshape((x.shape[0], nb + back, block) + x.shape[2:])
  x = jnp.stack([x[:, j:j + nb] for j in range(back + 1)], axis=2)   # [B, nb, back+1, block, ...]
  return x.reshape((x.shape[0], nb, (back + 1) * block) + x.shape[4:])


def attend(q, k, v, *, spec: masks.MaskSpec, mask_inputs: masks.MaskInputs,
           implementation: str = "auto", block_size: int = 128):
  """q [B, T, H, D], k/v [B, T, K, D] (GQA when K < H) -> [B, T, H, D]; softmax in float32."""
  mi = mask_inputs
  b, t, h, d = q.shape
  check_supported(spec, mi, t, k.shape[1])
  if _use_cudnn(implementation, q.dtype, spec, mi):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn",
                                        local_window_size=(spec.window - 1, 0))
  kv_heads = k.shape[2]
  groups = h // kv_heads
  block = min(block_size, t)
  nb = -(-t // block)
  back = min(math.ceil((spec.window - 1) / block), nb - 1)
  pad = nb * block - t
  pad_t = lambda x, fill=0: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2),
                                    constant_values=fill)
  q_pos = masks.default_positions(b, t) if mi.q_pos is None else mi.q_pos
  q_seg = None if mi.q_seg is None else pad_t(mi.q_seg).reshape(b * nb, block)

  # Keys per query block: [B, nb, W, ...] with W = (back + 1) * block; index tracks validity.
  kw, vw = _windows(pad_t(k), block, back), _windows(pad_t(v), block, back)
  kv_pos = _windows(pad_t(q_pos if mi.kv_pos is None else mi.kv_pos), block, back)
  kv_seg = None if mi.kv_seg is None else _windows(pad_t(mi.kv_seg), block, back)
  index = _windows(jnp.arange(nb * block)[None], block, back, fill=-1)[0]    # [nb, W]
  valid = (index >= 0) & (index < t)

  g = min(spec.num_global, t)
  if g:
    # Extra copies of the global keys, only where they are not already in the window range.
    first = (jnp.arange(nb) - back) * block                                  # window start
    extra = lambda x: jnp.broadcast_to(x[:, None, :g], (b, nb) + x[:, :g].shape[1:])
    kw, vw = jnp.concatenate([kw, extra(k)], 2), jnp.concatenate([vw, extra(v)], 2)
    kv_pos = jnp.concatenate([kv_pos, extra(q_pos if mi.kv_pos is None else mi.kv_pos)], 2)
    valid = jnp.concatenate([valid, jnp.arange(g)[None] < first[:, None]], 1)

  width = kw.shape[2]
  ok = masks.allowed(spec, pad_t(q_pos).reshape(b * nb, block), kv_pos.reshape(b * nb, width),
                     q_seg, None if kv_seg is None else kv_seg.reshape(b * nb, width))
  ok = ok.reshape(b, nb, block, width) & valid[None, :, None, :]

  qb = pad_t(q).reshape(b, nb, block, kv_heads, groups, d)
  scores = jnp.einsum("bnqkgd,bnskd->bnkgqs", qb, kw,
                      preferred_element_type=jnp.float32) * d ** -0.5
  # Padded query rows may have no allowed key; the finite fill keeps them NaN-free until sliced.
  scores = jnp.where(ok[:, :, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bnkgqs,bnskd->bnqkgd", probs, vw, preferred_element_type=jnp.float32)
  return out.reshape(b, nb * block, h, d)[:, :t].astype(q.dtype)
