"""TPU slices by name, for compiling the real train step with the real TPU compiler on a host
that has no TPU (`python -m train.main --config=... --aot_only --aot_topology=v5p-128`).

A slice name is `<generation>-<N>` as Cloud TPU spells it: v5e / v6e count chips (v5e-256 is
256 chips, a 16x16 torus), v4 / v5p count TensorCores, two per chip (v5p-128 is 64 chips,
4x4x4). A raw topology description, `v5e:16x16` or `v5p:4x4x4`, is accepted too, and a
multi-slice job is `<slices>x<slice>`: `2xv5p-128` is two v5p-128 slices joined over the data
center network (config.mesh.dcn_data / dcn_fsdp say which axes span them). The compiler is
libtpu (`pip install -r requirements-tpu.txt`, ~690 MB); CPU training never imports it.

`CHIPS` is the per-chip table the fits / does-not-fit line, MFU and the step-time prediction
(train/step_model.py) read: HBM capacity and bandwidth, dense bf16 peak FLOP/s, ICI and DCN
bandwidth, as Google publishes them; each figure's page is named next to it.
"""
import dataclasses
import math
import os
import re

from model import errors

GiB = 2 ** 30
REQUIREMENTS = "requirements-tpu.txt"


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str        # v4 | v5e | v5p | v6e
  hbm_bytes: int         # per chip
  peak_bf16_flops: float # per chip, dense
  dims: int              # torus dimensions: 3 (v4, v5p) or 2 (v5e, v6e)
  cores_in_name: bool    # slice names count TensorCores (2 per chip), not chips
  accelerator_prefix: str  # TPU_ACCELERATOR_TYPE spelling, e.g. v5litepod
  hbm_bw: float = 0.0    # bytes/s per chip
  # ICI: bytes/s per chip, both directions of all its ports together (Google's "bidirectional
  # ICI bandwidth per chip"); a ring over one torus dimension drives 2 of the 2 x dims ports.
  ici_bw: float = 0.0
  dcn_bw: float = 0.0    # bytes/s per chip to other slices (data center network)


CHIPS = {
    # cloud.google.com/tpu/docs/v4: 32 GiB, 1200 GBps HBM2, 275 TFLOP/s. ICI and DCN are not on
    # the page; ASSUMED: 6 ports x 45 GB/s per direction (jax-ml.github.io/scaling-book/tpus
    # lists 4.5e10 B/s one-way per v4 link) = 540 GB/s, and v5e's 25 Gbps DCN per chip.
    "v4": Chip("v4", 32 * GiB, 275e12, 3, True, "v4", hbm_bw=1200e9, ici_bw=540e9,
               dcn_bw=25e9 / 8),
    # cloud.google.com/tpu/docs/v5e (and /v6e's v5e column): 16 GB, 819 GBps HBM, 197 TFLOP/s,
    # ICI 1600 Gbps per direction (4 ports) = 400 GB/s both ways; DCN 6.4 Tbps per 256-chip
    # pod = 25 Gbps per chip.
    "v5e": Chip("v5e", 16 * GiB, 197e12, 2, False, "v5litepod", hbm_bw=819e9, ici_bw=400e9,
                dcn_bw=6.4e12 / 8 / 256),
    # cloud.google.com/tpu/docs/v5p: 95 GiB, 2765 GBps HBM2e, 459 TFLOP/s, bidirectional ICI
    # 1200 GBps per chip (6 ports; 4800 Gbps one way), DCN 50 Gbps per chip.
    "v5p": Chip("v5p", 95 * GiB, 459e12, 3, True, "v5p", hbm_bw=2765e9, ici_bw=1200e9,
                dcn_bw=50e9 / 8),
    # cloud.google.com/tpu/docs/v6e: 32 GB, 1640 GBps HBM, 918 TFLOP/s, bidirectional ICI
    # 800 GBps per chip (4 ports; 3200 Gbps one way), DCN 25.6 Tbps per 256-chip pod = 100 Gbps
    # per chip (4 x 200 Gbps NICs per 8-chip host).
    "v6e": Chip("v6e", 32 * GiB, 918e12, 2, False, "v6e", hbm_bw=1640e9, ici_bw=800e9,
                dcn_bw=25.6e12 / 8 / 256),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v6lite": "v6e"}

# Chips -> torus shape (what Cloud TPU provisions for that slice size).
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}
_SHAPES_3D = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4),
              64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8),
              1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str              # as given, e.g. v5p-128 or 2xv5p-128
  chip: Chip
  shape: tuple           # one slice's torus, e.g. (4, 4, 4)
  num_slices: int = 1    # slices joined over DCN

  @property
  def slice_chips(self) -> int:
    return math.prod(self.shape)

  @property
  def num_chips(self) -> int:
    """Chips over all slices."""
    return self.slice_chips * self.num_slices

  @property
  def topology(self) -> str:
    """What jax.experimental.topologies.get_topology_desc takes, e.g. 'v5p:4x4x4'."""
    return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

  @property
  def accelerator_type(self) -> str:
    n = self.slice_chips * (2 if self.chip.cores_in_name else 1)
    return f"{self.chip.accelerator_prefix}-{n}"


