"""Ring attention: one device's queries against K/V shards passed round the context axis.

Runs inside `jax.shard_map` (context_parallel.py) on local shapes. Each of `steps` ring steps
folds the K/V shard the device holds into the queries' running online-softmax state (row max,
row sum, unnormalised output; float32) and passes the shard, with its positions and segment
ids, to the next device with `lax.ppermute`; the next shard is sent before the current one is
folded, so the transfer overlaps the compute. Within a step, queries and keys are cut into
blocks and a (query block, key block) pair the mask hides is skipped under `lax.cond` (the
test is `masks.allowed` itself, as in blocked.py).

Backward (custom_vjp, as flash.py does on one device): the forward saves only the local
queries, keys, values, output and each row's log-sum-exp L. The backward goes round the ring
again: every device recomputes P = exp(S - L) for the shard it holds, adds dQ += dS K to its
own queries' gradient and dK += dS^T Q, dV += P^T dO to accumulators that travel with the
shard; after the last step one more ppermute takes each shard's dK/dV home. Reverse mode thus
holds O(T/C) per device, where autodiff through the ring would save every step's shard
(all of K/V) and running state.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from model.attention import blocked, masks

_NEG = jnp.finfo(jnp.float32).min


def attend(q, k, v, meta, *, axis: str, steps: int, block_q: int, block_k: int,
           spec: masks.MaskSpec):
  """q [B, Tq, H, D], k/v [B, Tk, K, D] local shards; meta = (q_pos, kv_pos, q_seg, kv_seg,
  prefix_len) (segments and prefix may be None) -> [B, Tq, H, D]. The shard a device holds at
  step s is the one its ring predecessor s places back had at the start."""
  return _ring((axis, steps, block_q, block_k, spec), q, k, v, meta)


def _q_blocks(x, kv_heads, block):
  """[B, T, H, D] -> [nq, B, K, G, bq, D] float32."""
  b, t, h, d = x.shape
  x = x.astype(jnp.float32).reshape(b, t, kv_heads, h // kv_heads, d)
  return blocked.split_blocks(x, block).transpose(0, 1, 3, 4, 2, 5)


def _q_unblock(x, dtype):
  nq, b, kv_heads, g, bq, d = x.shape
  return x.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, kv_heads * g, d).astype(dtype)


def _kv_blocks(x, block):
  """[B, T, K, D] -> [nk, B, K, bk, D] float32."""
  return blocked.split_blocks(x.astype(jnp.float32), block).transpose(0, 1, 3, 2, 4)


def _kv_unblock(x):
  nk, b, kv_heads, bk, d = x.shape
  return x.transpose(1, 0, 3, 2, 4).reshape(b, nk * bk, kv_heads, d)


def _meta_blocks(pos, seg, block):
  return blocked.split_blocks(pos, block), None if seg is None else blocked.split_blocks(seg, block)


def _ring_perm(axis, shift):
  context = lax.axis_size(axis)
  return [(j, (j + shift) % context) for j in range(context)]


def _forward(cfg, q, k, v, meta):
  """(output [B, Tq, H, D], log-sum-exp [nq, B, K, G, bq])."""
  axis, steps, bq, bk, spec = cfg
  q_pos, kv_pos, q_seg, kv_seg, prefix_len = meta
  kv_heads = k.shape[2]
  scale = q.shape[-1] ** -0.5
  qs = _q_blocks(q, kv_heads, bq)
  q_meta = _meta_blocks(q_pos, q_seg, bq)
  state = (jnp.full(qs.shape[:-1], _NEG), jnp.zeros(qs.shape[:-1]), jnp.zeros(qs.shape))

  def fold_shard(state, shard):
    k, v, kv_pos, kv_seg = shard
    ks, vs, kv_meta = _kv_blocks(k, bk), _kv_blocks(v, bk), _meta_blocks(kv_pos, kv_seg, bk)

    def query_block(xs):
      qi, (qp, qseg), carry = xs

      def key_block(carry, ys):
        kj, vj, (kp, kseg) = ys
        ok = masks.allowed(spec, qp, kp, qseg, kseg, prefix_len)
        compute = lambda c: blocked.fold_key_block(c, qi, kj, vj, ok, scale)
        return lax.cond(ok.any(), compute, lambda c: c, carry), None
      return lax.scan(key_block, carry, (ks, vs, kv_meta))[0]
    return lax.map(query_block, (qs, q_meta, state))

  perm = _ring_perm(axis, 1)

  def ring_step(carry, _):
    state, shard = carry
    # Sent before the fold that reads `shard`: nothing orders the two, so they overlap.
    nxt = jax.tree.map(lambda x: lax.ppermute(x, axis, perm), shard)
    return (fold_shard(state, shard), nxt), None

  (state, shard), _ = lax.scan(ring_step, (state, (k, v, kv_pos, kv_seg)), length=steps - 1)
  m, l, acc = fold_shard(state, shard)
  # A row with no allowed key (padding only) has l = 0: output 0, and an L that keeps the
  # backward's P at exactly 0.
  out = acc / jnp.where(l == 0, 1.0, l)[..., None]
  lse = jnp.where(l == 0, 0.0, m + jnp.log(jnp.where(l == 0, 1.0, l)))
  return _q_unblock(out, q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg, q, k, v, meta):
  return _forward(cfg, q, k, v, meta)[0]


def _ring_fwd(cfg, q, k, v, meta):
  out, lse = _forward(cfg, q, k, v, meta)
  return out, (q, k, v, meta, out, lse)


def _ring_bwd(cfg, res, d_out):
  axis, steps, bq, bk, spec = cfg
  q, k, v, meta, out, lse = res
  q_pos, kv_pos, q_seg, kv_seg, prefix_len = meta
  kv_heads = k.shape[2]
  scale = q.shape[-1] ** -0.5
  qs, dos = _q_blocks(q, kv_heads, bq), _q_blocks(d_out, kv_heads, bq)
  delta = jnp.sum(dos * _q_blocks(out, kv_heads, bq), -1)        # rowsum(dO * O)
  q_meta = _meta_blocks(q_pos, q_seg, bq)

  def grads_of_shard(dq, shard):
    """(dQ + this shard's part, the shard's dK, dV [nk, B, K, bk, D])."""
    k, v, kv_pos, kv_seg = shard
    ks, vs, kv_meta = _kv_blocks(k, bk), _kv_blocks(v, bk), _meta_blocks(kv_pos, kv_seg, bk)

    def key_block(dq, ys):
      kj, vj, (kp, kseg) = ys

      def query_block(xs):
        qi, doi, li, di, (qp, qseg) = xs
        ok = masks.allowed(spec, qp, kp, qseg, kseg, prefix_len)[:, None, None]

        def compute(_):
          s = jnp.einsum("bkgtd,bksd->bkgts", qi, kj) * scale
          p = jnp.where(ok, jnp.exp(s - li[..., None]), 0.0)
          ds = p * (jnp.einsum("bkgtd,bksd->bkgts", doi, vj) - di[..., None])
          return (jnp.einsum("bkgts,bksd->bkgtd", ds, kj) * scale,
                  jnp.einsum("bkgts,bkgtd->bksd", ds, qi) * scale,
                  jnp.einsum("bkgts,bkgtd->bksd", p, doi))
        zeros = lambda _: (jnp.zeros_like(qi), jnp.zeros_like(kj), jnp.zeros_like(vj))
        return lax.cond(ok.any(), compute, zeros, None)
      dqj, dkj, dvj = lax.map(query_block, (qs, dos, lse, delta, q_meta))
      return dq + dqj, (dkj.sum(0), dvj.sum(0))
    return lax.scan(key_block, dq, (ks, vs, kv_meta))

  perm = _ring_perm(axis, 1)

  def ring_step(carry, _):
    dq, shard, dkv = carry
    nxt = jax.tree.map(lambda x: lax.ppermute(x, axis, perm), shard)
    dq, (dk, dv) = grads_of_shard(dq, shard)
    dkv = jax.tree.map(lambda acc, new: lax.ppermute(acc + new, axis, perm), dkv, (dk, dv))
    return (dq, nxt, dkv), None

  dkv = (jnp.zeros_like(_kv_blocks(k, bk)), jnp.zeros_like(_kv_blocks(v, bk)))
  carry = (jnp.zeros_like(qs), (k, v, kv_pos, kv_seg), dkv)
  (dq, shard, dkv), _ = lax.scan(ring_step, carry, length=steps - 1)
  dq, (dk, dv) = grads_of_shard(dq, shard)
  # The shard held now started steps - 1 devices back: its gradients go home.
  home = _ring_perm(axis, -(steps - 1))
  dk, dv = (lax.ppermute(acc + new, axis, home) for acc, new in zip(dkv, (dk, dv)))
  return (_q_unblock(dq, q.dtype), _kv_unblock(dk).astype(k.dtype),
          _kv_unblock(dv).astype(v.dtype), None)


_ring.defvjp(_ring_fwd, _ring_bwd)
