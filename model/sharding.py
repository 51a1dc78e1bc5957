"""Device mesh (data / fsdp / context / tensor) and the logical-axis rules that map names onto it.

Parameters name their axes ("embed", "mlp", "heads", ...); activations use "activation_*" names.
The rules below decide placement in one place: FSDP shards parameters (and with them the
optimizer state) along "embed"; tensor parallelism splits heads, MLP and vocabulary; the batch
is split over data x fsdp; context parallelism splits the sequence of every activation
(model/attention/context_parallel.py does the attention across it). Input batches stay
replicated over context: token ids are 4 bytes a token against d_model activations, and the
first activation constraint slices each device's part locally, with no communication.
"""
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# tensor innermost (nearest devices: it communicates every layer), context next (its ring
# passes keys/values between neighbours).
MESH_AXES = ("data", "fsdp", "context", "tensor")
# Axes a config may leave out (configs and saved runs from before the axis existed): size 1.
_OPTIONAL_AXES = {"context": 1}

LOGICAL_RULES = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("length", None),
    ("classes", None),
    ("types", None),      # token-type embedding rows (BERT family): a handful
    ("pooled", None),     # the pooler's / classifier hidden layer's output
    ("layers", None),     # the stacked-blocks axis of model.scan_layers
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "context"),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_vocab", "tensor"),
)


def dcn_shape(mesh_cfg) -> tuple[int, ...]:
  """Per axis, how many slices it spans over the data center network: config.mesh.dcn_<axis>
  (dcn_data, dcn_fsdp, ...; absent = 1). The axis's full size is its in-slice size times this."""
  sizes = tuple(int(mesh_cfg.get(f"dcn_{a}", 1)) for a in MESH_AXES)
  bad = [f"config.mesh.dcn_{a}={n}" for a, n in zip(MESH_AXES, sizes) if n < 1]
  if bad:
    raise ValueError(f"{', '.join(bad)}: a DCN (across-slice) axis size must be >= 1")
  return sizes


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Axis sizes from config, DCN (across-slice) factors included; one in-slice axis may be -1
  (all remaining devices of a slice)."""
  dcn = dcn_shape(mesh_cfg)
  if num_devices % math.prod(dcn):
    raise ValueError(f"config.mesh dcn_* multiply to {math.prod(dcn)} slices, which does not "
                     f"divide the {num_devices} devices")
  return tuple(d * s for d, s in zip(dcn, _ici_shape(mesh_cfg, num_devices // math.prod(dcn))))


def _ici_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """In-slice axis sizes over one slice's `num_devices`."""
  sizes = [int(mesh_cfg[a] if a in mesh_cfg or a not in _OPTIONAL_AXES else _OPTIONAL_AXES[a])
           for a in MESH_AXES]
  wild = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(wild) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {wild}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: axis sizes must be positive or -1, got "
                     f"{dict(zip(MESH_AXES, sizes))}")
  fixed = math.prod(s for s in sizes if s != -1)
  if wild:
    if num_devices % fixed:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to "
                       f"{fixed}, which does not divide the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} multiplies to "
                     f"{math.prod(sizes)} but there are {num_devices} devices; make the product "
                     f"equal the device count or set one axis to -1")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  dcn = dcn_shape(mesh_cfg)
  slices = {getattr(d, "slice_index", None) for d in devices} - {None}
  if len(slices) > 1 and len(slices) != math.prod(dcn):
    raise ValueError(f"the devices come from {len(slices)} slices but config.mesh dcn_* "
                     f"({dict(zip(MESH_AXES, dcn))}) multiply to {math.prod(dcn)}: set "
                     f"config.mesh.dcn_data / dcn_fsdp to multiply to {len(slices)}")
  # Built by hand (not jax.make_mesh) so the axes are Auto in every JAX version;
  # create_device_mesh orders devices by physical topology on TPU/GPU.
  from jax.experimental import mesh_utils
  if math.prod(dcn) > 1:
    return Mesh(_hybrid_grid(devices, shape, dcn, len(slices)), MESH_AXES)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def _hybrid_grid(devices, shape: tuple, dcn: tuple, num_slices: int) -> np.ndarray:
  """Devices for a mesh whose axes span `dcn` slices each: every axis is (slice-major) DCN x
  ICI, so a slice's devices form one contiguous block of each axis. Devices that carry
  slice_index (multi-slice TPU: `num_slices` distinct ones, checked by make_mesh) are placed by
  create_hybrid_device_mesh; others (CPU) are taken in order, each consecutive run of
  len/slices devices standing for a slice."""
  from jax.experimental import mesh_utils
  ici = tuple(s // d for s, d in zip(shape, dcn))
  if num_slices > 1 and all(getattr(d, "slice_index", None) is not None for d in devices):
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
  n = len(dcn)
  grid = np.asarray(devices).reshape(dcn + ici)
  return grid.transpose([k for i in range(n) for k in (i, n + i)]).reshape(shape)


def logical_sharding(logical_specs, mesh: Mesh):
  """Tree of logical PartitionSpecs -> tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over data x fsdp, sequence replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_divisible(abstract_tree, shardings, what: str = "params"):
  """Fails early, naming the parameter, when a dimension does not split evenly on the mesh."""
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(abstract_tree),
                                    jax.tree.leaves(shardings)):
    spec = sharding.spec
    for dim, axes in zip(leaf.shape, spec):
      if axes is None:
        continue
      axes = axes if isinstance(axes, tuple) else (axes,)
      n = math.prod(sharding.mesh.shape[a] for a in axes)
      if dim % n:
        raise ValueError(f"{what} {jax.tree_util.keystr(path)} has shape {leaf.shape}: dim {dim} "
                         f"does not split over mesh axes {axes} of size {n}; change config.mesh "
                         f"or the model size")
