"""Sequence classification: the transformer with a classifier head on its pooled final state.

Batches (from train/data/examples.py): tokens, mask (int32 [B, T]), label (int32 [B]). Rows
whose mask is all zero pad a short final batch and carry no weight. A row labelled -1 (an
unlabelled text of a distillation transfer set: examples.UNLABELLED) counts in the weight - the
teachers' loss is over every row - but scores zero loss and zero hits: in such a run the train
`accuracy` and `task_loss` are per row of the batch, labelled or not.
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
    label = batch["label"]
    labelled = (label >= 0).astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.maximum(label, 0)[:, None],
                               axis=-1)[:, 0]
    correct = (jnp.argmax(logits, axis=-1) == label).astype(jnp.float32)
    return self.weighted_sums(nll * labelled, correct, self.weights(batch))

  def predict(self, params, batch):
    """Class probabilities [B, num_classes] (float32)."""
    return jax.nn.softmax(self.forward(params, batch))
