"""Which positions may attend to which: the one source of truth for every kernel and the reference.

A mask is described by a static `MaskSpec` (causal or not, sliding window, global tokens) plus
per-call arrays: query/key positions, segment ids (packed documents; 0 = padding) and an optional
per-example prefix length (prefix-LM: the prefix is seen bidirectionally). Kernels never
build masks their own way; they call `allowed` on the blocks they compute.

Windows and globals (LongT5/ETC-style, made causal-consistent): `window` keeps only keys with
|q_pos - kv_pos| < window (for a causal LM: the `window` most recent positions, itself included).
Global tokens are the positions < `num_global` (with packed rows: the first tokens of every
document, since positions restart). A global key is exempt from the window for every query and a
global query is exempt from it for every key, but causality, segments and the prefix still
apply: in a causal LM a global key is simply never pushed out of the window. Without a window,
globals change nothing (every past key is already visible).
"""
import dataclasses
from typing import Optional

import flax.struct
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  causal: bool = True
  window: Optional[int] = None   # None: unbounded; else keys with |q_pos - kv_pos| < window
  num_global: int = 0            # positions < num_global are exempt from the window

  def __post_init__(self):
    if self.window is not None and self.window < 1:
      raise ValueError(f"MaskSpec.window={self.window} must be >= 1 (1 = only itself) or None")
    if self.num_global < 0:
      raise ValueError(f"MaskSpec.num_global={self.num_global} must be >= 0")


def allowed(spec: MaskSpec, q_pos, kv_pos, q_seg=None, kv_seg=None, prefix_len=None):
  """Boolean [B, Tq, Tk]: may query i attend to key j.

  q_pos/kv_pos: int [B, Tq] / [B, Tk]. q_seg/kv_seg: int [B, T] or None (one document per row).
  prefix_len: int [B] or None; keys at positions < prefix_len are visible to every query.
  """
  qp, kp = q_pos[:, :, None], kv_pos[:, None, :]
  ok = jnp.ones(qp.shape[:2] + kp.shape[2:], dtype=bool)
  if spec.causal:
    causal = kp <= qp
    if prefix_len is not None:
      causal |= kp < prefix_len[:, None, None]
    ok &= causal
  if spec.window is not None:
    near = jnp.abs(qp - kp) < spec.window
    if spec.num_global:
      near |= (kp < spec.num_global) | (qp < spec.num_global)
    ok &= near
  if q_seg is not None:
    ok &= q_seg[:, :, None] == kv_seg[:, None, :]
  return ok


def default_positions(batch: int, length: int):
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def is_plain_causal(spec: MaskSpec, q_pos, q_seg, prefix_len) -> bool:
  """True when the mask is exactly lower-triangular by index (fused kernels' fast path)."""
  return spec == MaskSpec(causal=True) and q_pos is None and q_seg is None and prefix_len is None


@flax.struct.dataclass
class MaskInputs:
  """Per-call mask arrays; positions None means 0..T-1 in every row."""
  q_pos: Optional[jnp.ndarray] = None
  kv_pos: Optional[jnp.ndarray] = None
  q_seg: Optional[jnp.ndarray] = None
  kv_seg: Optional[jnp.ndarray] = None
  prefix_len: Optional[jnp.ndarray] = None

  def dense(self, spec: MaskSpec, batch: int, q_len: int, kv_len: int):
    q_pos = default_positions(batch, q_len) if self.q_pos is None else self.q_pos
    kv_pos = default_positions(batch, kv_len) if self.kv_pos is None else self.kv_pos
    return allowed(spec, q_pos, kv_pos, self.q_seg, self.kv_seg, self.prefix_len)
