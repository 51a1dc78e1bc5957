"""Trains the sentencepiece tokenizer (model/tokenizer.py) on the train split, cached next to the
dataset build.

Training choices, and why:
  * BPE model: sentencepiece's BPE trains several times faster than its unigram model on the
    legal corpus. Unigram encodes faster, but BPE's encoding speed is ample for the input
    pipeline.
  * identity normalization, no whitespace collapsing, no dummy prefix: legal text keeps its
    exact spacing and line structure, and `decode(encode(s)) == s` for any string.
  * byte_fallback: characters outside the vocabulary become byte pieces, never <unk>.
  * ids: pad=0 (packed rows are zero-padded), unk=1, bos=2, eos=3.
  * sentences are the lines of the train documents (long lines cut into 2048-character pieces);
    up to `data.tokenizer_sentences` of them are chosen by hashing (document id, line number),
    so the sample is deterministic, and sentencepiece's own sampling and shuffling are off.
  * `hard_vocab_limit=False`: a corpus too small for the requested size gets a smaller
    vocabulary (`Tokenizer.vocab_size` <= `data.vocab_size`) instead of failing.
"""
import heapq
import io
import os
import pathlib
import tempfile

import sentencepiece as spm

from model.errors import DataError
from model.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer
from train.data import corpus as corpus_lib

# Bump when training options change, so older cached models are not reused.
TOKENIZER_FORMAT = 1
_MAX_SENTENCE_CHARS = 2048
_READ_BATCH = 256
_MIN_VOCAB = 300  # 256 byte pieces + 4 specials + some room for real pieces


def model_path(data_config, fingerprint: str) -> pathlib.Path:
  name = (f"spm{TOKENIZER_FORMAT}_v{data_config.vocab_size}_n{data_config.tokenizer_sentences}"
          f"_{fingerprint}.model")
  return pathlib.Path(os.path.expanduser(data_config.data_dir)) / "tokenizers" / name


def _sentences(source, limit: int) -> list[str]:
  """Up to `limit` lines of the documents in `source`, chosen by a hash of their position."""
  keyed = []
  for first in range(0, len(source), _READ_BATCH):
    # Batched reads: ArrayRecord serves them in parallel, several times faster than one by one.
    for record in source.__getitems__(list(range(first, min(first + _READ_BATCH, len(source))))):
      doc_id = record["id"].decode()
      for n, line in enumerate(record["text"].decode().splitlines()):
        for start in range(0, len(line), _MAX_SENTENCE_CHARS):
          piece = line[start:start + _MAX_SENTENCE_CHARS]
          if piece.strip():
            keyed.append((corpus_lib.hash_unit(f"{doc_id}:{n}:{start}", "tokenizer"), piece))
    if len(keyed) > 2 * limit:  # bounds memory on corpora much larger than the sample
      keyed = heapq.nsmallest(limit, keyed)
  if len(keyed) > limit:
    keyed = heapq.nsmallest(limit, keyed)
  return [piece for _, piece in keyed]


def _weighted_sentences(sources, limit: int) -> list[str]:
  """A mixture's sample: from each (source, weight) its share of `limit` (weights sum to 1),
  at least one line each."""
  out = []
  for source, weight in sources:
    out += _sentences(source, max(1, round(limit * weight)))
  return out


def train_tokenizer(data_config, train_source, fingerprint: str) -> Tokenizer:
  """Trains on `train_source` unless the model for (vocab, sentences, dataset) is cached.
  `train_source` may be a list of (source, weight): a mixture, sampled by weight."""
  if data_config.vocab_size < _MIN_VOCAB:
    raise DataError(f"data.vocab_size={data_config.vocab_size}: expected at least {_MIN_VOCAB} "
                    "(byte fallback alone takes 256 ids)")
  path = model_path(data_config, fingerprint)
  if path.exists():
    return Tokenizer(path)
  if isinstance(train_source, list):
    sentences = _weighted_sentences(train_source, data_config.tokenizer_sentences)
  else:
    sentences = _sentences(train_source, data_config.tokenizer_sentences)
  if not sentences:
    raise DataError(f"no text to train the tokenizer on in the train split of dataset "
                    f"{fingerprint}")
  model = io.BytesIO()  # in memory, so the model holds no temporary file name
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="bpe",
        vocab_size=data_config.vocab_size, hard_vocab_limit=False, byte_fallback=True,
        character_coverage=0.9995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
        allow_whitespace_only_pieces=True, max_sentence_length=4 * _MAX_SENTENCE_CHARS,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=os.cpu_count() or 1,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, minloglevel=2)
  except RuntimeError as e:  # e.g. more distinct characters than data.vocab_size allows
    raise DataError(f"sentencepiece cannot train data.vocab_size={data_config.vocab_size} on "
                    f"{len(sentences)} sentences of dataset {fingerprint}: {e}") from None
  path.parent.mkdir(parents=True, exist_ok=True)
  # Write and rename, so a concurrent or killed run never leaves a partial cached model.
  with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
    f.write(model.getvalue())
  os.replace(f.name, path)
  return Tokenizer(path)
