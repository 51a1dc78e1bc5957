"""Causal language modelling on packed rows: predict token t+1 from tokens <= t.

A target is scored only when it belongs to the same (non-padding) document as its input, so
packing never teaches the model to predict across a document boundary.
"""
import jax
import jax.numpy as jnp
import numpy as np

from train.tasks.base import Task


def lm_targets(tokens, segment_ids=None):
  """(targets, weights) [B, T]: next token, and 1.0 where it should be scored."""
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  if segment_ids is None:
    weights = jnp.ones(tokens.shape, jnp.float32).at[:, -1].set(0.0)
  else:
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
    weights = jnp.pad(same, ((0, 0), (0, 1))).astype(jnp.float32)
  return targets, weights


def cross_entropy(logits, targets, weights, z_loss: float = 0.0):
  """Summed weighted cross-entropy (+ z_loss * log(Z)^2), in float32; returns (loss, metrics)."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = jnp.sum((lse - target_logit) * weights)
  z = jnp.sum(jnp.square(lse) * weights)
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)
  # Sums; the step divides by the total weight, so "loss" is the mean NLL per scored token.
  return nll + z_loss * z, {"loss": nll, "z_loss": z, "accuracy": correct,
                            "weight": jnp.sum(weights)}


class PretrainTask(Task):
  """Batches: tokens, segment_ids, positions (all int32 [B, T])."""

  @staticmethod
  def dummy_batch(batch_size: int, seq_len: int):
    shape = (batch_size, seq_len)
    return {"tokens": np.zeros(shape, np.int32), "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy()}

  def inputs(self, batch):
    return batch["tokens"], {"positions": batch.get("positions"),
                             "segment_ids": batch.get("segment_ids")}

  def weights(self, batch):
    return lm_targets(batch["tokens"], batch.get("segment_ids"))[1]

  def score(self, logits, batch, train: bool):
    targets, weights = lm_targets(batch["tokens"], batch.get("segment_ids"))
    return cross_entropy(logits, targets, weights, self.z_loss if train else 0.0)
