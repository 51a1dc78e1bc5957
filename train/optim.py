"""AdamW with linear warmup then cosine / linear decay (or a constant rate), and clipping."""
import flax
import jax
import optax


SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(optim_cfg, num_steps: int):
  """Warmup from 0 to optim.lr, then optim.schedule down to lr * min_lr_ratio at num_steps."""
  if optim_cfg.schedule not in SCHEDULES:
    raise ValueError(f"config.optim.schedule={optim_cfg.schedule!r}; expected one of {SCHEDULES}")
  warmup = min(optim_cfg.warmup_steps, max(num_steps - 1, 0))
  peak, end = optim_cfg.lr, optim_cfg.lr * optim_cfg.min_lr_ratio
  if optim_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1), end_value=end)
  after = (optax.constant_schedule(peak) if optim_cfg.schedule == "constant" else
           optax.linear_schedule(peak, end, max(num_steps - warmup, 1)))
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _decay_mask(frozen: tuple):
  def mask(params):
    # Matrices decay; norm scales (1-D) do not; nor does a frozen subtree.
    decay = jax.tree.map(lambda p: p.ndim > 1, params)
    if isinstance(decay, dict):
      decay = {k: jax.tree.map(lambda _: False, v) if k in frozen else v
               for k, v in decay.items()}
    return decay
  return mask


def make_optimizer(optim_cfg, num_steps: int, frozen: tuple = (), trainable=None):
  """Returns (optax transform, lr schedule).

  `frozen`: top-level parameter groups (e.g. a distillation teacher) that get no weight decay;
  their gradients are zero (stop_gradient), so Adam leaves them bit-identical.
  `trainable`: None (every parameter trains) or a predicate on a parameter's flattened path
  (LoRA: the adapters and the task head). The rest get `set_to_zero` through
  `optax.multi_transform`, so no Adam moments are allocated for them (their opt-state nodes are
  empty MaskedNodes) and clipping sees only the trained gradients.
  """
  schedule = make_schedule(optim_cfg, num_steps)
  parts = []
  if optim_cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
  parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay, mask=_decay_mask(frozen)))
  tx = optax.chain(*parts)
  if trainable is not None:
    def labels(params):
      if not isinstance(params, (dict, flax.core.FrozenDict)):
        return "trained"    # optax.tree_map_params' stand-in for the whole tree
      return flax.traverse_util.path_aware_map(
          lambda path, _: "trained" if trainable(path) else "frozen", params)
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
