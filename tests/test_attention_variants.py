"""The full / local / blocked kernels against reference.attend: forward and d/dq, d/dk, d/dv;
also the two causal paths they dispatch to (flash: CPU full + blocked; causal_blocks: other
backends' full) called directly, so each is covered whatever this machine's backend.

Every case uses an odd length (T=37, block 8, so blocks are padded) and B=2, D=8. Tolerances:
float32 rtol = atol = 1e-5, bfloat16 rtol = atol = 2e-2 (helpers.F32_* / BF16_*). Also: the
blocked kernel's compiled fwd+bwd memory is far below one dense score matrix, and the local
kernel's FLOPs and memory grow linearly in T at a fixed window.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from helpers import (BF16_ATOL, BF16_RTOL, F32_ATOL, F32_RTOL, lm_batch, numpy_params,
                     replace_cfg, tiny_model_cfg)
from model.attention import KERNELS, causal_blocks, flash, full, masks, reference
from model.transformer import Transformer

T, BLOCK = 37, 8


def _qkv(dtype, kv_heads, b=2, t=T, h=4, d=8):
  rng = np.random.default_rng(0)
  mk = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
  return mk(b, t, h, d), mk(b, t, kv_heads, d), mk(b, t, kv_heads, d), mk(b, t, h, d)


def _packed(doc_lengths_per_row, t=T):
  """Segment ids 1, 2, ... with positions restarting per document; the rest is padding (0)."""
  segs = np.zeros((len(doc_lengths_per_row), t), np.int32)
  pos = np.zeros((len(doc_lengths_per_row), t), np.int32)
  for r, lengths in enumerate(doc_lengths_per_row):
    start = 0
    for i, n in enumerate(lengths):
      segs[r, start:start + n], pos[r, start:start + n] = i + 1, np.arange(n)
      start += n
  return masks.MaskInputs(q_pos=jnp.asarray(pos), kv_pos=jnp.asarray(pos),
                          q_seg=jnp.asarray(segs), kv_seg=jnp.asarray(segs))


_INPUTS = {
    "causal": masks.MaskInputs(),
    # One padding token at the end of row 0 (padding runs break the local index assumption).
    "packed": _packed([[10, 15, 11], [3, 34]]),
    "prefix": masks.MaskInputs(prefix_len=jnp.array([5, 20], jnp.int32)),
    # The summarizer's rows: `[bos] document [eos] summary` then padding (segment 0).
    "prefix_padded": masks.MaskInputs(
        prefix_len=jnp.array([5, 20], jnp.int32),
        q_seg=jnp.asarray((np.arange(T)[None] < np.array([[30], [T]])).astype(np.int32)),
        kv_seg=jnp.asarray((np.arange(T)[None] < np.array([[30], [T]])).astype(np.int32))),
}
_SPECS = {
    "nowindow": masks.MaskSpec(),
    "window": masks.MaskSpec(window=11),
    "window_globals": masks.MaskSpec(window=6, num_global=3),
}


_PATHS = {
    **KERNELS,
    "flash": lambda q, k, v, *, spec, mask_inputs, implementation, block_size: flash.attend(
        q, k, v, spec=spec, mask_inputs=mask_inputs, block=block_size),
    "causal_blocks": lambda q, k, v, *, spec, mask_inputs, implementation, block_size: (
        causal_blocks.attend(q, k, v, spec=spec, mask_inputs=mask_inputs, block=block_size)),
}


def _check_vs_reference(kernel, spec, mi, dtype, kv_heads, implementation="xla"):
  # causal_blocks needs T % block == 0 (its callers check `applies`): T = 32 there.
  q, k, v, cot = _qkv(dtype, kv_heads, t=32 if kernel == "causal_blocks" else T)

  def fwd_bwd(fn):
    def run(q, k, v, mi):
      out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, spec=spec, mask_inputs=mi,
                                            implementation=implementation, block_size=BLOCK),
                         q, k, v)
      return out, vjp(cot)
    return jax.jit(run)(q, k, v, mi)

  out, grads = fwd_bwd(_PATHS[kernel])
  ref_out, ref_grads = fwd_bwd(reference.attend)
  assert out.shape == q.shape and out.dtype == dtype
  tol = (dict(rtol=F32_RTOL, atol=F32_ATOL) if dtype == jnp.float32
         else dict(rtol=BF16_RTOL, atol=BF16_ATOL))
  f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  chex.assert_trees_all_close(f32(out), f32(ref_out), **tol)
  chex.assert_trees_all_close(f32(grads), f32(ref_grads), **tol)
  # A meaningful comparison: outputs and every gradient are far from zero.
  assert float(jnp.std(out.astype(jnp.float32))) > 0.1
  for g in grads:
    assert float(jnp.max(jnp.abs(g.astype(jnp.float32)))) > 0.05


class KernelsMatchReferenceTest(parameterized.TestCase):
  """(kernel, pattern, inputs, dtype, kv heads): GQA = 2 of 4 heads, MQA = 1, MHA = 4."""
  # 25 forward + backward compiles: the quick tier keeps test_model's full / causal-blocks
  # kernel checks and this module's mask and cost tests.
  pytestmark = pytest.mark.slow

  @parameterized.named_parameters(
      ("full_causal_gqa_f32", "full", "nowindow", "causal", jnp.float32, 2),
      ("full_window_globals_packed_gqa_f32", "full", "window_globals", "packed", jnp.float32, 2),
      ("full_window_prefix_mqa_f32", "full", "window", "prefix", jnp.float32, 1),
      ("local_window_causal_gqa_f32", "local", "window", "causal", jnp.float32, 2),
      ("local_window_causal_mqa_bf16", "local", "window", "causal", jnp.bfloat16, 1),
      ("local_window_packed_gqa_f32", "local", "window", "packed", jnp.float32, 2),
      ("local_window_packed_mha_bf16", "local", "window", "packed", jnp.bfloat16, 4),
      ("local_window_globals_causal_mqa_f32", "local", "window_globals", "causal",
       jnp.float32, 1),
      ("blocked_causal_gqa_f32", "blocked", "nowindow", "causal", jnp.float32, 2),
      ("blocked_causal_mqa_bf16", "blocked", "nowindow", "causal", jnp.bfloat16, 1),
      ("blocked_packed_gqa_f32", "blocked", "nowindow", "packed", jnp.float32, 2),
      ("blocked_prefix_gqa_f32", "blocked", "nowindow", "prefix", jnp.float32, 2),
      ("blocked_prefix_mha_bf16", "blocked", "nowindow", "prefix", jnp.bfloat16, 4),
      ("blocked_window_causal_mqa_f32", "blocked", "window", "causal", jnp.float32, 1),
      ("blocked_window_globals_packed_gqa_f32", "blocked", "window_globals", "packed",
       jnp.float32, 2),
      ("flash_causal_mha_f32", "flash", "nowindow", "causal", jnp.float32, 4),
      ("flash_causal_gqa_bf16", "flash", "nowindow", "causal", jnp.bfloat16, 2),
      ("flash_packed_mqa_f32", "flash", "nowindow", "packed", jnp.float32, 1),
      ("flash_window_globals_packed_gqa_f32", "flash", "window_globals", "packed",
       jnp.float32, 2),
      ("flash_window_causal_gqa_f32", "flash", "window", "causal", jnp.float32, 2),
      # Prefix-LM: row 1's prefix spans 3 key blocks, so early query blocks look ahead.
      ("flash_prefix_gqa_f32", "flash", "nowindow", "prefix", jnp.float32, 2),
      ("flash_prefix_padded_mha_f32", "flash", "nowindow", "prefix_padded", jnp.float32, 4),
      ("flash_prefix_padded_mqa_bf16", "flash", "nowindow", "prefix_padded", jnp.bfloat16, 1),
      ("blocked_prefix_padded_gqa_f32", "blocked", "nowindow", "prefix_padded", jnp.float32,
       2),
      ("causal_blocks_causal_gqa_f32", "causal_blocks", "nowindow", "causal", jnp.float32, 2),
  )
  def test_matches_reference(self, kernel, spec, inputs, dtype, kv_heads):
    _check_vs_reference(kernel, _SPECS[spec], _INPUTS[inputs], dtype, kv_heads)


def test_prefix_lm_takes_the_flash_path_only_with_index_positions():
  """The summarizer's prefix mask runs the tiled kernel (the generic path is about twice as slow
  at 4k; docs/results/step_time.md); a prefix over explicit positions (packed rows) cannot use
  its index bound."""
  spec = masks.MaskSpec()
  assert flash.applies(spec, _INPUTS["prefix_padded"], T, T)
  packed = _INPUTS["packed"]
  with_positions = masks.MaskInputs(q_pos=packed.q_pos, kv_pos=packed.kv_pos,
                                    prefix_len=jnp.array([5, 20], jnp.int32))
  assert not flash.applies(spec, with_positions, T, T)
  assert not flash.applies(masks.MaskSpec(causal=False), _INPUTS["prefix"], T, T)


def test_window_masks_out_distant_keys_but_not_globals():
  spec = masks.MaskSpec(window=3, num_global=1)
  ok = np.asarray(masks.MaskInputs().dense(spec, 1, 6, 6)[0])
  expected = np.tril(np.ones((6, 6), bool)) & ~np.tril(np.ones((6, 6), bool), -3)
  expected[:, 0] = True   # the global key stays visible beyond the window, never in the future
  np.testing.assert_array_equal(ok, expected)


@pytest.mark.slow
def test_full_with_window_on_the_causal_blocks_path_matches_reference():
  """causal_blocks masks with `allowed`, so a window/globals spec is still exact there."""
  spec, mi = _SPECS["window_globals"], masks.MaskInputs()
  assert causal_blocks.applies(spec, mi, 32, 32, BLOCK)
  q, k, v, _ = _qkv(jnp.float32, 2, t=32)
  out = jax.jit(lambda q, k, v: KERNELS["full"](q, k, v, spec=spec, mask_inputs=mi,
                                                implementation="auto", block_size=BLOCK))(q, k, v)
  chex.assert_trees_all_close(out, reference.attend(q, k, v, spec=spec, mask_inputs=mi),
                              rtol=F32_RTOL, atol=F32_ATOL)


@pytest.mark.parametrize("spec, inputs, match", [
    (masks.MaskSpec(), "causal", "window"),
    (masks.MaskSpec(window=4), "prefix", "prefix-LM"),
    (masks.MaskSpec(window=4, num_global=2), "packed", "global tokens with packed"),
])
def test_local_rejects_what_it_does_not_support(spec, inputs, match):
  q, k, v, _ = _qkv(jnp.float32, 2)
  with pytest.raises(ValueError, match=match):
    KERNELS["local"](q, k, v, spec=spec, mask_inputs=_INPUTS[inputs], block_size=BLOCK)


def _compiled(fn, t, b=1, h=2, d=16):
  x = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
  return jax.jit(fn).lower(x, x, x).compile()


def test_blocked_fwd_bwd_memory_is_far_below_dense_scores():
  t, h = 4096, 2
  loss = lambda q, k, v: KERNELS["blocked"](q, k, v, spec=masks.MaskSpec(),
                                            mask_inputs=masks.MaskInputs()).sum()
  temp = _compiled(jax.grad(loss, argnums=(0, 1, 2)), t, h=h).memory_analysis().temp_size_in_bytes
  dense_scores = 1 * h * t * t * 4
  assert temp < dense_scores / 4, (temp, dense_scores)


def test_local_cost_grows_linearly_at_fixed_window():
  spec = masks.MaskSpec(window=32)
  fn = lambda q, k, v: KERNELS["local"](q, k, v, spec=spec, mask_inputs=masks.MaskInputs(),
                                        block_size=16)
  small, large = _compiled(fn, 256), _compiled(fn, 512)
  flops = large.cost_analysis()["flops"] / small.cost_analysis()["flops"]
  temp = (large.memory_analysis().temp_size_in_bytes
          / small.memory_analysis().temp_size_in_bytes)
  assert 1.8 < flops < 2.2, flops   # quadratic attention would give ~4
  assert 1.8 < temp < 2.2, temp


@pytest.mark.slow
@pytest.mark.parametrize("kind, overrides", [
    ("blocked", dict(attention_block_size=8)),
    ("local", dict(attention_block_size=8, attention_window=16)),   # window covers the row
])
def test_transformer_with_kernel_matches_full(kind, overrides):
  """Wiring: config kind/window reach the kernel; exact variants give full's logits."""
  cfg = tiny_model_cfg()
  batch = lm_batch(2, 16, cfg.vocab_size, seed=2, packed=kind == "blocked")
  params = numpy_params(Transformer(cfg), batch["tokens"])
  kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
  logits = lambda c: jax.jit(Transformer(c).apply)({"params": params}, batch["tokens"], **kw)
  chex.assert_trees_all_close(logits(replace_cfg(cfg, attention_kind=kind, **overrides)),
                              logits(cfg), rtol=F32_RTOL, atol=F32_ATOL)


