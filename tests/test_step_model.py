"""The HLO walk (loops multiplied out, collective bytes and groups, FLOPs, HBM bytes) and the
step-time prediction built on it, on hand-written HLO and on a compile for 8 CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from train import hlo_walk
from train import step_model
from train import topologies

# A while loop of 4 trips whose body all-gathers a bf16[8,512] shard over 4 devices (async
# pair) and multiplies; inside it a nested loop of 3 trips all-reduces an f32[1024].
NESTED = """HloModule jit_step, is_scheduled=true

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%inner_body (p: (s32[], f32[1024])) -> (s32[], f32[1024]) {
  %p = (s32[], f32[1024]{0}) parameter(0)
  %x = f32[1024]{0} get-tuple-element((s32[], f32[1024]{0}) %p), index=1
  %ar = f32[1024]{0} all-reduce(f32[1024]{0} %x), channel_id=2, replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add
  %i = s32[] get-tuple-element((s32[], f32[1024]{0}) %p), index=0
  ROOT %t = (s32[], f32[1024]{0}) tuple(s32[] %i, f32[1024]{0} %ar)
}

%inner_cond (p: (s32[], f32[1024])) -> pred[] {
  %p = (s32[], f32[1024]{0}) parameter(0)
  %i = s32[] get-tuple-element((s32[], f32[1024]{0}) %p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

%fused_dot (param_0: bf16[32,512], param_1: bf16[512,256]) -> bf16[32,256] {
  %param_0 = bf16[32,512]{1,0} parameter(0)
  %param_1 = bf16[512,256]{1,0} parameter(1)
  ROOT %d = bf16[32,256]{1,0} dot(bf16[32,512]{1,0} %param_0, bf16[512,256]{1,0} %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (p: (s32[], bf16[8,512], f32[1024])) -> (s32[], bf16[8,512], f32[1024]) {
  %p = (s32[], bf16[8,512]{1,0}, f32[1024]{0}) parameter(0)
  %w = bf16[8,512]{1,0:T(8,128)(2,1)} get-tuple-element(%p), index=1
  %ags = (bf16[8,512]{1,0}, bf16[32,512]{1,0}) all-gather-start(bf16[8,512]{1,0:T(8,128)(2,1)} %w), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, use_global_device_ids=true
  %agd = bf16[32,512]{1,0} all-gather-done((bf16[8,512]{1,0}, bf16[32,512]{1,0}) %ags)
  %k = bf16[512,256]{1,0} constant({...})
  %f = bf16[32,256]{1,0} fusion(bf16[32,512]{1,0} %agd, bf16[512,256]{1,0} %k), kind=kOutput, calls=%fused_dot
  %x = f32[1024]{0} get-tuple-element(%p), index=2
  %i0 = s32[] constant(0)
  %it = (s32[], f32[1024]{0}) tuple(s32[] %i0, f32[1024]{0} %x)
  %inner = (s32[], f32[1024]{0}) while((s32[], f32[1024]{0}) %it), condition=%inner_cond, body=%inner_body
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], bf16[8,512]{1,0}, f32[1024]{0}) tuple(s32[] %i, bf16[8,512]{1,0} %w, f32[1024]{0} %x)
}

%cond (p: (s32[], bf16[8,512], f32[1024])) -> pred[] {
  %p = (s32[], bf16[8,512]{1,0}, f32[1024]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(99)
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main (a: bf16[8,512], b: f32[1024]) -> f32[1024] {
  %a = bf16[8,512]{1,0} parameter(0)
  %b = f32[1024]{0} parameter(1)
  %z = s32[] constant(0)
  %t = (s32[], bf16[8,512]{1,0}, f32[1024]{0}) tuple(s32[] %z, bf16[8,512]{1,0} %a, f32[1024]{0} %b)
  %loop = (s32[], bf16[8,512]{1,0}, f32[1024]{0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %out = f32[1024]{0} get-tuple-element(%loop), index=2
}
"""


def test_loops_multiply_collectives_and_flops():
  counts = hlo_walk.walk(NESTED, num_devices=8)
  assert sorted(counts.loops) == [("body", 4), ("inner_body", 3)]
  by_kind = hlo_walk.count_by_kind(counts.collectives)
  assert by_kind["all-gather"] == 4 and by_kind["all-reduce"] == 12   # 4 and 4 x 3
  ag = next(c for c in counts.collectives if c.kind == "all-gather")
  assert ag.operand_bytes == 8 * 512 * 2
  assert ag.groups.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
  ar = next(c for c in counts.collectives if c.kind == "all-reduce")
  assert ar.operand_bytes == 4096 and ar.groups.shape == (2, 4)
  # The fused dot, 4 times: 2 x 32 x 256 outputs x 512 contracted.
  assert counts.flops == 4 * 2 * 32 * 256 * 512


def test_trip_count_from_the_condition_without_annotation():
  comps, _ = hlo_walk.parse_computations(NESTED)
  inner = next(i for i in comps["body"].instructions if i.opcode == "while")
  assert hlo_walk.trip_count(inner, comps) == 3


def test_hbm_bytes_skip_fusion_internals_and_count_dynamic_slices_by_slice():
  hlo = """HloModule m

%fused (param_0: f32[32,1024], param_1: s32[]) -> f32[1,1024] {
  %param_0 = f32[32,1024]{1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = f32[1,1024]{1,0} dynamic-slice(f32[32,1024]{1,0} %param_0, s32[] %param_1, s32[] %z), dynamic_slice_sizes={1,1024}
}

ENTRY %main (w: f32[32,1024], i: s32[]) -> f32[1,1024] {
  %w = f32[32,1024]{1,0} parameter(0)
  %i = s32[] parameter(1)
  ROOT %f = f32[1,1024]{1,0} fusion(f32[32,1024]{1,0} %w, s32[] %i), kind=kLoop, calls=%fused
}
"""
  counts = hlo_walk.walk(hlo, num_devices=1)
  # The slice read (4 KiB) + the s32 index + the 4 KiB result, not the 128 KiB stack.
  assert counts.hbm_bytes == 4096 + 4 + 4096


def test_replica_group_spellings():
  assert hlo_walk.replica_groups("replica_groups=[2,4]<=[8]", 8).tolist() == [
      [0, 1, 2, 3], [4, 5, 6, 7]]
  assert hlo_walk.replica_groups("replica_groups=[4,2]<=[2,4]T(1,0)", 8).tolist() == [
      [0, 4], [1, 5], [2, 6], [3, 7]]
  assert hlo_walk.replica_groups("replica_groups={{0,2},{1,3}}", 4).tolist() == [[0, 2], [1, 3]]
  assert hlo_walk.replica_groups("replica_groups={}", 4).tolist() == [[0, 1, 2, 3]]
  assert hlo_walk.replica_groups("source_target_pairs={{0,1},{1,0}}", 2).tolist() == [
      [0, 1], [1, 0]]


def test_ring_bytes():
  mib = 2 ** 20
  assert step_model.link_bytes("all-gather", 64 * mib, 64) == 63 * mib
  assert step_model.link_bytes("reduce-scatter", 64 * mib, 64) == 63 * mib
  assert step_model.link_bytes("all-reduce", 64 * mib, 64) == 126 * mib
  assert step_model.link_bytes("all-to-all", 8 * mib, 8) == 7 * mib
  assert step_model.link_bytes("collective-permute", 5 * mib, 2) == 5 * mib
  assert step_model.link_bytes("all-reduce", 64 * mib, 1) == 0


def _collective(kind, operand, groups, times=1):
  return hlo_walk.Collective(kind, operand, np.array(groups), times, "c")


def test_a_group_across_slices_sends_its_share_over_dcn():
  # 2 slices x 4 devices; an all-reduce over all 8 of 8 MiB: rings of 4 within each slice
  # over ICI (2 x 3/4 x 8 MiB), then each device's quarter across the 2 slices (2 x 1/2 x 2).
  layout = step_model.Layout((0, 0, 0, 0, 1, 1, 1, 1), ((),) * 8)
  mib = 2 ** 20
  ici, dcn, _ = step_model.split(_collective("all-reduce", 8 * mib, [list(range(8))]), layout, 2)
  assert (ici, dcn) == (12 * mib, 2 * mib)
  ici, dcn, _ = step_model.split(_collective("all-reduce", 8 * mib, [[0, 1, 2, 3]]), layout, 2)
  assert (ici, dcn) == (12 * mib, 0)
  ici, dcn, _ = step_model.split(_collective("collective-permute", mib, [[3, 4]]), layout, 2)
  assert (ici, dcn) == (0, mib)


def test_port_share_from_coordinates():
  # A 2x2 torus: a group along x drives half the ports, one over both dimensions all of them.
  layout = step_model.Layout((0,) * 4, ((0, 0), (1, 0), (0, 1), (1, 1)))
  assert step_model.split(_collective("all-gather", 1, [[0, 1]]), layout, 2)[2] == 0.5
  assert step_model.split(_collective("all-gather", 1, [[0, 1, 2, 3]]), layout, 2)[2] == 1.0


def test_prediction_combines_bounds():
  chip = topologies.CHIPS["v5e"]   # 197 TFLOP/s, 819 GB/s HBM, 400 GB/s ICI, 25 Gbps DCN
  counts = hlo_walk.StepCounts(flops=197e12, hbm_bytes=819e9 / 2, loops=[], collectives=[
      _collective("all-reduce", 100e9, [list(range(256))], times=2)])
  pred = step_model.predict(counts, chip, None, 1.0, model_flops_per_device=98.5e12)
  assert pred["compute_s"] == pytest.approx(1.0) and pred["memory_s"] == pytest.approx(0.5)
  ici = 2 * 2 * 255 / 256 * 100e9 / 400e9
  assert pred["ici_s"] == pytest.approx(ici) and pred["dcn_s"] == 0
  assert pred["predicted_step_s"] == pytest.approx(1.0) and pred["bound"] == "compute"
  assert pred["predicted_step_no_overlap_s"] == pytest.approx(1.5 + ici)
  assert pred["mfu_bound"] == pytest.approx(0.5)


def test_fsdp_all_gathers_counted_per_scanned_layer_on_8_cpu_devices():
  # Weights sharded 8 ways, used inside a scan of 5 steps: the compiled loop gathers them.
  mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))

  def step(ws, x):
    def layer(h, w):
      return jnp.tanh(h @ w), None
    return jax.lax.scan(layer, x, ws)[0].sum()

  f = jax.jit(step, in_shardings=(NamedSharding(mesh, P(None, "fsdp")),
                                  NamedSharding(mesh, P("fsdp"))))
  compiled = f.lower(jax.ShapeDtypeStruct((5, 64, 64), jnp.float32),
                     jax.ShapeDtypeStruct((64, 64), jnp.float32)).compile()
  counts = hlo_walk.walk(compiled.as_text(), num_devices=8)
  assert [n for _, n in counts.loops] == [5]
  static = topologies.count_collectives(compiled.as_text())["all-gather"]
  per_step = hlo_walk.count_by_kind(counts.collectives)["all-gather"]
  assert static >= 1 and per_step == 5 * static   # gathered once per scanned step
  gather = next(c for c in counts.collectives if c.kind == "all-gather")
  assert gather.operand_bytes == 8 * 64 * 4 and gather.groups.shape == (1, 8)
  # Each step: an [8, 64] row shard times the gathered [64, 64] weight.
  assert counts.flops == 5 * 2 * 8 * 64 * 64


def test_convolution_flops_count_only_real_window_taps():
  # XLA:TPU's form of a q projection [4,4096,4096] x [4096,32,128]: the 32 heads slide a window
  # of 32 over a size-1 dimension padded by 31 each side, so each output sees one real tap.
  comp = hlo_walk.Computation("c", [], {
      "x": "bf16[4,4096,4096,1]{2,1,3,0}", "w": "bf16[4096,32,128,1]{0,2,1,3}"})
  conv = hlo_walk.Instruction(
      "conv", "convolution", "f32[4,4096,32,128]{1,3,2,0}",
      "%x, %w), window={size=1x32 pad=0_0x31_31 rhs_reversal=0x1}, dim_labels=0bf1_i1o0->0b1f")
  assert hlo_walk._dot_flops(conv, comp) == 2 * 4 * 4096 * 4096 * 4096
  # A weight gradient contracting a window of 4 over a real size-4 dimension: 4 taps.
  comp.types.update(a="bf16[4,4096,14336]", b="bf16[4,4096,4096]")
  grad = hlo_walk.Instruction("g", "convolution", "f32[14336,4096,1]",
                              "%a, %b), window={size=4}, dim_labels=0fb_0io->fb0")
  assert hlo_walk._dot_flops(grad, comp) == 2 * 14336 * 4096 * 4096 * 4


NESTED_SLICE = """HloModule m

%inner (param_0.1: f32[32,1024], param_1.1: s32[]) -> f32[1,1024] {
  %param_0.1 = f32[32,1024]{1,0} parameter(0)
  %param_1.1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = f32[1,1024]{1,0} dynamic-slice(%param_0.1, %param_1.1, %z), dynamic_slice_sizes={1,1024}
}

%outer (param_0: f32[32,1024], param_1: s32[], param_2: f32[1,1024]) -> f32[1,1024] {
  %param_0 = f32[32,1024]{1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %param_2 = f32[1,1024]{1,0} parameter(2)
  %f = f32[1,1024]{1,0} fusion(%param_0, %param_1), kind=kLoop, calls=%inner
  ROOT %a = f32[1,1024]{1,0} add(%f, %param_2)
}

%kv_body (p: (s32[], s32[], f32[32,1024], f32[1,1024])) -> (s32[], s32[], f32[32,1024], f32[1,1024]) {
  %p = (s32[], s32[], f32[32,1024]{1,0}, f32[1,1024]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] get-tuple-element(%p), index=1
  %w = f32[32,1024]{1,0} get-tuple-element(%p), index=2
  %acc = f32[1,1024]{1,0:S(1)} get-tuple-element(%p), index=3
  %new = f32[1,1024]{1,0:S(1)} fusion(%w, %i, %acc), kind=kLoop, calls=%outer
  ROOT %t = (s32[], s32[], f32[32,1024]{1,0}, f32[1,1024]{1,0}) tuple(%i, %n, %w, %new)
}

%kv_cond (p: (s32[], s32[], f32[32,1024], f32[1,1024])) -> pred[] {
  %p = (s32[], s32[], f32[32,1024]{1,0}, f32[1,1024]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] get-tuple-element(%p), index=1
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%q_body (p: (s32[], f32[32,1024], f32[1,1024])) -> (s32[], f32[32,1024], f32[1,1024]) {
  %p = (s32[], f32[32,1024]{1,0}, f32[1,1024]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %w = f32[32,1024]{1,0} get-tuple-element(%p), index=1
  %acc = f32[1,1024]{1,0} get-tuple-element(%p), index=2
  %z = s32[] constant(0)
  %t0 = (s32[], s32[], f32[32,1024]{1,0}, f32[1,1024]{1,0}) tuple(%z, %i, %w, %acc)
  %kv = (s32[], s32[], f32[32,1024]{1,0}, f32[1,1024]{1,0}) while(%t0), condition=%kv_cond, body=%kv_body
  ROOT %t = (s32[], f32[32,1024]{1,0}, f32[1,1024]{1,0}) tuple(%i, %w, %acc)
}

%q_cond (p: (s32[], f32[32,1024], f32[1,1024])) -> pred[] {
  %p = (s32[], f32[32,1024]{1,0}, f32[1,1024]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(8)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (w: f32[32,1024], a: f32[1,1024]) -> f32[1,1024] {
  %w = f32[32,1024]{1,0} parameter(0)
  %a = f32[1,1024]{1,0} parameter(1)
  %z = s32[] constant(0)
  %t = (s32[], f32[32,1024]{1,0}, f32[1,1024]{1,0}) tuple(%z, %w, %a)
  %q = (s32[], f32[32,1024]{1,0}, f32[1,1024]{1,0}) while(%t), condition=%q_cond, body=%q_body
  ROOT %out = f32[1,1024]{1,0} get-tuple-element(%q), index=2
}
"""


def test_runtime_bounded_loop_is_a_causal_triangle_and_vmem_is_not_hbm():
  counts = hlo_walk.walk(NESTED_SLICE, num_devices=1)
  assert sorted(counts.loops) == [("kv_body", None), ("q_body", 8)]
  comps, entry = hlo_walk.parse_computations(NESTED_SLICE)
  assert hlo_walk.multiplicities(comps, entry)["kv_body"] == (8 * 4.5, False)   # 8 x (8+1)/2
  # Each kv step: the 4 KiB row the nested fusion slices out of the 128 KiB stack, and the
  # s32 index; the accumulator in and out lives in VMEM (S(1)).
  assert counts.hbm_bytes == 36 * (4096 + 4)


def test_megascale_sends_are_cross_slice_collectives():
  # A 2-slice program is one slice's (num_partitions=8); its data-parallel gradient reduction
  # across slices is a host-transfer send to the megascale runtime.
  hlo = """HloModule m, num_partitions=8

ENTRY %main (g: f32[1024,256]) -> f32[1024,256] {
  %g = f32[1024,256]{1,0} parameter(0)
  %a = token[] after-all()
  %send = (f32[1024,256]{1,0}, u32[], token[]) send(%g, %a), channel_id=3, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_target="{1,2}x{0:7}",_xla_megascale_transfer_type="ALL_REDUCE"}
  %r = f32[1024,256]{1,0} all-reduce(%g), channel_id=4, replica_groups={}, to_apply=%add
  ROOT %o = f32[1024,256]{1,0} copy(%r)
}
"""
  counts = hlo_walk.walk(hlo, num_devices=16)
  across = [c for c in counts.collectives if c.dcn_slices]
  assert [(c.kind, c.operand_bytes, c.dcn_slices) for c in across] == [("all-reduce", 2**20, 2)]
  within = next(c for c in counts.collectives if not c.dcn_slices)
  assert within.groups.shape == (1, 8)      # the slice's 8, not all 16
  pred = step_model.predict(counts, topologies.CHIPS["v5p"], None, 1.0, 1e9)
  assert pred["dcn_bytes_per_device"] == 2**20          # 2 x (2-1)/2 x 1 MiB
  assert pred["dcn_s"] == pytest.approx(2**20 / (50e9 / 8))
  assert pred["ici_bytes_per_device"] == 2 * 7 / 8 * 2**20
