"""Tests of model/: shapes and dtypes, logical axis names, masks, attention kernels against the
reference, packing (no attention across documents), RoPE, remat, and the LM loss helpers.

Tolerances: float32 comparisons use rtol = atol = 1e-5 (helpers.F32_*); bfloat16 ones use
rtol = atol = 2e-2 (helpers.BF16_*). Shape/dtype checks use jax.eval_shape (no compile).
"""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

from helpers import (BF16_ATOL, BF16_RTOL, F32_ATOL, F32_RTOL, lm_batch, numpy_params,
                     replace_cfg, tiny_model_cfg)
from model import positions as positions_lib
from model import sharding as sharding_lib
from model.attention import causal_blocks, full, masks, reference
from model.transformer import Transformer
from train.tasks import pretrain

B, T = 2, 8

# ---------------------------------------------------------------------------------------------
# Shapes, dtypes, parameter structure
# ---------------------------------------------------------------------------------------------

_VARIANTS = {
    # name: overrides of tiny_model_cfg (4 query heads, head_dim 8, d_model 32, vocab 64)
    "f32_gqa_swiglu_tied_rope": dict(dtype="float32", num_kv_heads=2),
    "bf16_gqa_swiglu_tied_rope": dict(dtype="bfloat16", num_kv_heads=2),
    "f32_mqa_gelu_untied_learned": dict(num_kv_heads=1, mlp_activation="gelu",
                                        tie_embeddings=False, positions="learned", max_len=16),
    "bf16_mha_gelu_tied_learned": dict(dtype="bfloat16", num_kv_heads=4, mlp_activation="gelu",
                                       positions="learned", max_len=16),
    "bf16_mha_swiglu_untied_rope": dict(dtype="bfloat16", num_kv_heads=4, tie_embeddings=False),
}


def _abstract_params(cfg, boxed=False):
  tokens = jnp.zeros((B, T), jnp.int32)
  variables = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), tokens)
  return variables["params"] if boxed else nn.meta.unbox(variables)["params"]


@pytest.mark.parametrize("name", sorted(_VARIANTS))
def test_logits_and_hidden_shapes_and_dtypes(name):
  cfg = tiny_model_cfg(**_VARIANTS[name])
  model = Transformer(cfg)
  tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
  params = _abstract_params(cfg)
  logits = jax.eval_shape(lambda p, t: model.apply({"params": p}, t), params, tokens)
  assert logits.shape == (B, T, cfg.vocab_size)
  assert logits.dtype == jnp.float32          # logits are float32 whatever the compute dtype
  hidden = jax.eval_shape(lambda p, t: model.apply({"params": p}, t, return_hidden=True),
                          params, tokens)
  assert hidden.shape == (B, T, cfg.d_model)
  assert hidden.dtype == cfg.compute_dtype


@pytest.mark.parametrize("name", sorted(_VARIANTS))
def test_params_are_float32_with_expected_structure(name):
  cfg = tiny_model_cfg(**_VARIANTS[name])
  params = _abstract_params(cfg)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  bad = [jax.tree_util.keystr(p) for p, x in leaves if x.dtype != jnp.float32]
  assert not bad, f"non-float32 params with dtype={cfg.dtype}: {bad}"

  attn = params["block_0"]["attn"]
  assert attn["query"]["kernel"].shape == (cfg.d_model, cfg.num_heads, cfg.head_dim)
  assert attn["key"]["kernel"].shape == (cfg.d_model, cfg.num_kv_heads, cfg.head_dim)
  assert attn["value"]["kernel"].shape == (cfg.d_model, cfg.num_kv_heads, cfg.head_dim)
  assert attn["out"]["kernel"].shape == (cfg.num_heads, cfg.head_dim, cfg.d_model)
  mlp = params["block_0"]["mlp"]
  assert ("wg" in mlp) == (cfg.mlp_activation == "swiglu")
  assert mlp["wi"]["kernel"].shape == (cfg.d_model, cfg.mlp_dim)
  assert mlp["wo"]["kernel"].shape == (cfg.mlp_dim, cfg.d_model)
  assert ("lm_head" in params) == (not cfg.tie_embeddings)
  if not cfg.tie_embeddings:
    assert params["lm_head"]["kernel"].shape == (cfg.d_model, cfg.vocab_size)
  assert ("pos_embed" in params) == (cfg.positions == "learned")
  if cfg.positions == "learned":
    assert params["pos_embed"]["pos_embedding"].shape == (cfg.max_len, cfg.d_model)
  assert params["embed"]["embedding"].shape == (cfg.vocab_size, cfg.d_model)
  assert sorted(k for k in params if k.startswith("block_")) == ["block_0", "block_1"]


