"""Classifier rows: framing, truncation and windows over long texts, and the pooling of a
text's rows (infer/classifier_rows.py); the model-level checks are in test_finetune.py."""
import chex
import numpy as np
import pytest

from helpers import CharTokenizer
from infer import classifier_rows

BOS, EOS = CharTokenizer.bos_id, CharTokenizer.eos_id


@pytest.mark.parametrize("length,width,stride", [(10, 4, 3), (10, 4, 4), (9, 4, 1), (100, 30, 7)])
def test_windows_cover_the_text_stride_apart_and_end_at_its_end(length, width, stride):
  starts = classifier_rows.window_starts(length, width, stride)
  covered = set()
  for s in starts:
    covered.update(range(s, s + width))
  assert covered == set(range(length))
  assert starts[0] == 0 and starts[-1] == length - width
  assert all(b - a == stride for a, b in zip(starts[:-2], starts[1:-1]))
  assert 0 < starts[-1] - starts[-2] <= stride
  assert classifier_rows.window_starts(width, width, stride) == []


def test_rows_are_the_training_row_then_framed_windows():
  tok = CharTokenizer()
  texts = ["abcdefghij", "xyz"]          # 10 ids and 3 ids; a row holds 6 = 4 + bos/eos
  rows, owners = classifier_rows.rows_for(tok, texts, 6, "head_tail", stride=3)
  ids = lambda s: [ord(c) + 10 for c in s]
  assert rows == [
      [BOS] + ids("a" + "hij") + [EOS],   # head_tail as in training: first quarter + the end
      [BOS] + ids("abcd") + [EOS], [BOS] + ids("defg") + [EOS], [BOS] + ids("ghij") + [EOS],
      [BOS] + ids("xyz") + [EOS]]         # fits: one row, no windows
  np.testing.assert_array_equal(owners, [0, 0, 0, 0, 1])
  # stride 0: one training row per text, exactly what encode_framed gives.
  rows, owners = classifier_rows.rows_for(tok, texts, 6, "head", stride=0)
  assert rows == [tok.encode_framed(t, 6, "head") for t in texts]
  np.testing.assert_array_equal(owners, [0, 1])
  with pytest.raises(ValueError, match="window_stride=5: expected 0 .off. .. 4"):
    classifier_rows.rows_for(tok, texts, 6, "head", stride=5)


def test_pool_is_the_softmax_of_each_texts_mean_log_probability():
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(3), size=5).astype(np.float32)
  owners = np.array([0, 0, 1, 0, 2])
  pooled = classifier_rows.pool(probs, owners, 3)
  logits0 = np.log(probs[[0, 1, 3]]).mean(axis=0)
  expected0 = np.exp(logits0) / np.exp(logits0).sum()
  chex.assert_trees_all_close(pooled[0], expected0.astype(np.float32), rtol=1e-6)
  chex.assert_trees_all_close(pooled[1:], probs[[2, 4]], rtol=1e-6)   # one row: unchanged
  chex.assert_shape(pooled, (3, 3))
  assert pooled.dtype == np.float32
  # Confident rows dominate as logits do: mean log-probabilities, not mean probabilities.
  two = classifier_rows.pool(np.array([[0.99, 0.01], [0.4, 0.6]], np.float32),
                             np.array([0, 0]), 1)
  assert two[0, 0] > 0.85 > (0.99 + 0.4) / 2   # 0.890 against 0.695


def test_pad_rows_right_pads_and_masks_by_length():
  batch = classifier_rows.pad_rows([[5, 0, 7], [9]], 4)
  np.testing.assert_array_equal(batch["tokens"], [[5, 0, 7, 0], [9, 0, 0, 0]])
  np.testing.assert_array_equal(batch["mask"], [[1, 1, 1, 0], [1, 0, 0, 0]])
