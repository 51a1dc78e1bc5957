"""TrainState and its creation directly in sharded form (no full copy on any host).

The logical axis names on the parameters decide the shardings of params and, through
`optax.tree_map_params`, of the optimizer state that mirrors them.
"""
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from model import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray          # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  rng: jnp.ndarray           # uint32[2] base key; each step folds in its step number


def _init_fn(model, tx, dummy_batch):
  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    variables = model.init(init_rng, dummy_batch["tokens"])
    params = variables["params"]
    unboxed = nn.meta.unbox(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(unboxed), rng=state_rng)
  return init


def state_shardings(model, tx, dummy_batch, mesh):
  """(abstract unboxed TrainState, matching NamedShardings) without allocating anything."""
  boxed = jax.eval_shape(_init_fn(model, tx, dummy_batch), jax.random.PRNGKey(0))
  param_specs = nn.get_partition_spec(boxed.params)
  # A parameter an optimizer does not track (optax.masked / multi_transform: LoRA's frozen
  # base) has an empty MaskedNode in its state: kept as it is.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_specs = optax.tree_map_params(
      tx, lambda value, spec: value if masked(value) else spec, boxed.opt_state, param_specs,
      transform_non_params=lambda _: PartitionSpec(),
      is_leaf=lambda x: isinstance(x, PartitionSpec) or masked(x))
  logical = TrainState(step=PartitionSpec(), params=param_specs, opt_state=opt_specs,
                       rng=PartitionSpec())
  shardings = sharding_lib.logical_sharding(logical, mesh)
  abstract = nn.meta.unbox(boxed)
  sharding_lib.check_divisible(abstract.params, shardings.params)
  return abstract, shardings


def create_state(model, tx, dummy_batch, mesh, seed: int):
  """Initialises params and optimizer state directly into their shardings."""
  abstract, shardings = state_shardings(model, tx, dummy_batch, mesh)
  init = _init_fn(model, tx, dummy_batch)
  # No logical-rules context here: out_shardings place the state, and flax's DenseGeneral
  # would otherwise constrain its flattened init-time kernel with the unflattened axis names.
  with jax.set_mesh(mesh):
    state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(
        jax.random.PRNGKey(seed))
  return state, abstract, shardings


def abstract_with_shardings(abstract, shardings):
  """ShapeDtypeStructs carrying target shardings: what Orbax restores into (any mesh)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def param_count(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
