"""Context parallelism (model/attention/context_parallel.py) on 8 fake CPU devices.

Attention split over the context axis equals reference.attend on one device, forward and
d/dq, d/dk, d/dv (float32, rtol = atol = 1e-5). The cases are a covering design, not the full
product: every mask (causal and bidirectional full attention, windows with and without global
tokens, packed rows, a prefix), every method (ring, all-gather, auto), every K/V head count
(MHA, GQA, MQA) and every mesh (context 8, context 4 x fsdp 2, context 2 x tensor 2 x fsdp 2)
appears at least once, and each mesh sees MQA and GQA; one compile per case. The
zig-zag layout balances the visible (query block, key block) pairs over the devices; a window's
ring stops at the shards the window reaches. The transformer (full causal and bidirectional,
blocked, local) on context 4 x fsdp 2 gives one device's logits and gradients, and its reverse
mode through scanned layers keeps the ring's masks inside the kernel; config_check and
decoding refuse what cannot split. Training with context 2 follows the unsplit run's losses and
resumes bit-identically (slow).
Run time on a shared 2-core AMD EPYC (AVX2), 2026-12-08, `-m "not slow" --durations=15`: 82 s
(194 s for the previous full product of 23 attention cases and 2-layer models); the slow tests
add ~1.6 min.
"""
import re
import signal

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import (F32_ATOL, F32_RTOL, base_args, checkpoint_steps, lm_batch, losses, mesh_from,
                     numpy_params, run_main, start_and_interrupt, tiny_model_cfg)
from configs import common
from model import sharding as sharding_lib
from model.attention import context_parallel as cp
from model.attention import masks, reference
from model.transformer import Transformer
from train import config_check

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
    "packed": (masks.MaskSpec(), _packed_inputs()),
    "bidirectional_packed": (masks.MaskSpec(causal=False), _packed_inputs()),
    "prefix": (masks.MaskSpec(), dict(prefix_len=jnp.array([5, 19], jnp.int32))),
    "window_globals": (masks.MaskSpec(window=3, num_global=2), {}),
    "window_packed": (masks.MaskSpec(window=6), _packed_inputs()),
}

# (mesh, mask case, kv heads of H = 4, method). "auto" picks all-gather for MQA on context 2
# (2 x 1 x 2 <= 4) and the ring for a window. Unpacked bidirectional and window masks are the
# packed cases with one segment, so the packed ones stand for them.
COVER = [
    ("context8", "causal", 2, "ring"),
    ("context8", "window_globals", 4, "ring"),
    ("context8", "bidirectional_packed", 1, "ring"),
    ("context4_fsdp2", "packed", 4, "ring"),
    ("context4_fsdp2", "window_packed", 2, "auto"),
    ("context4_fsdp2", "prefix", 1, "allgather"),
    ("context2_tensor2_fsdp2", "causal", 1, "auto"),
    ("context2_tensor2_fsdp2", "prefix", 2, "ring"),
]


def test_cover_has_every_mask_method_head_count_and_mesh():
  mesh, case, kv, method = (set(c) for c in zip(*COVER))
  assert (mesh, case, kv, method) == (set(MESHES), set(CASES), {1, 2, 4},
                                      {"ring", "allgather", "auto"})
  for name in MESHES:    # MQA (K/V unsplit over tensor) and GQA on every mesh
    assert {1, 2} <= {c[2] for c in COVER if c[0] == name}, name


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


@pytest.mark.parametrize("mesh_name,case,kv_heads,method", COVER)
def test_context_parallel_attention_matches_reference(mesh_name, case, kv_heads, method):
  (shape, context), (spec, extra) = MESHES[mesh_name], CASES[case]
  mesh = mesh_from(jax.devices()[:np.prod(shape) * context], shape, context=context)
  q, k, v, w = _qkv(kv_heads)
  mi = _mask_inputs(extra)
  # The yardstick runs op by op (nothing to compile); the split program is the one jit.
  want = _fwd_and_grads(lambda q, k, v, mi: reference.attend(q, k, v, spec=spec, mask_inputs=mi),
                        q, k, v, mi, w)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda *a: _fwd_and_grads(_sharded_attend(mesh, spec, method), *a))(
        q, k, v, mi, w)
  chex.assert_trees_all_close(got, want, rtol=F32_RTOL, atol=F32_ATOL)


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


# ---- The model on a context-parallel mesh (model/transformer.py).

@pytest.mark.parametrize("kind,causal,packed,scanned", [
    ("full", True, True, False), ("blocked", True, False, False), ("local", True, True, False),
    ("full", False, False, False), ("blocked", True, True, True)])
