"""Context parallelism (model/attention/context_parallel.py) on 8 fake CPU devices.

Attention split over the context axis, by ring and by all-gather, equals reference.attend on one
device, forward and d/dq, d/dk, d/dv (float32, rtol = atol = 1e-5), for causal and
bidirectional full attention, windows (with and without global tokens), packed rows, a prefix
and GQA/MQA, on meshes context 8, context 4 x fsdp 2 and context 2 x tensor 2 x fsdp 2. The
zig-zag layout balances the visible (query block, key block) pairs over the devices; a window's
ring stops at the shards the window reaches. Training with context 2 follows the unsplit run's
losses and resumes bit-identically (slow).
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import F32_ATOL, F32_RTOL, lm_batch, mesh_from
from model.attention import context_parallel as cp
from model.attention import masks, reference

B, T, H, D, BLOCK = 2, 32, 4, 8, 4

# (data, fsdp, tensor), context
MESHES = {
    "context8": ((1, 1, 1), 8),
    "context4_fsdp2": ((1, 2, 1), 4),
    "context2_tensor2_fsdp2": ((1, 2, 2), 2),
}


def _packed_inputs():
  batch = lm_batch(B, T, 256, seed=1)
  pos, seg = jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"])
  return dict(q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg)


CASES = {   # name: (MaskSpec, extra MaskInputs fields)
    "causal": (masks.MaskSpec(), {}),
    "bidirectional": (masks.MaskSpec(causal=False), {}),
    "packed": (masks.MaskSpec(), _packed_inputs()),
    "bidirectional_packed": (masks.MaskSpec(causal=False), _packed_inputs()),
    "prefix": (masks.MaskSpec(), dict(prefix_len=jnp.array([5, 19], jnp.int32))),
    "window": (masks.MaskSpec(window=5), {}),
    "window_globals": (masks.MaskSpec(window=3, num_global=2), {}),
    "window_packed": (masks.MaskSpec(window=6), _packed_inputs()),
}


def _qkv(kv_heads, seed=0):
  rng = np.random.default_rng(seed)
  mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return mk(B, T, H, D), mk(B, T, kv_heads, D), mk(B, T, kv_heads, D), mk(B, T, H, D)


def _mask_inputs(extra):
  pos = masks.default_positions(B, T)
  return masks.MaskInputs(**{"q_pos": pos, "kv_pos": pos, **extra})


def _sharded_attend(mesh, spec, method):
  """(q, k, v, mask inputs) in sequence order -> output, through the layout and the
  context-parallel kernel under `mesh`, as the model runs it."""
  context = mesh.shape["context"]
  zigzag = cp.uses_zigzag(spec)

  def run(q, k, v, mi):
    lay = lambda x: None if x is None else cp.to_layout(x, context, zigzag)
    mi = masks.MaskInputs(q_pos=lay(mi.q_pos), kv_pos=lay(mi.kv_pos), q_seg=lay(mi.q_seg),
                          kv_seg=lay(mi.kv_seg), prefix_len=mi.prefix_len)
    split = lambda x: jax.lax.with_sharding_constraint(
        lay(x), NamedSharding(mesh, P(("data", "fsdp"), "context")))
    out = cp.attend(split(q), split(k), split(v), spec=spec, mask_inputs=mi, block_size=BLOCK,
                    method=method)
    return cp.from_layout(out, context, zigzag)
  return run


def _fwd_and_grads(fn, q, k, v, mi, w):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, mi).astype(jnp.float32) * w)
  return fn(q, k, v, mi), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _check(mesh_name, case, kv_heads, method):
  (shape, context), (spec, extra) = MESHES[mesh_name], CASES[case]
  mesh = mesh_from(jax.devices()[:np.prod(shape) * context], shape, context=context)
  q, k, v, w = _qkv(kv_heads)
  mi = _mask_inputs(extra)
  ref = lambda q, k, v, mi: reference.attend(q, k, v, spec=spec, mask_inputs=mi)
  want = jax.jit(lambda *a: _fwd_and_grads(ref, *a))(q, k, v, mi, w)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda *a: _fwd_and_grads(_sharded_attend(mesh, spec, method), *a))(
        q, k, v, mi, w)
  chex.assert_trees_all_close(got, want, rtol=F32_RTOL, atol=F32_ATOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_ring_matches_reference_on_context8(case):
  _check("context8", case, kv_heads=2, method="ring")


@pytest.mark.parametrize("case", ["causal", "bidirectional_packed", "prefix"])
def test_allgather_matches_reference_mqa(case):
  _check("context8", case, kv_heads=1, method="allgather")


@pytest.mark.parametrize("mesh_name", ["context4_fsdp2", "context2_tensor2_fsdp2"])
@pytest.mark.parametrize("case,kv_heads,method", [
    ("packed", 2, "ring"), ("window_packed", 2, "ring"), ("bidirectional", 4, "ring"),
    ("causal", 2, "allgather"), ("window_globals", 1, "auto")])
def test_mixed_meshes_match_reference(mesh_name, case, kv_heads, method):
  _check(mesh_name, case, kv_heads, method)


def test_choose_gathers_only_small_kv():
  assert cp.choose(masks.MaskSpec(), heads=8, kv_heads=1, context=4) == "allgather"
  assert cp.choose(masks.MaskSpec(), heads=8, kv_heads=8, context=4) == "ring"
  assert cp.choose(masks.MaskSpec(window=16), heads=8, kv_heads=1, context=4) == "ring"


def test_window_ring_stops_at_the_shards_it_reaches():
  assert cp.ring_steps(masks.MaskSpec(window=8), context=8, shard=16) == 2     # halo only
  assert cp.ring_steps(masks.MaskSpec(window=33), context=8, shard=16) == 3
  assert cp.ring_steps(masks.MaskSpec(window=8, num_global=1), context=8, shard=16) == 8
  assert cp.ring_steps(masks.MaskSpec(), context=8, shard=16) == 8


def test_layout_round_trips_and_is_zigzag():
  x = jnp.arange(2 * 32).reshape(2, 32)
  for context in (1, 2, 4, 8):
    chex.assert_trees_all_equal(cp.from_layout(cp.to_layout(x, context, True), context, True), x)
  order = np.asarray(cp.to_layout(x, 4, True)[0]).reshape(4, 2, 4)[:, :, 0] // 4
  np.testing.assert_array_equal(order, [[0, 7], [1, 6], [2, 5], [3, 4]])   # chunks i, 2C-1-i
  chex.assert_trees_all_equal(cp.to_layout(x, 4, False), x)


def _visible_block_pairs(context, zigzag, t=256, block=8):
  """Per device: (query block, key block) pairs of a causal mask with anything visible."""
  pos = cp.to_layout(masks.default_positions(1, t), context, zigzag)[0]
  blocks = np.asarray(pos).reshape(-1, block)
  q_max, k_min = blocks.max(1), blocks.min(1)
  visible = k_min[None, :] <= q_max[:, None]                       # [q block, k block]
  per_device = t // context // block
  return [int(visible[i * per_device:(i + 1) * per_device].sum()) for i in range(context)]


@pytest.mark.parametrize("context", [2, 4, 8])
def test_zigzag_balances_causal_work(context):
  counts = _visible_block_pairs(context, zigzag=True)
  assert max(counts) - min(counts) <= 1, counts
  contiguous = _visible_block_pairs(context, zigzag=False)
  assert max(contiguous) > 2 * min(contiguous), contiguous    # what the layout fixes


def test_length_must_split_into_2c_chunks():
  with pytest.raises(ValueError, match=r"config.data.seq_len.*2 x config.mesh.context = 8"):
    cp.check_length(36, 4, zigzag=True)
  cp.check_length(36, 4, zigzag=False)
