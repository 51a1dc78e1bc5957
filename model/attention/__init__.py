"""Attention: patterns (masks.py) kept apart from kernels (one module each, one signature).

Every kernel is `attend(q, k, v, *, spec, mask_inputs, implementation) -> out`. A new variant is
one new module plus one line in KERNELS.
"""
from model.attention import full

KERNELS = {
    "full": full.attend,
}


def get_kernel(kind: str):
  if kind not in KERNELS:
    raise ValueError(f"model.attention.kind={kind!r} is not a known attention kernel; "
                     f"expected one of {sorted(KERNELS)}")
  return KERNELS[kind]