class TopologyError(errors.UserError):
  """A slice name that is not understood, or no libtpu to compile with (one line)."""


def parse(name: str) -> Slice:
  """'v5p-128' | 'v5e-256' | 'v4-8' | 'v5e:16x16' | '2xv5p-128' -> Slice."""
  text = name.strip().lower()
  multi = re.fullmatch(r"(\d+)x(v.+)", text)
  if multi:
    count = int(multi.group(1))
    if count < 1:
      raise TopologyError(f"--aot_topology={name!r}: the slice count must be >= 1")
    return dataclasses.replace(parse(multi.group(2)), name=name, num_slices=count)
  known = ", ".join(sorted(CHIPS))
  match = re.fullmatch(r"([a-z0-9]+)[:-]([0-9x]+)", text)
  if not match:
    raise TopologyError(f"--aot_topology={name!r}: expected <generation>-<size> (v5p-128, "
                        f"v5e-256, v6e-256, v4-8) or <generation>:<torus> (v5e:16x16)")
  gen, size = _ALIASES.get(match.group(1), match.group(1)), match.group(2)
  if gen not in CHIPS:
    raise TopologyError(f"--aot_topology={name!r}: unknown TPU generation {gen!r} "
                        f"(known: {known})")
  chip = CHIPS[gen]
  if "x" in size or ":" in text:
    shape = tuple(int(s) for s in size.split("x"))
    if len(shape) != chip.dims or min(shape) < 1:
      raise TopologyError(f"--aot_topology={name!r}: a {gen} torus has {chip.dims} dimensions")
    return Slice(name, chip, shape)
  n = int(size)
  if chip.cores_in_name:
    if n % 2:
      raise TopologyError(f"--aot_topology={name!r}: {gen} names count TensorCores (2 per "
                          "chip), so the size is even")
    n //= 2
  shapes = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
  if n not in shapes:
    unit = "TensorCores" if chip.cores_in_name else "chips"
    sizes = ", ".join(f"{gen}-{k * (2 if chip.cores_in_name else 1)}" for k in sorted(shapes))
    raise TopologyError(f"--aot_topology={name!r}: no {gen} slice of {size} {unit}; known "
                        f"sizes: {sizes} (or give the torus, e.g. {gen}:"
                        f"{'x'.join(['2'] * chip.dims)})")
  return Slice(name, chip, shapes[n])


def quiet_libtpu_env(tpu_slice: Slice) -> None:
  """Env vars that stop libtpu probing for a TPU host (metadata server, worker list) on a
  machine that has none; set before jax first loads the plugin. Existing values win."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", tpu_slice.accelerator_type)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_WORKER_ID", "0")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")   # run nothing on a TPU; compile for one
  # Compile-only processes share no chip: let two of them (two checkouts) load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def have_libtpu() -> bool:
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def devices(tpu_slice: Slice) -> list:
  """The slice's abstract TPU devices (compile-only; nothing runs on them)."""
  if not have_libtpu():
    raise TopologyError(f"--aot_topology={tpu_slice.name} needs the TPU compiler (libtpu), "
                        f"which is not installed: pip install -r {REQUIREMENTS}")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    extra = {"num_slices": tpu_slice.num_slices} if tpu_slice.num_slices > 1 else {}
    desc = topologies.get_topology_desc(platform="tpu", topology_name=tpu_slice.topology,
                                        **extra)
  except Exception as e:  # pylint: disable=broad-except
    raise TopologyError(f"--aot_topology={tpu_slice.name}: libtpu rejected topology "
                        f"{tpu_slice.topology}: {' '.join(str(e).split())[:300]}") from None
  return list(desc.devices)


def hbm_per_device(tpu_slice: Slice, num_devices: int) -> int:
  """A chip's HBM over the devices JAX shows per chip (v4's description lists both cores)."""
  per_chip = max(1, num_devices // tpu_slice.num_chips)
  return tpu_slice.chip.hbm_bytes // per_chip


def fit_line(total_bytes: int, capacity_bytes: int) -> str:
  """'fits: ... GiB free' or 'does not fit by X GiB' for one device."""
  used, cap = total_bytes / GiB, capacity_bytes / GiB
  if total_bytes <= capacity_bytes:
    return (f"fits: {used:.2f} of {cap:.2f} GiB per chip ({100 * used / cap:.0f}%), "
            f"{cap - used:.2f} GiB free")
  return (f"does not fit by {used - cap:.2f} GiB: {used:.2f} GiB needed per chip, "
          f"{cap:.2f} GiB there ({100 * used / cap:.0f}%)")


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def count_collectives(hlo_text: str) -> dict:
  """Collective instructions in compiled HLO text, by kind (an async pair counts once: its
  -start). Static counts: a collective inside a loop (scanned layers, grad accumulation) is
  one instruction however often it runs; train/hlo_walk.py counts the runs per step."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  for match in _COLLECTIVE_RE.finditer(hlo_text):
    counts[match.group(1)] += 1
  return counts
