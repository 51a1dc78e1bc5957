"""The sentencepiece tokenizer a run uses at train and inference time: special ids, framing
and truncation shared by training and serving. How it is trained: train/data/tokenizer_training.py."""

import hashlib
import os

from etils import epath
import numpy as np
import sentencepiece as spm

from model.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
  """A sentencepiece model with the special ids this codebase relies on."""

  def __init__(self, path: str | os.PathLike):
    self.path = str(path)
    self._load()

  def _load(self):
    path = epath.Path(self.path)
    if not path.exists():
      raise DataError(f"tokenizer model {self.path} does not exist")
    self._sp = spm.SentencePieceProcessor(model_proto=path.read_bytes())
    if self._sp.pad_id() != PAD_ID:
      raise DataError(f"tokenizer model {self.path}: pad id is {self._sp.pad_id()}, expected "
                      f"{PAD_ID} (packed rows are zero-padded)")

  # Worker processes get the path and load the model themselves.
  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.path = state["path"]
    self._load()

  @property
  def fingerprint(self) -> str:
    """A hash of the model itself, the same wherever the file is copied."""
    return hashlib.sha256(self._sp.serialized_model_proto()).hexdigest()[:12]

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_framed(self, text: str, max_len: int, how: str) -> list[int]:
    """`[bos] text [eos]` in at most max_len ids, the text cut by `truncate(..., how)`: a
    classifier input or a summarization prompt, the same in training and at inference."""
    return [self.bos_id] + truncate(self.encode(text), max_len - 2, how) + [self.eos_id]

  def decode(self, ids) -> str:
    """Text of `ids`. The model's embedding may have more rows (data.vocab_size) than this
    tokenizer has pieces; a generated id past the pieces has no text and is dropped."""
    n = self.vocab_size
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < n])


def truncate(ids: list[int], budget: int, how: str) -> list[int]:
  """At most `budget` ids: the head, or (how="head_tail") the first quarter and the end."""
  if len(ids) <= budget:
    return ids
  if how == "head_tail":
    head = budget // 4
    return ids[:head] + ids[len(ids) - (budget - head):]
  return ids[:budget]


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Restores a tokenizer from its .model file (e.g. the one recorded with a checkpoint)."""
  return Tokenizer(path)