@pytest.mark.parametrize("name", ["f32_gqa_swiglu_tied_rope", "f32_mqa_gelu_untied_learned"])
def test_every_param_has_logical_axis_names_of_its_rank(name):
  cfg = tiny_model_cfg(**_VARIANTS[name])
  boxed = _abstract_params(cfg, boxed=True)
  specs = nn.get_partition_spec(boxed)
  shapes = nn.meta.unbox(boxed)
  known = {rule for rule, _ in sharding_lib.LOGICAL_RULES}
  pairs = jax.tree.leaves(
      jax.tree.map(lambda s, x: (s, x.shape), specs, shapes,
                   is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)),
      is_leaf=lambda v: isinstance(v, tuple) and len(v) == 2)
  assert len(pairs) == len(jax.tree.leaves(shapes))
  for spec, shape in pairs:
    assert len(spec) == len(shape), (spec, shape)
    assert all(a in known for a in spec), (spec, known)
  assert specs["embed"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
  assert specs["block_0"]["attn"]["key"]["kernel"] == jax.sharding.PartitionSpec(
      "embed", "kv_heads", "head_dim")


@pytest.mark.slow
def test_bfloat16_compute_matches_float32_logits():
  """Same float32 params, compute dtype bf16 vs f32: logits agree to bf16 precision."""
  cfg32 = tiny_model_cfg()
  cfg16 = replace_cfg(cfg32, dtype="bfloat16")
  batch = lm_batch(B, T, cfg32.vocab_size, seed=1)
  params = numpy_params(Transformer(cfg32), batch["tokens"], seed=1)

  @jax.jit
  def both(params, batch):
    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    return (Transformer(cfg32).apply({"params": params}, batch["tokens"], **kw),
            Transformer(cfg16).apply({"params": params}, batch["tokens"], **kw))
  l32, l16 = both(params, batch)
  assert l16.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(l32)))
  assert scale > 0.5   # a meaningful comparison, not of zeros
  # bf16 has an 8-bit mantissa; through 2 layers errors stay within ~5% of the logit scale.
  np.testing.assert_allclose(l16, l32, atol=0.05 * scale, rtol=0)
  assert float(jnp.mean(jnp.abs(l16 - l32))) < 0.01 * scale


# ---------------------------------------------------------------------------------------------
# Remat: same loss and grads
# ---------------------------------------------------------------------------------------------

def _loss_fn(cfg, batch, train=False):
  model = Transformer(cfg)

  def loss_fn(params, rng):
    logits = model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"], deterministic=not train,
                         rngs={"dropout": rng})
    targets, weights = pretrain.lm_targets(batch["tokens"], batch["segment_ids"])
    loss, _ = pretrain.cross_entropy(logits, targets, weights)
    return loss / jnp.sum(weights)
  return loss_fn


@pytest.mark.slow
def test_remat_policies_give_same_loss_and_grads():
  # One layer is enough: remat wraps each block the same way. All policies in one compile.
  base = tiny_model_cfg(num_layers=1)
  batch = lm_batch(B, T, base.vocab_size, seed=2)
  params = numpy_params(Transformer(base), batch["tokens"], seed=2)
  policies = ("none", "full", "dots")

  @jax.jit
  def run(params, rng):
    return [jax.value_and_grad(_loss_fn(replace_cfg(base, remat=r), batch))(params, rng)
            for r in policies]
  (ref_loss, ref_grads), *others = run(params, jax.random.PRNGKey(0))
  assert np.isfinite(ref_loss) and ref_loss > 1.0
  for remat, (loss, grads) in zip(policies[1:], others):
    np.testing.assert_allclose(loss, ref_loss, rtol=F32_RTOL, err_msg=remat)
    chex.assert_trees_all_close(grads, ref_grads, rtol=F32_RTOL, atol=1e-6)