def test_transformer_on_context_mesh_matches_one_device(kind, causal, packed, scanned):
  """Logits and parameter gradients with the sequence split over context 4 x fsdp 2 equal the
  unsplit model's; the compiled program passes keys/values between devices. One layer: what
  is checked is the attention's split, which every layer repeats (`scanned`: two layers under
  scan_layers and full remat, as the long-context presets run)."""
  layers = dict(num_layers=2, scan_layers=True, remat="full") if scanned else dict(num_layers=1)
  cfg = tiny_model_cfg(attention_kind=kind, causal=causal, attention_window=6,
                       positions="learned" if not causal else "rope", max_len=T, **layers)
  model = Transformer(cfg)
  batch = lm_batch(B, T, cfg.vocab_size, seed=2, packed=packed)
  inputs = {k: jnp.asarray(v) for k, v in batch.items() if packed or k == "tokens"}
  params = numpy_params(model, inputs["tokens"])

  def loss(params, inputs):
    logits = model.apply({"params": params}, inputs["tokens"],
                         positions=inputs.get("positions"), segment_ids=inputs.get("segment_ids"))
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits
  fwd_bwd = jax.value_and_grad(loss, has_aux=True)
  want = jax.jit(fwd_bwd)(params, inputs)
  mesh = mesh_from(jax.devices(), (1, 2, 1), context=4)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.LOGICAL_RULES):
    compiled = jax.jit(fwd_bwd).lower(params, inputs).compile()
    got = compiled(params, inputs)
  chex.assert_trees_all_close(got, want, rtol=F32_RTOL, atol=F32_ATOL)
  assert "collective-permute" in compiled.as_text()     # the ring (2 K/V heads: not gathered)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_layers_keep_the_ring_masks_inside_the_kernel(remat):
  """Reverse mode through scanned layers holds no array indexed by (ring step, key block,
  query block): positions and segment ids are the same for every layer, and the masks built
  from them alone must not be hoisted out of the layer loop for every step and block pair
  ((T/C) x T per row). Traced only (no compile)."""
  context, block = 4, BLOCK
  cfg = tiny_model_cfg(num_layers=2, attention_kind="blocked", scan_layers=True, remat=remat,
                       attention_block_size=block)
  model = Transformer(cfg)
  batch = {k: jnp.asarray(v) for k, v in lm_batch(B, T, cfg.vocab_size, seed=2).items()}
  params = numpy_params(model, batch["tokens"])

  def loss(params):
    logits = model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
    return jnp.mean(logits)
  mesh = mesh_from(jax.devices(), (1, 2, 1), context=context)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.LOGICAL_RULES):
    text = str(jax.make_jaxpr(jax.grad(loss))(params))
  blocks = T // context // block
  per_pair = f"[{context - 1},{blocks},{blocks},"
  assert "ppermute" in text                                    # the ring is in the program
  assert per_pair not in text


def test_decoding_on_a_context_mesh_is_refused():
  cfg = tiny_model_cfg()
  model = Transformer(cfg)
  tokens = jnp.ones((B, T), jnp.int32)
  params = numpy_params(model, tokens)
  mesh = mesh_from(jax.devices(), (1, 2, 1), context=4)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="config.mesh.context=1"):
    model.apply({"params": params}, tokens, cache_mode="prefill", mutable=["cache"])


# ---- Training through train.main (subprocesses, as tests/test_train_e2e.py).

CP_STEPS = 30
_CP_MESH = {"mesh.data": 1, "mesh.fsdp": 2, "mesh.context": 2, "mesh.tensor": 1}


def _cp_args(corpus, data_dir, workdir, **mesh):
  return base_args(corpus, data_dir, workdir, **{"train.num_steps": CP_STEPS, **mesh})


@pytest.fixture(scope="module")
def unsplit_run(corpus, data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("unsplit")
  result = run_main(_cp_args(corpus, data_dir, workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def context_run(corpus, data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("context2")
  result = run_main(_cp_args(corpus, data_dir, workdir, **_CP_MESH), devices=4)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_context2_training_follows_the_unsplit_run(unsplit_run, context_run):
  """fsdp 2 x context 2 on 4 devices against one device: the same losses to float round-off
  (AdamW over 30 steps; measured within 3e-7 relative)."""
  for split in ("train", "validation"):
    want, got = losses(unsplit_run, split), losses(context_run, split)
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                               rtol=F32_RTOL)


@pytest.mark.slow
def test_context2_run_resumes_bit_identical(corpus, data_dir, tmp_path, context_run):
  args = _cp_args(corpus, data_dir, tmp_path, **_CP_MESH)
  code, stderr = start_and_interrupt(args, tmp_path, signal.SIGKILL, devices=4)
  assert code == -signal.SIGKILL, stderr[-3000:]
  interrupted_at = checkpoint_steps(tmp_path)[-1]
  assert interrupted_at < CP_STEPS, "the run finished before the signal: nothing was tested"
  result = run_main(args, devices=4)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from step {interrupted_at}" in result.stderr
  assert losses(tmp_path) == losses(context_run)
  assert losses(tmp_path, "validation") == losses(context_run, "validation")


@pytest.mark.parametrize("kind,seq_len,expected", [
    ("full", 36, "config.data.seq_len=36 must be divisible by 2 x config.mesh.context=4 = 8"),
    ("local", 38, "config.data.seq_len=38 must be divisible by config.mesh.context=4 = 4")])
def test_config_check_names_seq_len_and_context(kind, seq_len, expected):
  config = common.base_config()
  config.mesh.update(data=1, fsdp=1, context=4, tensor=1)
  config.model.attention.kind = kind
  config.data.seq_len = seq_len
  with pytest.raises(config_check.ConfigError, match=re.escape(expected)):
    config_check.validate(config, num_devices=4, process_count=1)
  config.data.seq_len = 64
  config_check.validate(config, num_devices=4, process_count=1)
