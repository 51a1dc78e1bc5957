"""Classifier input rows: texts framed, truncated or read in windows, padded to a batch.

A classifier row holds `data.seq_len` ids, so a longer text is cut as in training
(`data.truncation`: its head, or head_tail's first quarter and end). With
`eval.window_stride` = S > 0 such a text is also read in windows: row-long slices of its ids
starting every S ids, the last one ending at the text's end, each framed like a training row.
The text's class probabilities are the softmax of the mean of its rows' log-probabilities
(the truncated row and each window weigh the same; a mean of logits, up to each row's
normaliser). Short texts are one row either way, so only long ones change and cost more.
"""
import numpy as np

from model import tokenizer as tokenizer_lib


def window_starts(length: int, width: int, stride: int) -> list[int]:
  """Starts of the `width`-id windows `stride` ids apart over `length` ids, the last ending at
  the end; none when the ids fit in one window."""
  if length <= width:
    return []
  return list(range(0, length - width, stride)) + [length - width]


def check_stride(stride: int, seq_len: int, tokenizer) -> None:
  """ValueError unless 0 <= stride <= the text ids a row of seq_len holds (less framing)."""
  width = seq_len - tokenizer.frame_len
  if not 0 <= stride <= width:
    raise ValueError(f"window_stride={stride}: expected 0 (off) .. {width} (a row's text ids)")


def rows_for(tokenizer, texts: list[str], seq_len: int, how: str,
             stride: int) -> tuple[list[list[int]], np.ndarray]:
  """(framed id rows of at most seq_len ids, the index of the text each row reads): first
  each text truncated as in training, then (stride > 0) the windows of the texts that did not
  fit."""
  check_stride(stride, seq_len, tokenizer)
  width = seq_len - tokenizer.frame_len
  rows, owners = [], []
  for i, text in enumerate(texts):
    ids = tokenizer.encode(text)
    rows.append(tokenizer.frame(tokenizer_lib.truncate(ids, width, how)))
    owners.append(i)
    for start in (window_starts(len(ids), width, stride) if stride else ()):
      rows.append(tokenizer.frame(ids[start:start + width]))
      owners.append(i)
  return rows, np.asarray(owners, np.int64)


def pool(probs: np.ndarray, owners: np.ndarray, num_texts: int) -> np.ndarray:
  """[num_texts, classes]: the softmax of each text's mean row log-probability."""
  logp = np.log(np.clip(probs.astype(np.float64), 1e-30, None))
  sums = np.zeros((num_texts, probs.shape[1]))
  np.add.at(sums, owners, logp)
  mean = sums / np.bincount(owners, minlength=num_texts)[:, None]
  mean -= mean.max(axis=1, keepdims=True)
  pooled = np.exp(mean)
  return (pooled / pooled.sum(axis=1, keepdims=True)).astype(probs.dtype)


def pad_rows(rows: list[list[int]], seq_len: int) -> dict:
  """{"tokens", "mask"}: id rows right-padded with 0 to [len(rows), seq_len]; the mask marks
  real ids by length, as in training (id 0 is a real token in HF vocabularies)."""
  tokens = np.zeros((len(rows), seq_len), np.int32)
  mask = np.zeros((len(rows), seq_len), np.int32)
  for i, ids in enumerate(rows):
    tokens[i, :len(ids)] = ids
    mask[i, :len(ids)] = 1
  return {"tokens": tokens, "mask": mask}