@pytest.mark.slow
def test_remat_with_dropout_reuses_the_same_mask():
  """With dropout on, remat must recompute the block with the same dropout mask."""
  base = tiny_model_cfg(num_layers=1, dropout_rate=0.2)
  batch = lm_batch(B, T, base.vocab_size, seed=3)
  params = numpy_params(Transformer(base), batch["tokens"], seed=3)

  @jax.jit
  def run(params, rng):
    plain = jax.value_and_grad(_loss_fn(base, batch, train=True))(params, rng)
    remat = jax.value_and_grad(_loss_fn(replace_cfg(base, remat="full"), batch, train=True))(
        params, rng)
    return plain, remat, _loss_fn(base, batch, train=False)(params, rng)
  (ref_loss, ref_grads), (loss, grads), eval_loss = run(params, jax.random.PRNGKey(7))
  assert abs(float(ref_loss) - float(eval_loss)) > 1e-3   # dropout really changed the loss
  np.testing.assert_allclose(loss, ref_loss, rtol=F32_RTOL)
  chex.assert_trees_all_close(grads, ref_grads, rtol=F32_RTOL, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------

def _pos(*rows):
  return jnp.asarray(rows, jnp.int32)


def test_causal_mask_is_lower_triangle():
  pos = masks.default_positions(2, 6)
  ok = np.asarray(masks.allowed(masks.MaskSpec(causal=True), pos, pos))
  assert ok.shape == (2, 6, 6) and ok.dtype == bool
  np.testing.assert_array_equal(ok, np.broadcast_to(np.tril(np.ones((6, 6), bool)), (2, 6, 6)))
  ok = np.asarray(masks.allowed(masks.MaskSpec(causal=False), pos, pos))
  assert ok.all()


def test_prefix_lm_mask():
  pos = masks.default_positions(2, 6)
  ok = np.asarray(masks.allowed(masks.MaskSpec(), pos, pos, prefix_len=jnp.array([3, 0])))
  want0 = np.tril(np.ones((6, 6), bool))
  want0[:, :3] = True                    # the 3-token prefix is visible to every query
  np.testing.assert_array_equal(ok[0], want0)
  np.testing.assert_array_equal(ok[1], np.tril(np.ones((6, 6), bool)))   # prefix 0 = causal
  # Inside the prefix attention is bidirectional; after it, causal.
  assert ok[0, 0, 2] and not ok[0, 3, 4] and ok[0, 4, 3]


def test_segment_mask_is_block_diagonal():
  seg = _pos([1, 1, 1, 2, 2, 3])
  pos = masks.default_positions(1, 6)
  ok = np.asarray(masks.allowed(masks.MaskSpec(causal=False), pos, pos, seg, seg))[0]
  want = np.zeros((6, 6), bool)
  for a, b in ((0, 3), (3, 5), (5, 6)):
    want[a:b, a:b] = True
  np.testing.assert_array_equal(ok, want)


def test_causal_and_segments_no_cross_document_attention():
  seg = _pos([1, 1, 1, 2, 2, 0, 0])
  pos = _pos([0, 1, 2, 0, 1, 0, 1])      # restarted per document, as the packer writes them
  ok = np.asarray(masks.allowed(masks.MaskSpec(), pos, pos, seg, seg))[0]
  want = np.zeros((7, 7), bool)
  for a, b in ((0, 3), (3, 5), (5, 7)):
    want[a:b, a:b] = np.tril(np.ones((b - a, b - a), bool))
  np.testing.assert_array_equal(ok, want)
  # Padding (segment 0) never sees a real token, and no real token sees padding.
  assert not ok[:5, 5:].any() and not ok[5:, :5].any()
  # Every row keeps at least its own position (no all-masked softmax rows).
  assert ok.diagonal().all()


def test_mask_inputs_dense_defaults_match_allowed():
  mi = masks.MaskInputs()
  np.testing.assert_array_equal(mi.dense(masks.MaskSpec(), 1, 4, 4)[0],
                                np.tril(np.ones((4, 4), bool)))
  assert masks.is_plain_causal(masks.MaskSpec(), None, None, None)
  assert not masks.is_plain_causal(masks.MaskSpec(), None, _pos([1, 1]), None)
  assert not masks.is_plain_causal(masks.MaskSpec(), _pos([0, 1]), None, None)
  assert not masks.is_plain_causal(masks.MaskSpec(), None, None, jnp.array([1]))


# ---------------------------------------------------------------------------------------------
# Attention kernels: full.attend vs reference.attend (forward and d/dq, d/dk, d/dv)
# ---------------------------------------------------------------------------------------------

def _qkv(dtype, b=2, t=8, h=4, kv=2, d=8, seed=0):
  rng = np.random.default_rng(seed)
  mk = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
  return mk(b, t, h, d), mk(b, t, kv, d), mk(b, t, kv, d), mk(b, t, h, d)


def _mask_case(case, b=2, t=8):
  if case == "plain_causal":
    return masks.MaskInputs()
  if case == "packed":
    seg = _pos([1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 2, 2, 2])
    pos = _pos([0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 0, 1, 2])
    return masks.MaskInputs(q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg)
  if case == "prefix":
    return masks.MaskInputs(prefix_len=jnp.array([3, 5], jnp.int32))
  raise ValueError(case)


def _check_full_vs_reference(test, variant, case, dtype, kv_heads, implementation="xla"):
  """implementation="auto" with block 4 on T=8 runs the causal block-skipping kernel."""
  q, k, v, cot = _qkv(dtype, kv=kv_heads)
  mi = _mask_case(case)
  spec = masks.MaskSpec(causal=True)
  # "plain_causal" must take the fused is_causal path; the others the dense-mask path.
  test.assertEqual(masks.is_plain_causal(spec, mi.q_pos, mi.q_seg, mi.prefix_len),
                   case == "plain_causal")

  def fwd_bwd(kernel):
    def run(q, k, v, mi):
      out, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, spec=spec, mask_inputs=mi,
                                                implementation=implementation, block_size=4),
                         q, k, v)
      return out, vjp(cot)
    return variant(run)(q, k, v, mi)

  out, grads = fwd_bwd(full.attend)
  ref_out, ref_grads = fwd_bwd(reference.attend)
  test.assertEqual(out.shape, q.shape)
  test.assertEqual(out.dtype, dtype)
  tol = (dict(rtol=F32_RTOL, atol=F32_ATOL) if dtype == jnp.float32
         else dict(rtol=BF16_RTOL, atol=BF16_ATOL))
  f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  chex.assert_trees_all_close(f32(out), f32(ref_out), **tol)
  chex.assert_trees_all_close(f32(grads), f32(ref_grads), **tol)
  # A meaningful comparison: outputs and every gradient are far from zero.
  test.assertGreater(float(jnp.std(out.astype(jnp.float32))), 0.1)
  for g in grads:
    test.assertGreater(float(jnp.max(jnp.abs(g.astype(jnp.float32)))), 0.05)


