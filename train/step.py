"""The jit'd train and eval steps shared by every task.

The step sums the task's loss over micro-batches (gradient accumulation via `lax.scan`), divides
by the total weight once (so accumulation is exact, not a mean of means), applies the optimizer
and returns scalar metrics. Compiled ahead of time with explicit in/out shardings; the state's
buffers are donated so params and optimizer state are updated in place.
"""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from model import sharding as sharding_lib
from train import state as state_lib


def _tree_add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _split_micro(batch, accum: int, mesh):
  """[A*M, ...] -> [A, M, ...], each micro-batch spread over all data shards.

  Row r = m * A + a goes to micro-batch a, so every device's contiguous rows feed every
  micro-batch and no data moves between devices.
  """
  micro_sharding = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))

  def split(x):
    x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, micro_sharding)
  return jax.tree.map(split, batch)


def _partition(params, trainable):
  """(trained, frozen): flat {path: leaf} dicts of `params` split by `trainable(path)`."""
  flat = flax.traverse_util.flatten_dict(params)
  trained = {k: v for k, v in flat.items() if trainable(k)}
  return trained, {k: v for k, v in flat.items() if k not in trained}


def _combine(trained: dict, frozen: dict):
  return flax.traverse_util.unflatten_dict({**frozen, **trained})


def make_train_step(task, tx, schedule, grad_accum_steps: int, mesh, skip_nonfinite=False,
                    trainable=None):
  """skip_nonfinite: a step whose loss or gradient is not finite leaves params and optimizer
  state unchanged (metric `skipped` = 1) instead of poisoning them; the loop decides whether
  that is an error (config.train.nonfinite).

  trainable: None, or a predicate on flattened parameter paths (LoRA): only those parameters
  are differentiated (the rest enter the loss as constants: no backward pass through their
  weights, no gradient buffers, nothing accumulated), `tx` sees zeros for the rest (its
  set_to_zero branch ignores them) and they leave the step exactly as they came in."""
  grad_fn = jax.value_and_grad(lambda p, b, r: task.loss(p, b, r, True), has_aux=True)
  split_grad_fn = jax.value_and_grad(
      lambda t, f, b, r: task.loss(_combine(t, f), b, r, True), has_aux=True)

  def loss_and_grad(params, batch, rng):
    if trainable is None:
      (_, sums), grads = grad_fn(params, batch, rng)
    else:
      trained, frozen = _partition(params, trainable)
      (_, sums), grads = split_grad_fn(trained, frozen, batch, rng)
    return grads, sums

  def train_step(state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum_steps == 1:
      grads, sums = loss_and_grad(state.params, batch, rng)
    else:
      micro = _split_micro(batch, grad_accum_steps, mesh)
      shapes = jax.eval_shape(loss_and_grad, state.params, jax.tree.map(lambda x: x[0], micro),
                              rng)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

      def body(acc, xs):
        mb, i = xs
        return _tree_add(acc, loss_and_grad(state.params, mb, jax.random.fold_in(rng, i))), None
      (grads, sums), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(grad_accum_steps)))
    weight = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    grad_norm = optax.tree.norm(grads)
    if trainable is None:
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    else:
      _, frozen = _partition(state.params, trainable)
      full = _combine(grads, jax.tree.map(jnp.zeros_like, frozen))
      updates, opt_state = tx.update(full, state.opt_state, state.params)
      trained, _ = _partition(optax.apply_updates(state.params, updates), trainable)
      params = _combine(trained, frozen)
    finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    metrics = {k: v / weight for k, v in sums.items() if k != "weight"}
    metrics.update(grad_norm=grad_norm, lr=schedule(state.step), tokens=sums["weight"],
                   skipped=1.0 - finite.astype(jnp.float32))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(task):
  def eval_step(params, batch):
    _, sums = task.loss(params, batch, jax.random.PRNGKey(0), False)
    return sums
  return eval_step


# XLA:CPU compiler options that send the step's dots to a kernel library (config.train.
# xla_cpu_dot_library). "xla" = XLA's own emitter (Eigen). On a 2-core AVX2 AMD EPYC, "ynn"
# (YNNPACK) runs the bench_step.py:cpu train step 1.2x faster (14.3 vs 17.2 s, same losses to
# 1e-5) and an MLP fwd+bwd 1.3x; xnn and onednn are no faster. For bf16 operands with f32
# accumulation on a CPU with AVX-512 BF16, oneDNN runs a [4096 x 512] x [512 x 2048] dot at
# 269 GFLOP/s against YNNPACK's 167 (= its f32 rate): "auto" picks onednn there. Figures:
# docs/results/step_time.md.
CPU_DOT_LIBRARIES = {
    "xla": {},
    "ynn": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "xnn": {"xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "onednn": {"xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
}


def cpu_has_native_bf16() -> bool:
  """Whether this host's CPU multiplies bf16 natively (AVX-512 BF16 or AMX), per /proc/cpuinfo."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line for line in f if line.startswith("flags")), "").split()
  except OSError:
    return False
  return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_cpu_dot_library(cpu_dot_library: str, compute_dtype: str = "float32") -> str:
  """`auto`: onednn for bf16 compute on a CPU with native bf16, else ynn."""
  if cpu_dot_library == "auto":
    return "onednn" if compute_dtype == "bfloat16" and cpu_has_native_bf16() else "ynn"
  if cpu_dot_library not in CPU_DOT_LIBRARIES:
    raise ValueError(f"config.train.xla_cpu_dot_library={cpu_dot_library!r}; expected auto or "
                     f"one of {sorted(CPU_DOT_LIBRARIES)}")
  return cpu_dot_library


def compiler_options(mesh, cpu_dot_library: str = "xla", compute_dtype: str = "float32") -> dict:
  """The XLA options for a step on `mesh`: the CPU ones only when its devices are CPUs (an
  AOT TPU topology or a GPU gets none)."""
  library = resolve_cpu_dot_library(cpu_dot_library, compute_dtype)
  if mesh.devices.flat[0].platform != "cpu":
    return {}
  return dict(CPU_DOT_LIBRARIES[library])


def compile_step(fn, mesh, in_shardings, out_shardings, example_args, donate_argnums=(),
                 options=None):
  """jit + lower + compile under the mesh and logical rules; fails here, not mid-run.
  options: XLA compiler options (see compiler_options)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.LOGICAL_RULES):
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=donate_argnums)
    return jitted.lower(*example_args).compile(compiler_options=options or None)


def compile_train_step(task, tx, schedule, grad_accum_steps: int, mesh, abstract_state,
                       state_shardings, batch, skip_nonfinite: bool = False, trainable=None,
                       cpu_dot_library: str = "xla", compute_dtype: str = "float32"):
  """The sharded, donating train step compiled for `batch`'s keys and shapes (arrays or
  ShapeDtypeStructs; without segment_ids/positions the model takes its plain-causal path)."""
  batch_sharding = sharding_lib.batch_sharding(mesh)
  example = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
             for k, v in batch.items()}
  return compile_step(
      make_train_step(task, tx, schedule, grad_accum_steps, mesh, skip_nonfinite, trainable),
      mesh,
      (state_shardings, batch_sharding), (state_shardings, sharding_lib.replicated(mesh)),
      (state_lib.abstract_with_shardings(abstract_state, state_shardings), example),
      donate_argnums=(0,), options=compiler_options(mesh, cpu_dot_library, compute_dtype))
