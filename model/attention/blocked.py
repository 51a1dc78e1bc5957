"""Exact attention for long contexts: online softmax over key blocks, O(N * block) memory.

Causal self-attention (plain causal rows, packed rows, windows, and a prefix-LM over
positions 0..T-1) runs flash.py: the same online softmax in tiles, but key blocks the mask
hides above the diagonal are never visited and the backward is hand-written (recompute from
the saved log-sum-exp), 1.5-2x faster fwd+bwd than the generic path below on a 2-core CPU
(T=4096, block 128, 8 heads, D=64) with less memory; the 4k summarizer's whole train step
runs 2.1x faster on it (docs/results/step_time.md). Everything else (bidirectional,
cross-attention, a prefix over packed positions) takes the generic path:

Queries and keys are cut into blocks. An outer `lax.map` runs over query blocks; for each, an
inner `lax.scan` over key blocks keeps the flash-attention running state (row max m, row sum l,
unnormalised output acc), so no score matrix larger than [block, block] per head ever exists.

Skipping hidden blocks: each (query block, key block) step first evaluates `masks.allowed` on
that block pair (O(block^2) compares, cheap next to the O(block^2 * D) matmuls) and runs the
matmuls under `lax.cond` only if any pair is allowed. Because the test is the mask itself, every
pattern skips what it hides with no kernel-specific logic: the causal upper triangle, key blocks
outside a window, other documents of a packed row, and padding. Prefix-LM and globals are
supported exactly (their blocks simply stay visible). On a CPU the skipping makes causal
fwd+bwd faster than computing every block, a window more so, and both faster than XLA's dense
causal kernel.

Backward memory: both loop bodies are `jax.checkpoint`ed, so reverse mode stores only the running
state per key block for the query block being differentiated (O(N * D) per head) and recomputes
the scores, never the N x N probabilities. The whole kernel computes in float32.
"""
import jax
import jax.numpy as jnp
from jax import lax

from model.attention import flash, masks

_NEG = jnp.finfo(jnp.float32).min


def split_blocks(x, block: int, fill=0):
  """[B, N, ...] -> [N / block, B, block, ...], padding N up to a multiple of block."""
  n = x.shape[1]
  pad = -n % block
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
  x = x.reshape((x.shape[0], -1, block) + x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def fold_key_block(carry, qi, kj, vj, ok, scale):
  """One key block folded into a query block's running state (row max m, row sum l,
  unnormalised output acc): the online softmax; `ok` [B, bq, bk] marks the pairs allowed."""
  m, l, acc = carry
  okb = ok[:, None, None]
  scores = jnp.einsum("bkgtd,bksd->bkgts", qi, kj, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(okb, scores, _NEG)
  # The result is invariant to m (it cancels in acc / l): no gradient needs to flow into it.
  m_new = lax.stop_gradient(jnp.maximum(m, scores.max(-1)))
  p = jnp.where(okb, jnp.exp(scores - m_new[..., None]), 0.0)
  corr = jnp.exp(m - m_new)
  acc = acc * corr[..., None] + jnp.einsum("bkgts,bksd->bkgtd", p, vj.astype(jnp.float32))
  return m_new, l * corr + p.sum(-1), acc


def attend(q, k, v, *, spec: masks.MaskSpec, mask_inputs: masks.MaskInputs,
           implementation: str = "auto", block_size: int = 128):
  """q [B, T, H, D], k/v [B, S, K, D] (GQA when K < H) -> [B, T, H, D].

  `implementation` is accepted for the common signature; there is one portable implementation.
  """
  del implementation
  if flash.applies(spec, mask_inputs, q.shape[1], k.shape[1]):
    return flash.attend(q, k, v, spec=spec, mask_inputs=mask_inputs, block=block_size)
  b, t, h, d = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  groups = h // kv_heads
  bq, bk = min(block_size, t), min(block_size, s)
  mi = mask_inputs
  q_pos = masks.default_positions(b, t) if mi.q_pos is None else mi.q_pos
  kv_pos = masks.default_positions(b, s) if mi.kv_pos is None else mi.kv_pos
  scale = d ** -0.5

  # Head-major blocks, qs [nq, B, K, G, bq, D] and ks/vs [nk, B, K, bk, D]: every product below
  # is a plain batched matmul.
  qs = split_blocks(q.reshape(b, t, kv_heads, groups, d), bq).transpose(0, 1, 3, 4, 2, 5)
  ks = split_blocks(k, bk).transpose(0, 1, 3, 2, 4)
  vs = split_blocks(v, bk).transpose(0, 1, 3, 2, 4)
  # Padding rows/keys are marked invalid rather than given sentinel positions, so `allowed`
  # never has to know about them.
  q_meta = (split_blocks(q_pos, bq), split_blocks(jnp.ones((b, t), bool), bq, False),
            None if mi.q_seg is None else split_blocks(mi.q_seg, bq))
  kv_meta = (split_blocks(kv_pos, bk), split_blocks(jnp.ones((b, s), bool), bk, False),
             None if mi.kv_seg is None else split_blocks(mi.kv_seg, bk))

  def query_block(xs):
    qi, (qp, qvalid, qseg) = xs

    def key_block(carry, ys):
      kj, vj, (kp, kvalid, kseg) = ys
      ok = (masks.allowed(spec, qp, kp, qseg, kseg, mi.prefix_len)
            & qvalid[:, :, None] & kvalid[:, None, :])                  # [B, bq, bk]

      compute = lambda c: fold_key_block(c, qi, kj, vj, ok, scale)
      return lax.cond(ok.any(), compute, lambda c: c, carry), None

    init = (jnp.full((b, kv_heads, groups, bq), _NEG), jnp.zeros((b, kv_heads, groups, bq)),
            jnp.zeros((b, kv_heads, groups, bq, d)))
    _, l, acc = lax.scan(jax.checkpoint(key_block), init, (ks, vs, kv_meta))[0]
    # Rows with no allowed key (padding only) would divide 0 by 0; they are sliced off below.
    return acc / jnp.where(l == 0, 1.0, l)[..., None]

  out = lax.map(jax.checkpoint(query_block), (qs.astype(jnp.float32), q_meta))  # nq,B,K,G,bq,D
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, -1, h, d)[:, :t]
  return out.astype(q.dtype)
