"""Sequence classification: the transformer with a classifier head on its pooled final state.

Batches (from train/data/examples.py): tokens, mask (int32 [B, T]), label (int32 [B]). Rows
whose mask is all zero pad a short final batch and carry no weight.
"""
import jax
import jax.numpy as jnp
import numpy as np

from train.tasks.base import Task


class ClassifyTask(Task):

  @staticmethod
  def dummy_batch(batch_size: int, seq_len: int):
    return {"tokens": np.zeros((batch_size, seq_len), np.int32),
            "mask": np.ones((batch_size, seq_len), np.int32),
            "label": np.zeros((batch_size,), np.int32)}

  def inputs(self, batch):
    # Right padding needs no attention mask under causal attention (see Transformer.__call__).
    return batch["tokens"], {"pool_mask": batch["mask"] > 0}

  def weights(self, batch):
    return (batch["mask"][:, 0] > 0).astype(jnp.float32)

  def score(self, logits, batch, train: bool):
    del train
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
    return self.weighted_sums(nll, correct, self.weights(batch))

  def predict(self, params, batch):
    """Class probabilities [B, num_classes] (float32)."""
    return jax.nn.softmax(self.forward(params, batch))
