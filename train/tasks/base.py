"""What every task shares: one forward call built from the task's `inputs`, scored by `score`.

Splitting "what goes into the model" from "how its output is scored" lets distillation run any
task's student and teacher on the same inputs and reuse the task's own loss for the labels.
"""
import jax.numpy as jnp


class Task:

  def __init__(self, model, *, z_loss: float = 0.0, loss_chunk: int = 0):
    self.model = model
    self.z_loss = z_loss      # weight of log(Z)^2 in LM losses (config.optim.z_loss)
    self.loss_chunk = loss_chunk   # rows per fused LM head + loss chunk (pretrain); 0: plain

  def inputs(self, batch) -> tuple:
    """(tokens, keyword arguments of the model call) for `batch`."""
    raise NotImplementedError

  def weights(self, batch):
    """Float weights over the scored outputs: [B] (per example) or [B, T] (per token)."""
    raise NotImplementedError

  def score(self, logits, batch, train: bool):
    """(loss_sum, metric_sums incl. "weight") of the model's output on `batch`."""
    raise NotImplementedError

  def forward(self, params, batch, rng=None, train: bool = False, **extra):
    tokens, kwargs = self.inputs(batch)
    return self.model.apply({"params": params}, tokens, deterministic=not train,
                            rngs={"dropout": rng} if train else None, **kwargs, **extra)

  def loss(self, params, batch, rng, train: bool):
    return self.score(self.forward(params, batch, rng, train), batch, train)

  @staticmethod
  def weighted_sums(per_item, correct, weights):
    """Sums of a per-example/token loss and correctness under `weights`."""
    total = jnp.sum(per_item * weights)
    return total, {"loss": total, "accuracy": jnp.sum(correct * weights),
                   "weight": jnp.sum(weights)}
