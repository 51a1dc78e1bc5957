"""Predicted step time of a compiled train step on a TPU slice, from its HLO and the chip table.

Three times per device per step, each a lower bound for its resource:
- compute: FLOPs the compiled program executes (train/hlo_walk.py, loops multiplied out, so
  remat's recompute is in) / the chip's peak bf16 FLOP/s;
- memory: HBM bytes read and written by top-level instructions / HBM bandwidth;
- communication: for every collective, the bytes each device sends over its links (ring
  algorithms: all-gather and reduce-scatter (n-1)/n of the full array, all-reduce 2(n-1)/n,
  all-to-all (n-1)/n, collective-permute the operand) / the bandwidth of the network its group
  crosses. Within a slice a group drives the ICI ports of the torus dimensions its devices
  span (a ring per dimension, both directions); a group that spans slices is split the way a
  hierarchical collective runs it: the ring within each slice over ICI, then the 1/k share of
  each of the k in-slice devices across the m slices over DCN.

Perfect overlap gives the step max(compute, memory, communication), the optimistic end; no
overlap their sum, the pessimistic end. The MFU bound is model FLOPs (6N + attention, no
recompute) over (predicted step x peak): what the plan can reach at best.
"""
import dataclasses

import numpy as np

from train import hlo_walk

_RING = {"all-gather": 1.0, "reduce-scatter": 1.0, "all-to-all": 1.0, "all-reduce": 2.0}


def link_bytes(kind: str, full_bytes: float, n: int) -> float:
  """Bytes one device sends in a ring collective over `n` devices on an array of `full_bytes`
  (the gathered / reduced size; a permute's operand)."""
  if kind == "collective-permute":
    return float(full_bytes)
  if n <= 1:
    return 0.0
  return _RING[kind] * (n - 1) / n * full_bytes


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each logical device id of the compiled program sits: its slice and torus coords."""
  slice_index: tuple   # per logical id
  coords: tuple        # per logical id, a tuple per device (empty where unknown)

  @classmethod
  def of_mesh(cls, mesh) -> "Layout":
    """The program's logical ids are the mesh's devices in row-major order; a multi-slice
    program is one slice's (its cross-slice transfers are separate, see hlo_walk)."""
    flat = list(np.asarray(mesh.devices).flat)
    first = getattr(flat[0], "slice_index", None)
    if len({getattr(d, "slice_index", None) for d in flat}) > 1:
      flat = [d for d in flat if d.slice_index == first]
    return cls(tuple(getattr(d, "slice_index", 0) or 0 for d in flat),
               tuple(tuple(getattr(d, "coords", ()) or ()) for d in flat))


def split(c: hlo_walk.Collective, layout: Layout | None, dims: int) -> tuple:
  """(ICI bytes, DCN bytes, fraction of the chip's ICI ports the group drives) sent per device
  per run of collective `c`."""
  if c.dcn_slices:   # a megascale transfer: this device's operand, ring over the slices
    full = c.operand_bytes * (c.dcn_slices if c.kind == "all-gather" else 1)
    return 0.0, link_bytes(c.kind, full, c.dcn_slices), 1.0
  group = c.groups[0] if c.groups is not None and len(c.groups) else np.arange(1)
  if c.kind == "collective-permute":
    pairs = c.groups if c.groups is not None else np.zeros((0, 2), int)
    crosses = layout is not None and any(layout.slice_index[a] != layout.slice_index[b]
                                         for a, b in pairs)
    return ((0.0, c.operand_bytes, 1.0) if crosses else
            (float(c.operand_bytes), 0.0, _port_share(group, layout, dims)))
  n = len(group)
  full = c.operand_bytes * (n if c.kind == "all-gather" else 1)
  slices = sorted({layout.slice_index[i] for i in group}) if layout else [0]
  m = len(slices)
  k = n // m
  in_slice = [i for i in group if not layout or layout.slice_index[i] == slices[0]]
  ici = link_bytes(c.kind, full, k)
  dcn = link_bytes(c.kind, full / k, m) if m > 1 else 0.0
  return ici, dcn, _port_share(in_slice, layout, dims)