class AttentionKernelTest(chex.TestCase):
  """full.attend vs reference.attend, forward and vjp w.r.t. q, k, v (f32 1e-5, bf16 2e-2)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("plain_causal_gqa_f32", "plain_causal", jnp.float32, 2),
      ("packed_gqa_f32", "packed", jnp.float32, 2),
  )
  def test_full_matches_reference(self, case, dtype, kv_heads):
    _check_full_vs_reference(self, self.variant, case, dtype, kv_heads)

  # Eager (without_jit) runs are slow on small CPUs; the remaining cases run jitted only.
  @chex.variants(with_jit=True)
  @parameterized.named_parameters(
      ("plain_causal_mqa_f32", "plain_causal", jnp.float32, 1),
      ("prefix_mha_f32", "prefix", jnp.float32, 4),
      ("prefix_gqa_f32", "prefix", jnp.float32, 2),
      ("packed_gqa_bf16", "packed", jnp.bfloat16, 2),
      ("plain_causal_gqa_bf16", "plain_causal", jnp.bfloat16, 2),
  )
  def test_full_matches_reference_jit(self, case, dtype, kv_heads):
    _check_full_vs_reference(self, self.variant, case, dtype, kv_heads)


class CausalBlocksKernelTest(chex.TestCase):
  """The CPU/TPU default: causal attention skipping hidden key blocks (T=8, block 4)."""

  @chex.variants(with_jit=True)
  @parameterized.named_parameters(
      ("plain_causal_gqa_f32", "plain_causal", jnp.float32, 2),
      ("packed_gqa_f32", "packed", jnp.float32, 2),
      ("packed_mha_f32", "packed", jnp.float32, 4),
      ("plain_causal_mqa_bf16", "plain_causal", jnp.bfloat16, 1),
      ("packed_gqa_bf16", "packed", jnp.bfloat16, 2),
  )
  def test_blocks_match_reference(self, case, dtype, kv_heads):
    mi = _mask_case(case)
    self.assertTrue(causal_blocks.applies(masks.MaskSpec(), mi, 8, 8, 4))
    _check_full_vs_reference(self, self.variant, case, dtype, kv_heads, implementation="auto")

  def test_not_used_where_it_would_be_wrong(self):
    spec = masks.MaskSpec()
    self.assertFalse(causal_blocks.applies(spec, _mask_case("prefix"), 8, 8, 4))   # prefix
    self.assertFalse(causal_blocks.applies(spec, masks.MaskInputs(), 6, 6, 4))     # ragged
    self.assertFalse(causal_blocks.applies(spec, masks.MaskInputs(), 4, 8, 4))     # cross
    self.assertFalse(causal_blocks.applies(masks.MaskSpec(causal=False), masks.MaskInputs(),
                                           8, 8, 4))


@pytest.mark.slow
def test_reference_respects_segments_by_perturbation():
  """Changing document 1's keys/values leaves document 2's outputs bit-identical."""
  q, k, v, _ = _qkv(jnp.float32, b=1, t=6)
  seg = _pos([1, 1, 1, 2, 2, 2])
  pos = _pos([0, 1, 2, 0, 1, 2])
  mi = masks.MaskInputs(q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg)
  spec = masks.MaskSpec()
  k2, v2 = k.at[:, :3].add(5.0), v.at[:, :3].add(-3.0)
  for kernel in (full.attend, reference.attend):
    a = kernel(q, k, v, spec=spec, mask_inputs=mi)
    b = kernel(q, k2, v2, spec=spec, mask_inputs=mi)
    np.testing.assert_array_equal(a[:, 3:], b[:, 3:])
    assert float(jnp.max(jnp.abs(a[:, :3] - b[:, :3]))) > 0.1


# ---------------------------------------------------------------------------------------------
# Packing at model level: a packed document's logits equal those of the document alone
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_packed_document_logits_equal_document_alone(positions):
  cfg = tiny_model_cfg(positions=positions, max_len=16)
  model = Transformer(cfg)
  rng = np.random.default_rng(4)
  doc1 = rng.integers(1, cfg.vocab_size, 5).astype(np.int32)
  doc2 = rng.integers(1, cfg.vocab_size, 3).astype(np.int32)
  t = 8
  pad = lambda x, n: np.concatenate([x, np.zeros(n, np.int32)])
  # Row 0: doc1 | doc2 packed. Row 1: doc2 alone + padding. Row 2: doc1 alone + padding.
  tokens = np.stack([np.concatenate([doc1, doc2]), pad(doc2, 5), pad(doc1, 3)])
  segs = np.array([[1] * 5 + [2] * 3, [1] * 3 + [0] * 5, [1] * 5 + [0] * 3], np.int32)
  pos = np.array([[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 0, 0, 0, 0, 0],
                  [0, 1, 2, 3, 4, 0, 0, 0]], np.int32)
  params = numpy_params(model, tokens, seed=4)
  apply = jax.jit(lambda p, x, **kw: model.apply({"params": p}, x, **kw))
  logits = apply(params, tokens, positions=pos, segment_ids=segs)
  tol = dict(rtol=F32_RTOL, atol=F32_ATOL)
  np.testing.assert_allclose(logits[0, 5:], logits[1, :3], **tol)   # doc2, second in its row
  np.testing.assert_allclose(logits[0, :5], logits[2, :5], **tol)   # doc1
  # And doc2 alone in an unpacked row (no segments/positions: the plain causal path).
  alone = apply(params, doc2[None])
  np.testing.assert_allclose(logits[0, 5:], alone[0], **tol)
  # Sanity: without segment ids doc2 would see doc1, and its logits would change.
  leaky = apply(params, tokens[:1], positions=pos[:1], segment_ids=np.ones_like(segs[:1]))
  assert float(jnp.max(jnp.abs(leaky[0, 5:] - alone[0]))) > 1e-2


# ---------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------

def _rope_inputs(seed=0, b=2, t=5, h=3, d=16):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
  pos = jnp.asarray(rng.integers(0, 1000, (b, t)), jnp.int32)
  return x, pos


def test_rope_preserves_norm():
  x, pos = _rope_inputs()
  y = positions_lib.rope(x, pos)
  assert y.shape == x.shape and y.dtype == x.dtype
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1),
                             rtol=1e-5)
  assert float(jnp.max(jnp.abs(y - x))) > 0.1     # it did rotate


def test_rope_position_zero_is_identity():
  x, _ = _rope_inputs()
  y = positions_lib.rope(x, jnp.zeros(x.shape[:2], jnp.int32))
  np.testing.assert_array_equal(y, x)


def test_rope_dot_product_depends_only_on_position_difference():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)

  def dot(m, n):
    qm = positions_lib.rope(q, jnp.full((1, 1), m, jnp.int32))
    kn = positions_lib.rope(k, jnp.full((1, 1), n, jnp.int32))
    return float(jnp.sum(qm * kn))
  base = dot(7, 3)
  for shift in (1, 10, 123):
    np.testing.assert_allclose(dot(7 + shift, 3 + shift), base, rtol=1e-4, atol=1e-4)
  assert abs(dot(7, 4) - base) > 1e-3       # a different difference gives a different product


def test_rope_half_split_rotation_value():
  """With D=2 the single pair (x0, x1) is rotated by exactly `position` radians."""
  x = jnp.asarray([[[[1.0, 2.0]]]], jnp.float32)
  p = 3
  y = positions_lib.rope(x, jnp.full((1, 1), p, jnp.int32))[0, 0, 0]
  want = [np.cos(p) * 1 - np.sin(p) * 2, np.cos(p) * 2 + np.sin(p) * 1]
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="even head_dim"):
    positions_lib.rope(jnp.ones((1, 1, 1, 3)), jnp.zeros((1, 1), jnp.int32))


# ---------------------------------------------------------------------------------------------
# LM targets and cross entropy
# ---------------------------------------------------------------------------------------------

def test_lm_targets_shift_and_weights():
  tokens = jnp.asarray([[10, 11, 12, 13, 14, 15, 0, 0]], jnp.int32)
  segs = jnp.asarray([[1, 1, 1, 2, 2, 2, 0, 0]], jnp.int32)
  targets, weights = pretrain.lm_targets(tokens, segs)
  np.testing.assert_array_equal(targets, [[11, 12, 13, 14, 15, 0, 0, 0]])
  # Scored: 10->11, 11->12 (doc 1); 13->14, 14->15 (doc 2). Not 12->13 (boundary), not the
  # last token of doc 2 into padding, not padding, not the last column.
  np.testing.assert_array_equal(weights, [[1, 1, 0, 1, 1, 0, 0, 0]])
  assert weights.dtype == jnp.float32
  targets, weights = pretrain.lm_targets(tokens)
  np.testing.assert_array_equal(targets, [[11, 12, 13, 14, 15, 0, 0, 0]])
  np.testing.assert_array_equal(weights, [[1, 1, 1, 1, 1, 1, 1, 0]])


def test_cross_entropy_matches_optax():
  rng = np.random.default_rng(5)
  logits = jnp.asarray(3 * rng.standard_normal((2, 6, 11)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 11, (2, 6)), jnp.int32)
  weights = jnp.asarray(rng.integers(0, 2, (2, 6)), jnp.float32)
  loss, m = pretrain.cross_entropy(logits, targets, weights)
  want = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(m["loss"], want, rtol=1e-6)
  assert float(m["weight"]) == float(jnp.sum(weights))
  acc = np.sum((np.argmax(logits, -1) == np.asarray(targets)) * np.asarray(weights))
  assert float(m["accuracy"]) == acc
  # bf16 logits are upcast before the softmax.
  loss16, _ = pretrain.cross_entropy(logits.astype(jnp.bfloat16), targets, weights)
  want16 = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.bfloat16).astype(jnp.float32), targets) * weights)
  np.testing.assert_allclose(loss16, want16, rtol=1e-6)


def test_cross_entropy_z_loss_term():
  rng = np.random.default_rng(6)
  logits = jnp.asarray(rng.standard_normal((1, 4, 7)), jnp.float32)
  targets = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
  weights = jnp.asarray([[1, 1, 0, 1]], jnp.float32)
  base, _ = pretrain.cross_entropy(logits, targets, weights, z_loss=0.0)
  total, m = pretrain.cross_entropy(logits, targets, weights, z_loss=1e-2)
  lse = np.log(np.sum(np.exp(np.asarray(logits, np.float64)), axis=-1))
  z = float(np.sum(lse ** 2 * np.asarray(weights)))
  np.testing.assert_allclose(m["z_loss"], z, rtol=1e-5)
  np.testing.assert_allclose(total - base, 1e-2 * z, rtol=1e-4)
  np.testing.assert_allclose(m["loss"], base, rtol=1e-6)   # "loss" metric excludes z-loss


@pytest.mark.slow
def test_chunked_cross_entropy_equals_plain_loss_and_grads(chunk=5):
  """The fused chunked head + loss (optim.loss_chunk) = logits then cross_entropy: the loss,
  every metric, and the gradient w.r.t. all params (the tied embedding gets both its gather's
  and the head's gradient), with z-loss and packed weights; chunk 5 does not divide
  B * T = 24 (padded rows)."""
  cfg = tiny_model_cfg(tie_embeddings=True)
  batch = lm_batch(2, 12, cfg.vocab_size, seed=4, packed=True)
  model = Transformer(cfg)
  params = numpy_params(model, batch["tokens"])
  plain = pretrain.PretrainTask(model, z_loss=1e-2)
  chunked = pretrain.PretrainTask(model, z_loss=1e-2, loss_chunk=chunk)

  def run(task):
    grad = jax.value_and_grad(lambda p: task.loss(p, batch, jax.random.PRNGKey(0), True),
                              has_aux=True)
    return jax.jit(grad)(params)
  (loss, metrics), grads = run(chunked)
  (want, want_metrics), want_grads = run(plain)
  chex.assert_trees_all_close(loss, want, rtol=F32_RTOL, atol=F32_ATOL)
  chex.assert_trees_all_close(metrics, want_metrics, rtol=F32_RTOL, atol=F32_ATOL)
  chex.assert_trees_all_close(grads, want_grads, rtol=F32_RTOL, atol=F32_ATOL)
  assert float(jnp.max(jnp.abs(grads["embed"]["embedding"]))) > 1e-3
  # Undifferentiated (evaluation: the custom_vjp's primal, sums only) it is the same loss too.
  evaluate = lambda task: jax.jit(lambda p: task.loss(p, batch, None, False))(params)
  chex.assert_trees_all_close(evaluate(chunked), evaluate(plain), rtol=F32_RTOL, atol=F32_ATOL)


def test_auto_loss_chunk_fuses_only_where_a_devices_logits_pass_a_gibibyte():
  from configs import bench_step
  from train import build
  # One GPU, 8 x 2048 tokens, a 50k vocabulary: 3.1 GiB of float32 logits -> fused.
  assert pretrain.auto_loss_chunk(8, 2048, 50304, 1) == 1024
  assert pretrain.auto_loss_chunk(256, 4096, 128256, 64) == 0    # sharded: plain
  assert pretrain.auto_loss_chunk(16, 128, 2048, 1) == 0         # legal_pretrain :tiny
  config = bench_step.get_config("tiny")
  assert config.optim.loss_chunk == -1
  assert build.make_task(config, None).loss_chunk == 0
  config.data.update(batch_size=8, seq_len=2048, vocab_size=50304)
  assert build.make_task(config, None).loss_chunk == 1024
  config.optim.update(grad_accum_steps=4)                          # per micro-batch: 0.8 GiB
  assert build.make_task(config, None).loss_chunk == 0
  config.optim.update(grad_accum_steps=1, loss_chunk=0)
  assert build.make_task(config, None).loss_chunk == 0             # an explicit choice is kept
