"""Summarization as a prefix-LM: `[bos] document [eos]` is the prefix (attended bidirectionally),
the summary after it is generated causally, and only summary tokens are scored.

Batches (from train/data/examples.py): tokens, mask (int32 [B, T]), prefix_len (int32 [B]).
"""
import jax.numpy as jnp
import numpy as np

from train.tasks.base import Task
from train.tasks.pretrain import cross_entropy


def summary_targets(tokens, mask, prefix_len):
  """(targets, weights) [B, T]: position t predicts token t+1, scored when t+1 is summary."""
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  next_pos = jnp.arange(1, tokens.shape[1] + 1)[None, :]
  in_summary = (next_pos >= prefix_len[:, None]) & (jnp.pad(mask[:, 1:], ((0, 0), (0, 1))) > 0)
  return targets, in_summary.astype(jnp.float32)


class SummarizeTask(Task):

  @staticmethod
  def dummy_batch(batch_size: int, seq_len: int):
    return {"tokens": np.zeros((batch_size, seq_len), np.int32),
            "mask": np.ones((batch_size, seq_len), np.int32),
            "prefix_len": np.full((batch_size,), max(seq_len // 2, 1), np.int32)}

  def inputs(self, batch):
    return batch["tokens"], {"segment_ids": batch["mask"], "prefix_len": batch["prefix_len"]}

  def weights(self, batch):
    return summary_targets(batch["tokens"], batch["mask"], batch["prefix_len"])[1]

  def score(self, logits, batch, train: bool):
    targets, weights = summary_targets(batch["tokens"], batch["mask"], batch["prefix_len"])
    return cross_entropy(logits, targets, weights, self.z_loss if train else 0.0)
