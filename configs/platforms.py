"""Platform presets for `python -m launch.cluster`: a cluster's shape, mesh and scheduler request.

A training config says what to train; a platform preset says where: how many hosts (one
train.main process each) with how many chips, how to lay the model over them (config.mesh) and
what to ask the scheduler for (GKE node labels, TPU topology). `--platform_preset=NAME` turns
the mesh into `--config.mesh.*` overrides (explicit `--config.mesh.*` flags still win), and the
mesh is checked against the device count before anything is written or submitted.

v5p and v4 names count TensorCores, two per chip: v5p-128 is 64 chips on 16 hosts. Add a preset
for another slice or node type by adding one line to PRESETS.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Platform:
  name: str
  kind: str                   # tpu | gpu | cpu (fake CPU devices, launch/local.py)
  num_processes: int          # hosts, one train.main process on each
  devices_per_process: int    # TPU chips / GPUs per host, or fake CPU devices per process
  mesh: dict                  # config.mesh: data / fsdp / tensor (their product = device count)
  accelerator: str = ""       # GKE node label: TPU slice type or GPU model
  topology: str = ""          # TPU slice topology (GKE node selector)

  @property
  def num_devices(self) -> int:
    return self.num_processes * self.devices_per_process


PRESETS = {p.name: p for p in (
    # Pod slices: FSDP over every chip (the `base` preset's ~1.7B model fits without tensor
    # parallelism); the batch is split over the same chips.
    Platform("v5p-128", "tpu", 16, 4, {"data": 1, "fsdp": 64, "tensor": 1},
             accelerator="tpu-v5p-slice", topology="4x4x4"),
    Platform("v4-32", "tpu", 4, 4, {"data": 1, "fsdp": 16, "tensor": 1},
             accelerator="tpu-v4-podslice", topology="2x2x4"),
    # GPU nodes: FSDP inside a node (NVLink), data parallelism across nodes (the slower network
    # then carries only one gradient all-reduce per step).
    Platform("8xh100", "gpu", 1, 8, {"data": 1, "fsdp": 8, "tensor": 1},
             accelerator="nvidia-h100-80gb"),
    Platform("2x8xh100", "gpu", 2, 8, {"data": 2, "fsdp": 8, "tensor": 1},
             accelerator="nvidia-h100-80gb"),
    # This machine: cooperating processes with fake CPU devices, to try the multi-host path.
    Platform("cpu-8", "cpu", 2, 4, {"data": 2, "fsdp": 4, "tensor": 1}),
)}