def _port_share(group, layout: Layout | None, dims: int) -> float:
  """Share of a chip's ICI ports a group's rings use: the torus dimensions its devices span
  over all dimensions (1 where coordinates are unknown)."""
  if layout is None or not dims or not all(layout.coords[i] for i in group):
    return 1.0
  coords = np.array([layout.coords[i][:dims] for i in group])
  spanned = int((coords.max(0) != coords.min(0)).sum())
  return max(spanned, 1) / dims


def predict(counts: hlo_walk.StepCounts, chip, layout: Layout | None, devices_per_chip: float,
            model_flops_per_device: float) -> dict:
  """The three times, the two step predictions and the MFU bound, per device per step."""
  peak = chip.peak_bf16_flops / devices_per_chip
  hbm_bw = chip.hbm_bw / devices_per_chip
  ici_s = dcn_s = ici_bytes = dcn_bytes = 0.0
  for c in counts.collectives:
    ici, dcn, share = split(c, layout, chip.dims)
    ici_bytes += c.times * ici
    dcn_bytes += c.times * dcn
    ici_s += c.times * ici / (chip.ici_bw * share / devices_per_chip)
    dcn_s += c.times * dcn / (chip.dcn_bw / devices_per_chip)
  flops = counts.flops or model_flops_per_device
  times = {"compute": flops / peak, "memory": counts.hbm_bytes / hbm_bw,
           "ici": ici_s, "dcn": dcn_s}
  comm = ici_s + dcn_s
  best = max(times["compute"], times["memory"], comm, 1e-12)   # > 0 for an empty program
  worst = times["compute"] + times["memory"] + comm
  bound = max(("compute", "memory", "communication"),
              key=lambda k: comm if k == "communication" else times[k])
  return {"hlo_flops_per_device": counts.flops, "model_flops_per_device": model_flops_per_device,
          "hbm_bytes_per_device": counts.hbm_bytes, "ici_bytes_per_device": ici_bytes,
          "dcn_bytes_per_device": dcn_bytes, "compute_s": times["compute"],
          "memory_s": times["memory"], "ici_s": ici_s, "dcn_s": dcn_s,
          "predicted_step_s": best, "predicted_step_no_overlap_s": worst, "bound": bound,
          "mfu_bound": model_flops_per_device / (best * peak),
          "mfu_no_overlap": model_flops_per_device / (worst * peak)}


def summary(pred: dict, tokens_per_step: int, num_chips: int) -> list[str]:
  """The lines aot.report prints."""
  per_chip = tokens_per_step / num_chips
  return [
      f"  predicted step: {1e3 * pred['predicted_step_s']:.1f} ms with perfect overlap "
      f"({pred['bound']}-bound), {1e3 * pred['predicted_step_no_overlap_s']:.1f} ms with none",
      f"    compute {1e3 * pred['compute_s']:.1f} ms ({pred['hlo_flops_per_device']:.3e} "
      f"executed FLOPs per device, model {pred['model_flops_per_device']:.3e}), HBM "
      f"{1e3 * pred['memory_s']:.1f} ms ({pred['hbm_bytes_per_device'] / 2**30:.1f} GiB), ICI "
      f"{1e3 * pred['ici_s']:.1f} ms ({pred['ici_bytes_per_device'] / 2**30:.2f} GiB sent), "
      f"DCN {1e3 * pred['dcn_s']:.1f} ms ({pred['dcn_bytes_per_device'] / 2**30:.2f} GiB)",
      f"    tokens/s per chip: {per_chip / pred['predicted_step_s']:,.0f} at best, "
      f"{per_chip / pred['predicted_step_no_overlap_s']:,.0f} without overlap; MFU bound "
      f"{100 * pred['mfu_bound']:.1f}% ({100 * pred['mfu_no_overlap']:.1f}% without overlap)"]
