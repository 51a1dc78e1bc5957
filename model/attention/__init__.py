"""Attention: patterns (masks.py) kept apart from kernels (one module each, one signature).

Every kernel is `attend(q, k, v, *, spec, mask_inputs, implementation, block_size) -> out`. A new
variant is one new module plus one line in KERNELS.

- full: exact, dense or fused per backend (short and medium contexts; on CPU the causal path
  is flash.py).
- local: causal sliding window (+ global tokens), O(N * window).
- blocked: exact, online softmax over key blocks, O(N * block) memory; any mask (causal
  self-attention through flash.py: tiles, hand-written recompute backward).

Across devices (config.mesh.context > 1), every kind runs context_parallel.py instead: the
sequence is split over the mesh's context axis and keys/values go round a ring (or are
all-gathered when small: GQA/MQA), with the same masks; a window's ring stops at the shards it
reaches, and causal rows use a zig-zag layout so every device has the same work.
"""
from model.attention import blocked, full, local

KERNELS = {
    "full": full.attend,
    "local": local.attend,
    "blocked": blocked.attend,
}


def get_kernel(kind: str):
  if kind not in KERNELS:
    raise ValueError(f"model.attention.kind={kind!r} is not a known attention kernel; "
                     f"expected one of {sorted(KERNELS)}")
  return KERNELS[kind]