@pytest.mark.parametrize("packed,prefix,window,dtype,want", [
    (False, False, None, jnp.bfloat16, "cudnn"),
    (True, False, None, jnp.bfloat16, "cudnn"),      # packed rows: cuDNN with their mask
    (True, False, None, jnp.float32, "causal_blocks"),   # cuDNN computes bf16/fp16 only
    (True, True, None, jnp.bfloat16, "xla"),         # a prefix-LM row: the dense mask
    (True, False, 8, jnp.bfloat16, "causal_blocks"),  # a window: the block kernel
])
def test_auto_on_a_gpu_sends_causal_rows_plain_or_packed_to_cudnn(monkeypatch, packed, prefix,
                                                                  window, dtype, want):
  """The dispatch as a GPU process sees it (the backend faked): what `choose` names is what
  `attend` calls, the mask passed exactly when the rows are packed."""
  from model.attention import full
  monkeypatch.setattr(full.jax, "default_backend", lambda: "gpu")
  b, t = 2, 32
  seg = jnp.asarray(np.repeat([[1] * 20 + [2] * 12], b, 0), jnp.int32)
  pos = jnp.asarray(np.repeat([list(range(20)) + list(range(12))], b, 0), jnp.int32)
  mi = masks.MaskInputs(q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg,
                        prefix_len=jnp.full((b,), 4) if prefix else None) if packed else \
      masks.MaskInputs()
  spec = masks.MaskSpec(causal=True, window=window)
  assert full.choose("auto", dtype, spec, mi, t, t, block_size=8) == want
  calls = []

  def fake_library_kernel(q, k, v, *, implementation, mask=None, is_causal=False):
    calls.append((implementation, mask is not None, is_causal))
    return q
  monkeypatch.setattr(full.jax.nn, "dot_product_attention", fake_library_kernel)
  q = jnp.zeros((b, t, 2, 8), dtype)
  full.attend(q, q, q, spec=spec, mask_inputs=mi, block_size=8)
  if want in ("cudnn", "xla"):
    assert calls == [(want, packed, not packed)]
  else:
    assert calls == []   # the project's own kernel ran


def test_an_ahead_of_time_compile_chooses_the_kernels_of_its_target_platform():
  # A TPU slice compiled on a CPU host traces with TPU's choice (train/aot.py), not the CPU's.
  from model.attention import platform
  spec, mi = masks.MaskSpec(causal=True), masks.MaskInputs()
  here = full.choose("auto", jnp.float32, spec, mi, 256, 256)
  assert here == ("flash" if jax.default_backend() == "cpu" else here)
  with platform.compiling_for("tpu"):
    assert platform.name() == "tpu"
    assert full.choose("auto", jnp.float32, spec, mi, 256, 256) == "causal_blocks"
    with platform.compiling_for("gpu"):
      assert full.choose("auto", jnp.bfloat16, spec, mi, 256, 256) == "cudnn"
    assert platform.name() == "tpu"
  assert platform.name() == jax.default_backend()
