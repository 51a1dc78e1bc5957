"""Exact causal attention in cache-sized tiles with a hand-written backward (flash attention's
online softmax + recompute, portable: CPU/TPU, JAX only). The `blocked` kernel's causal path.

Queries and keys are cut into `block`-sized blocks; query block i visits only key blocks
0..i (a `fori_loop` with a data-independent trip count i + 1, so the causal upper triangle is
never computed or even branched on), keeping the running row max m, row sum l and unnormalised
output. The forward saves only the output and each row's log-sum-exp L = m + log l. The
backward (custom_vjp, not autodiff through the loops) recomputes each tile's scores, P =
exp(S - L), and forms dV += P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ += dS K,
dK += dS^T Q. So reverse mode keeps O(T * D) per head and no probabilities, and every
temporary is one [block, block] tile per head, which stays in cache: on a 2-core CPU a
fresh 32 MiB temporary costs more to write than the exp over it, so larger blocks are slower
(docs/results/step_time.md).

Masks: a plain causal mask is an iota compare fused into the score tile. Anything else
(segments of packed rows, windows, globals) also evaluates masks.allowed on the tile and skips
the tile's matmuls under `lax.cond` when nothing in it is allowed. Valid when every allowed
key has index <= its query's index (packed rows satisfy it, since positions only grow within a
document), or index < the row's prefix length (prefix-LM with positions 0..T-1: the
summarizer's `[bos] document [eos] summary`). With a prefix, query block i visits key blocks
0..max(i, last block holding a prefix key of any row): the data-dependent trip count is a
while loop, the triangle above the prefix blocks is still never visited, and the
summarizer's fwd+bwd runs here, not on the generic blocked path (whose 4k summarizer step
takes about twice as long; docs/results/step_time.md).
GQA: a key/value head's G query heads are stacked as G * block rows of one tile. Computes in
float32 whatever the input dtype.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from model.attention import masks

_NEG = -1e30   # finite: exp(_NEG - finite) is exactly 0 and no inf - inf NaNs appear


def applies(spec: masks.MaskSpec, mask_inputs: masks.MaskInputs, q_len: int, kv_len: int) -> bool:
  mi = mask_inputs
  # A prefix is index-based here only when positions are the indices (see the docstring).
  index_prefix = mi.prefix_len is None or (mi.q_pos is None and mi.kv_pos is None)
  return spec.causal and q_len == kv_len and index_prefix


def attend(q, k, v, *, spec: masks.MaskSpec, mask_inputs: masks.MaskInputs, block: int):
  """q [B, T, H, D], k/v [B, T, K, D] (GQA when K < H) -> [B, T, H, D]."""
  b, t, h, d = q.shape
  kh = k.shape[2]
  g = h // kh
  bs = min(block, t)
  pad = -t % bs
  n = (t + pad) // bs
  mi = mask_inputs
  padded = lambda x, fill=0: x if not pad else jnp.pad(
      x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
  meta = None
  if not masks.is_plain_causal(spec, mi.q_pos, mi.q_seg, mi.prefix_len):
    # Padded rows continue the positions in a segment of their own (-1): each sees itself and
    # earlier pads, and no real row sees them (index-causal).
    tail = jnp.broadcast_to(jnp.arange(t, t + pad, dtype=jnp.int32), (b, pad))
    pos = lambda p: jnp.concatenate(
        [masks.default_positions(b, t) if p is None else p.astype(jnp.int32), tail], 1)
    seg = lambda s: None if s is None else padded(s.astype(jnp.int32), -1).reshape(b, n, bs)
    meta = (pos(mi.q_pos).reshape(b, n, bs), pos(mi.kv_pos).reshape(b, n, bs),
            seg(mi.q_seg), seg(mi.kv_seg))
    meta = tuple(None if x is None else jnp.asarray(x).transpose(1, 0, 2)   # [n, B, bs]
                 for x in meta)
    meta += (None if mi.prefix_len is None else mi.prefix_len.astype(jnp.int32),)   # [B]
  f32 = jnp.float32
  # Head-major blocks: qs [n, B, K, G * bs, D] (rows ordered (group, position)), ks/vs
  # [n, B, K, bs, D]; every product below is a plain batched matmul.
  qs = padded(q.astype(f32)).reshape(b, n, bs, kh, g, d).transpose(1, 0, 3, 4, 2, 5)
  qs = qs.reshape(n, b, kh, g * bs, d)
  ks = padded(k.astype(f32)).reshape(b, n, bs, kh, d).transpose(1, 0, 3, 2, 4)
  vs = padded(v.astype(f32)).reshape(b, n, bs, kh, d).transpose(1, 0, 3, 2, 4)
  out = _flash(spec, g, qs, ks, vs, meta)
  out = out.reshape(n, b, kh, g, bs, d).transpose(1, 0, 4, 2, 3, 5).reshape(b, n * bs, h, d)
  return out[:, :t].astype(q.dtype)


def _tile_ok(spec, g, meta, i, j, bs):
  """Boolean [B or 1, 1, G * bs, bs]: may the rows of query block i see key block j."""
  rows = lax.broadcasted_iota(jnp.int32, (bs, bs), 0) + i * bs
  cols = lax.broadcasted_iota(jnp.int32, (bs, bs), 1) + j * bs
  ok = (cols <= rows)[None]
  if meta is not None:
    q_pos, kv_pos, q_seg, kv_seg, prefix = meta
    if prefix is not None:
      ok = ok | (cols[None] < prefix[:, None, None])
    ok = ok & masks.allowed(spec, q_pos[i], kv_pos[j], None if q_seg is None else q_seg[i],
                            None if kv_seg is None else kv_seg[j], prefix)
  return jnp.tile(ok, (1, g, 1))[:, None]


def _key_blocks(meta, i, bs):
  """How many key blocks query block i visits: 0..i, and every block with a prefix key."""
  prefix = None if meta is None else meta[4]
  if prefix is None:
    return i + 1
  return jnp.maximum(i + 1, (jnp.max(prefix) + bs - 1) // bs)


def _forward(spec, g, qs, ks, vs, meta):
  n, b, kh, rows, d = qs.shape
  bs = ks.shape[3]
  scale = d ** -0.5

  def query_block(i):
    qi = qs[i] * scale

    def key_block(j, carry):
      def compute(carry):
        m, l, acc = carry
        s = jnp.where(ok, jnp.einsum("bkrd,bksd->bkrs", qi, ks[j]), _NEG)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        if meta is not None:   # a row with nothing allowed yet has m_new = _NEG
          p = jnp.where(ok, p, 0.0)
        corr = jnp.exp(m - m_new)
        return (m_new, l * corr + p.sum(-1),
                acc * corr[..., None] + jnp.einsum("bkrs,bksd->bkrd", p, vs[j]))
      ok = _tile_ok(spec, g, meta, i, j, bs)
      if meta is None:
        return compute(carry)
      return lax.cond(ok.any(), compute, lambda c: c, carry)

    init = (jnp.full((b, kh, rows), _NEG), jnp.zeros((b, kh, rows)),
            jnp.zeros((b, kh, rows, d)))
    m, l, acc = lax.fori_loop(0, _key_blocks(meta, i, bs), key_block, init)
    return acc / l[..., None], m + jnp.log(l)

  return lax.map(query_block, jnp.arange(n))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(spec, g, qs, ks, vs, meta):
  return _forward(spec, g, qs, ks, vs, meta)[0]


def _flash_fwd(spec, g, qs, ks, vs, meta):
  out, lse = _forward(spec, g, qs, ks, vs, meta)
  return out, (qs, ks, vs, meta, out, lse)


def _flash_bwd(spec, g, res, d_out):
  qs, ks, vs, meta, out, lse = res
  n, b, kh, rows, d = qs.shape
  bs = ks.shape[3]
  scale = d ** -0.5
  delta = jnp.sum(d_out * out, -1)      # rowsum(dO * O): [n, B, K, rows]

  def query_block(i, carry):
    dq_all, dk, dv = carry
    qi, doi, li, di = qs[i] * scale, d_out[i], lse[i], delta[i]

    def key_block(j, c):
      def compute(c):
        dq, dk, dv = c
        kj, vj = ks[j], vs[j]
        s = jnp.where(ok, jnp.einsum("bkrd,bksd->bkrs", qi, kj), _NEG)
        p = jnp.exp(s - li[..., None])                       # masked entries: exactly 0
        dp = jnp.einsum("bkrd,bksd->bkrs", doi, vj)
        ds = p * (dp - di[..., None])
        dv = dv.at[j].add(jnp.einsum("bkrs,bkrd->bksd", p, doi))
        dk = dk.at[j].add(jnp.einsum("bkrs,bkrd->bksd", ds, qi))   # qi carries the scale
        return dq + jnp.einsum("bkrs,bksd->bkrd", ds, kj), dk, dv
      ok = _tile_ok(spec, g, meta, i, j, bs)
      if meta is None:
        return compute(c)
      return lax.cond(ok.any(), compute, lambda c: c, c)

    dq, dk, dv = lax.fori_loop(0, _key_blocks(meta, i, bs), key_block,
                               (jnp.zeros_like(qi), dk, dv))
    return dq_all.at[i].set(dq * scale), dk, dv

  dq, dk, dv = lax.fori_loop(0, n, query_block,
                             (jnp.zeros_like(qs), jnp.zeros_like(ks), jnp.zeros_like(vs)))
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
