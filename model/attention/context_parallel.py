"""Context parallelism: attention over a sequence split across the mesh's "context" axis.

With config.mesh.context = C > 1 every activation is [B, T/C, ...] per device (the logical
"activation_length" maps to "context"); everything but attention is position-wise, so only
attention needs other devices' tokens. `attend` runs under `jax.shard_map` over the whole mesh
(batch over data x fsdp, heads over tensor, sequence over context) and moves keys/values, never
queries or outputs, between the context shards. Masks come from `masks.allowed` on the real
positions and segment ids, which travel with the keys, so any layout of the sequence over the
devices gives the exact result: full (causal and bidirectional), blocked, local (window and
global tokens), packed rows, prefix-LM and GQA/MQA.

Two methods, chosen per call by `choose`:
- ring (default, ring.py): each device keeps its queries and running online-softmax state
  and the key/value shards go round the ring with `lax.ppermute`, C steps, each transfer
  overlapping the previous shard's compute; hidden (query block, key block) pairs are skipped.
  A hand-written backward passes dK/dV round the ring with the shards, so forward and backward
  hold O(T/C) per device (two K/V shards at a time). A sliding window (`local`)
  needs only the shards within the window behind a device's own: the ring stops after
  1 + ceil((window - 1) / (T/C)) steps (2 when the window fits in a shard: a halo exchange
  with the previous neighbour), unless global tokens make the first shard visible to all.
- all-gather: every device gathers the whole K/V (`lax.all_gather`) and runs blocked.py's
  kernel on its queries against it. The bytes moved are the same as the ring's (each device
  receives the C - 1 other shards); what differs is memory and latency: one collective
  instead of C dependent steps, at the price of holding all of K/V. It is chosen when all of
  K/V is no larger than the device's query shard (2 * K * C <= H: GQA/MQA with few kv heads),
  where that memory is small.

Layout (load balance): under causal attention the contiguous split would leave the device with
the first T/C tokens almost idle (it sees only its own keys) and the last one with all the
work. For causal masks without a window, `to_layout` therefore uses the zig-zag order: the
sequence is cut into 2C chunks and device i holds chunks i and 2C-1-i, so every device has
the same number of visible (query block, key block) pairs. Windows and bidirectional masks are
already balanced and keep the contiguous order, which is what lets a window's ring stop early.
The model (model/transformer.py) applies the layout once, to the embeddings, positions and
segment ids, and undoes it once after the last block, so losses, pooling and the rest of the
program see the natural order; RoPE and the masks read the carried positions.

Decoding (infer/) runs with context 1.
"""
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from model.attention import blocked, local, masks, ring

AXIS = "context"
_BATCH_AXES = ("data", "fsdp")


