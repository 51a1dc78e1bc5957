"""The tokenizer a run uses at train and inference time: special ids, framing and truncation
shared by training and serving. One interface (TokenizerBase), two implementations: the
sentencepiece model this codebase trains (train/data/tokenizer_training.py) and a Hugging Face
tokenizer.json of an imported model (train/hf/convert.py)."""

import hashlib
import json
import os

from etils import epath
import numpy as np
import sentencepiece as spm

from model.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class TokenizerBase:
  """The one interface every run's tokenizer has: special ids, encode / decode, framing.

  Implementations: `Tokenizer` (a sentencepiece .model, what this codebase trains) and
  `HFTokenizer` (a Hugging Face tokenizer.json through the `tokenizers` library, what
  train/hf/convert.py imports). `load_tokenizer` picks one from the recorded path."""
  kind = "base"
  path: str

  @property
  def fingerprint(self) -> str:
    raise NotImplementedError

  @property
  def vocab_size(self) -> int:
    raise NotImplementedError

  pad_id = bos_id = eos_id = None

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without special tokens."""
    raise NotImplementedError

  def decode(self, ids) -> str:
    raise NotImplementedError

  def frame(self, ids: list[int]) -> list[int]:
    """`[bos] ids [eos]`: the framing of every classifier input and summarization prompt."""
    return [self.bos_id] + list(ids) + [self.eos_id]

  @property
  def frame_len(self) -> int:
    """How many ids `frame` adds."""
    return len(self.frame([]))

  def encode_framed(self, text: str, max_len: int, how: str) -> list[int]:
    """`[bos] text [eos]` in at most max_len ids, the text cut by `truncate(..., how)`: a
    classifier input or a summarization prompt, the same in training and at inference."""
    return self.frame(truncate(self.encode(text), max_len - self.frame_len, how))

  def _known_ids(self, ids) -> list[int]:
    n = self.vocab_size
    return [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < n]


class Tokenizer(TokenizerBase):
  """A sentencepiece model with the special ids this codebase relies on."""
  kind = "sentencepiece"

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

  def decode(self, ids) -> str:
    """Text of `ids`. The model's embedding may have more rows (data.vocab_size) than this
    tokenizer has pieces; a generated id past the pieces has no text and is dropped."""
    return self._sp.decode(self._known_ids(ids))


HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"


class HFTokenizer(TokenizerBase):
  """A Hugging Face fast tokenizer (tokenizer.json, run by the `tokenizers` library) with the
  special tokens and chat template of the tokenizer_config.json beside it. Ids are those of
  transformers' AutoTokenizer for the same files (tests/test_hf_convert.py checks)."""
  kind = "hf"

  def __init__(self, path: str | os.PathLike):
    self.path = str(path)
    self._load()

  def _load(self):
    try:
      import tokenizers
    except ImportError:
      raise DataError(f"tokenizer {self.path} is a Hugging Face tokenizer.json: install the "
                      "`tokenizers` package (requirements.txt)") from None
    path = epath.Path(self.path)
    if not path.exists():
      raise DataError(f"tokenizer {self.path} does not exist")
    self._raw = path.read_text()
    self._tok = tokenizers.Tokenizer.from_str(self._raw)
    config_path = path.parent / HF_TOKENIZER_CONFIG
    self.config = json.loads(config_path.read_text()) if config_path.exists() else {}
    self.special_tokens = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token", "cls_token", "sep_token",
                "mask_token"):
      token = self.config.get(key)
      if isinstance(token, dict):
        token = token.get("content")
      if token is not None and self._tok.token_to_id(token) is not None:
        self.special_tokens[key] = token
    template = path.parent / "chat_template.jinja"   # where transformers >= 4.49 saves it
    self.chat_template = (template.read_text() if template.exists()
                          else self.config.get("chat_template"))

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.path = state["path"]
    self._load()

  def _id(self, key):
    token = self.special_tokens.get(key)
    return None if token is None else self._tok.token_to_id(token)

  @property
  def fingerprint(self) -> str:
    return hashlib.sha256(self._raw.encode()).hexdigest()[:12]

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self):
    return self._id("bos_token") if "bos_token" in self.special_tokens else self._id("cls_token")

  @property
  def eos_id(self):
    return self._id("eos_token") if "eos_token" in self.special_tokens else self._id("sep_token")

  @property
  def pad_id(self):
    pad = self._id("pad_token")
    return pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_with_specials(self, text: str) -> list[int]:
    """Ids with the family's own framing (its post-processor: e.g. Llama's leading BOS)."""
    return self._tok.encode(text, add_special_tokens=True).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def frame(self, ids: list[int]) -> list[int]:
    """As the base class, leaving out a frame token the family does not have (GPT-2 has only
    <|endoftext|>, used as both bos and eos)."""
    head = [self.bos_id] if self.bos_id is not None else []
    tail = [self.eos_id] if self.eos_id is not None else []
    return head + list(ids) + tail

  def decode(self, ids) -> str:
    return self._tok.decode(self._known_ids(ids), skip_special_tokens=True)

  def record(self) -> dict:
    """What a run's metadata keeps of it: kind, special tokens, chat template."""
    return {"kind": self.kind, "special_tokens": self.special_tokens,
            "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
            "chat_template": self.chat_template}


def truncate(ids: list[int], budget: int, how: str) -> list[int]:
  """At most `budget` ids: the head, or (how="head_tail") the first quarter and the end."""
  if len(ids) <= budget:
    return ids
  if how == "head_tail":
    head = budget // 4
    return ids[:head] + ids[len(ids) - (budget - head):]
  return ids[:budget]


def load_tokenizer(path: str | os.PathLike) -> TokenizerBase:
  """Restores a tokenizer from the path a run recorded: a sentencepiece .model file, or a
  Hugging Face tokenizer.json (or the folder holding one)."""
  path = str(path)
  if os.path.isdir(path):
    path = os.path.join(path, HF_TOKENIZER_FILE)
  if path.endswith(".json"):
    return HFTokenizer(path)
  return Tokenizer(path)