def context_size() -> int:
  """The context axis size of the mesh being traced under (1 outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get(AXIS, 1)


def uses_zigzag(spec: masks.MaskSpec) -> bool:
  """Whether `spec` is laid out zig-zag: causal without a window (see the module docstring)."""
  return spec.causal and spec.window is None


def check_length(length: int, context: int, zigzag: bool):
  parts = 2 * context if zigzag else context
  if length % parts:
    raise ValueError(f"config.data.seq_len (here {length}) must be divisible by "
                     f"{'2 x ' if zigzag else ''}config.mesh.context = {parts} "
                     f"({'zig-zag layout of causal attention' if zigzag else 'one shard each'})")


def to_layout(x, context: int, zigzag: bool):
  """[B, T, ...] in sequence order -> the order whose i-th T/C slice device i holds."""
  if not zigzag or context == 1:
    return x
  b, t = x.shape[:2]
  x = x.reshape((b, 2, context, t // (2 * context)) + x.shape[2:])
  x = jnp.stack([x[:, 0], jnp.flip(x[:, 1], axis=1)], axis=2)    # [B, C, 2, T/2C, ...]
  return x.reshape((b, t) + x.shape[4:])


def from_layout(x, context: int, zigzag: bool):
  """The inverse of `to_layout`."""
  if not zigzag or context == 1:
    return x
  b, t = x.shape[:2]
  x = x.reshape((b, context, 2, t // (2 * context)) + x.shape[2:])
  x = jnp.concatenate([x[:, :, 0], jnp.flip(x[:, :, 1], axis=1)], axis=1)   # [B, 2C, T/2C, ...]
  return x.reshape((b, t) + x.shape[3:])


def choose(spec: masks.MaskSpec, heads: int, kv_heads: int, context: int) -> str:
  """"ring" or "allgather" (see the module docstring)."""
  if spec.window is not None:
    return "ring"
  return "allgather" if 2 * kv_heads * context <= heads else "ring"


def ring_steps(spec: masks.MaskSpec, context: int, shard: int) -> int:
  """How many shards each device's queries must see: all, or those a window reaches back to
  (by index: within a document positions grow by at least one a token, as local.py assumes)."""
  if spec.window is None or spec.num_global:
    return context
  return min(context, 1 + math.ceil((spec.window - 1) / shard))


def _block(length: int, block_size: int, zigzag: bool) -> int:
  """A block that tiles the local shard without straddling its two zig-zag chunks."""
  unit = length // 2 if zigzag else length
  return block_size if unit % block_size == 0 else unit


def _allgather(q, k, v, q_pos, kv_pos, q_seg, kv_seg, prefix_len, *, spec, block_size):
  gather = lambda x: None if x is None else lax.all_gather(x, AXIS, axis=1, tiled=True)
  mi = masks.MaskInputs(q_pos=q_pos, kv_pos=gather(kv_pos), q_seg=q_seg, kv_seg=gather(kv_seg),
                        prefix_len=prefix_len)
  return blocked.attend(q, gather(k), gather(v), spec=spec, mask_inputs=mi,
                        block_size=block_size)


def attend(q, k, v, *, spec: masks.MaskSpec, mask_inputs: masks.MaskInputs,
           block_size: int = 128, method: str = "auto"):
  """q [B, T, H, D], k/v [B, T, K, D], sharded with T over the ambient mesh's context axis and
  laid out by `to_layout` (`uses_zigzag(spec)`), as are mask_inputs' positions (required) and
  segment ids -> [B, T, H, D] in the same layout.

  method: "auto" (`choose`), "ring" or "allgather".
  """
  mesh = jax.sharding.get_abstract_mesh()
  sizes = dict(mesh.shape)
  context = sizes[AXIS]
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  mi = mask_inputs
  if mi.q_pos is None or mi.kv_pos is None:
    raise ValueError("context-parallel attention needs explicit positions: the layout moves "
                     "tokens away from their index")
  if spec.window is not None:
    local.check_supported(spec, mi, t, k.shape[1])
  check_length(t, context, uses_zigzag(spec))
  method = choose(spec, h, kv_heads, context) if method == "auto" else method
  if method not in ("ring", "allgather"):
    raise ValueError(f"context-parallel method={method!r}; expected auto, ring or allgather")

  # Rows over data x fsdp and heads over tensor where they split (an init-time batch of one
  # row does not); the sequence over context.
  rows = _BATCH_AXES if b % (sizes["data"] * sizes["fsdp"]) == 0 else None
  tensor = sizes.get("tensor", 1)
  heads = "tensor" if h % tensor == 0 and kv_heads % tensor == 0 else None
  x_spec, seq_spec = P(rows, AXIS, heads, None), P(rows, AXIS)
  optional = lambda x, spec_: None if x is None else spec_
  args = (q, k, v, mi.q_pos, mi.kv_pos, mi.q_seg, mi.kv_seg, mi.prefix_len)
  # Positions and segment ids are the same for every layer: under a scan over layers
  # (scan_layers), reverse mode hoists whatever depends on them alone out of the layer loop
  # (lax.scan's loop-invariant residuals), which for the ring is every step's masks for every
  # (query block, key block) pair, [C - 1, T/C / bq, T/C / bk, B, K, G, bq, bk]:
  # O((T/C) x T x heads) per row, kept for the whole step. Tying them to the queries, which
  # change with every layer, keeps the masks inside the kernel, built block by block.
  args = lax.optimization_barrier(args)
  in_specs = (x_spec, x_spec, x_spec, seq_spec, seq_spec, optional(mi.q_seg, seq_spec),
              optional(mi.kv_seg, seq_spec), optional(mi.prefix_len, P(rows)))
  if method == "ring":
    zigzag, shard = uses_zigzag(spec), t // context
    cfg = dict(axis=AXIS, steps=ring_steps(spec, context, shard), spec=spec,
               block_q=_block(shard, block_size, zigzag), block_k=_block(shard, block_size, zigzag))
    body = lambda q, k, v, *meta: ring.attend(q, k, v, meta, **cfg)
  else:
    body = lambda *a: _allgather(*a, spec=spec, block_size=block_size)
  # check_vma=False: the running state starts as constants and becomes device-varying, which
  # the check would make every loop and cond spell out (with an API that differs across JAX
  # versions). Inputs left unsplit (rows, heads) are computed identically on every device;
  # the tests cover their gradients.
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=x_spec,
                       check_vma=False)(*args)
