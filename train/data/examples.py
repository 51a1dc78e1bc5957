"""Fine-tuning data: labelled JSONL examples -> fixed-shape token batches, resumable.

A fine-tuning dataset is one or two of `data.train_file`, `data.test_file`: each a JSONL file
(one JSON object per line), a CSV/TSV file with a header row (each optionally gzipped), or a
prepared TFDS dataset `tfds:<name>[/<config>][:<split>]` (train/data/sources.py reads them all).
Field names come from the config (`data.text_field`, `data.label_field`, `data.summary_field`).
The validation split is held out from the train data by a hash of each example's id (its `id`
field, else `<file name>:<line>`, or `<tfds name>:<split>:<index>`), so it never changes
between runs or machines; `data.max_examples` keeps a seeded subset of the train split (e.g. the
10k-example IMDB variant), `data.max_validation_examples` one of the validation split (4k-token
judgments: a validation over all 351 costs minutes).

Rows are fixed-length (`data.seq_len`), right-padded with id 0:
  classify:   [bos] text [eos]                     mask = 1 on real tokens
  summarize:  [bos] document [eos] summary [eos]   prefix_len = len([bos] document [eos]);
              the summary keeps at most `data.target_len` tokens, the document the rest.
`data.truncation` = head keeps the start of an over-long text; head_tail keeps its first quarter
and its end (the end of a review or judgment often carries the verdict).
"""
import dataclasses
import hashlib
import os

import grain
import numpy as np
from absl import logging

from train.data import corpus as corpus_lib
from train.data import gap_sentences
from train.data import sources as sources_lib
from model.errors import DataError
from train.data.pipeline import LMIterator

TASK_FIELDS = {"classify": "label_field", "summarize": "summary_field"}
UNLABELLED = -1    # the label of a classifier's unlabelled text (distill.transfer_file)


@dataclasses.dataclass(frozen=True)
class Example:
  id: str
  text: str
  target: object           # int label (classify) or summary text (summarize)
  source: str              # file name, for slicing by source dataset


def read_examples(path: str, task: str, data_cfg, key: str = "data.train_file",
                  labelled: bool = True) -> list[Example]:
  """Every example of one dataset (a JSONL/CSV/TSV file or tfds:<name>[:<split>]), checked; bad
  records fail (file:line) or are skipped per data.bad_lines. `key` names the config key in
  errors. Unlabelled texts (`labelled=False`, classifiers) get the label UNLABELLED."""
  text_key = data_cfg.text_field
  target_key = data_cfg[TASK_FIELDS[task]] if labelled else None
  int_fields = (target_key,) if task == "classify" and labelled else ()
  examples, skipped = [], 0
  name = path if sources_lib.is_tfds(path) else os.path.basename(path)
  fields = (text_key, target_key) if labelled else (text_key,)
  for where, record in sources_lib.records(path, key, data_cfg, fields, int_fields):
    try:
      if isinstance(record, DataError):
        raise record
      example = _to_example(record, name, where.rpartition(":")[2], text_key, target_key, task)
    except DataError as e:
      if data_cfg.bad_lines != "skip":
        raise DataError(f"{where}: {e} (set config.data.bad_lines=skip to skip such "
                        "lines)") from None
      logging.warning("skipping %s: %s", where, e)
      skipped += 1
      continue
    examples.append(example)
  if not examples:
    raise DataError(f"{path}: no examples with fields {' and '.join(map(repr, fields))}")
  if skipped:
    logging.warning("%s: skipped %d bad lines of %d", path, skipped, skipped + len(examples))
  return examples


def _to_example(record: dict, file_name: str, lineno: str, text_key: str, target_key: str | None,
                task: str) -> Example:
  text = record.get(text_key)
  target = UNLABELLED if target_key is None else record.get(target_key)
  if not isinstance(text, str) or not text.strip():
    raise DataError(f"expected a non-empty string field {text_key!r} (data.text_field)")
  if task == "classify" and (isinstance(target, bool) or not isinstance(target, int)):
    raise DataError(f"expected an integer field {target_key!r} (data.label_field), got "
                    f"{target!r}")
  if task == "summarize" and target_key and (not isinstance(target, str) or not target.strip()):
    raise DataError(f"expected a non-empty string field {target_key!r} (data.summary_field)")
  doc_id = str(record.get("id", f"{file_name}:{lineno}"))
  return Example(doc_id, text.strip(), target.strip() if isinstance(target, str) else target,
                 str(record.get("source", file_name)))


def load_splits(data_cfg, task: str, num_classes: int = 0) -> dict[str, list[Example]]:
  """{'train', 'validation'[, 'test']}: validation (and, without a test file, test) held out
  from the train file by id hash."""
  if not data_cfg.train_file:
    raise DataError(f"config.data.train_file is empty: task {task!r} needs a dataset (a JSONL "
                    "or CSV file, or tfds:<name>:<split>)")
  pseudo = task == "summarize" and gap_sentences.enabled(data_cfg)
  every = read_examples(data_cfg.train_file, task, data_cfg, "data.train_file",
                        labelled=not pseudo)
  splits = {"train": [], "validation": []}
  if data_cfg.test_fraction > 0 and not data_cfg.test_file:
    splits["test"] = [e for e in every
                      if corpus_lib.hash_unit(e.id, "test") < data_cfg.test_fraction]
    every = [e for e in every if corpus_lib.hash_unit(e.id, "test") >= data_cfg.test_fraction]
  for ex in every:
    splits[corpus_lib.split_of(ex.id, data_cfg.validation_fraction)].append(ex)
  if pseudo:   # split by document first, so that a document's passages share a split
    splits = {name: gap_sentences.pseudo_pairs(docs, data_cfg.gap_sentences)
              for name, docs in splits.items()}
  # (split, config key, hash salt: at most 16 bytes)
  for split, key, salt in (("train", "max_examples", "max_examples"),
                           ("validation", "max_validation_examples", "max_validation")):
    limit = data_cfg.get(key, -1)   # runs recorded before max_validation_examples lack it
    if limit > 0 and len(splits[split]) > limit:
      keep = sorted(splits[split], key=lambda e: corpus_lib.hash_unit(e.id, salt))
      keep = set(e.id for e in keep[:limit])
      splits[split] = [e for e in splits[split] if e.id in keep]
  if data_cfg.test_file:
    splits["test"] = read_examples(data_cfg.test_file, task, data_cfg, "data.test_file")
  for name, examples in splits.items():
    if not examples:
      raise DataError(f"the {name} split is empty (data.validation_fraction="
                      f"{data_cfg.validation_fraction}, {len(every)} train examples)")
    if task == "classify":
      bad = [e for e in examples if not 0 <= e.target < num_classes]
      if bad:
        raise DataError(f"{name} example {bad[0].id} has label {bad[0].target}; expected "
                        f"0..{num_classes - 1} (config.model.num_classes={num_classes})")
  return splits


def load_transfer(path: str, data_cfg, splits: dict[str, list[Example]]) -> list[Example]:
  """The unlabelled texts of `distill.transfer_file` (label UNLABELLED): more rows for a
  classifier's student, taught by its teachers alone. A text sharing an id or its text with a
  labelled example is dropped (logged per split): a test or validation text would leak into
  what is scored, a train one is there already (IMDB's unlabelled reviews repeat 371 train
  reviews word for word)."""
  transfer = read_examples(path, "classify", data_cfg, "config.distill.transfer_file",
                           labelled=False)
  split_of = {}
  for split, examples in splits.items():
    for e in examples:
      split_of[e.id] = split_of[e.text] = split
  kept, dropped = [], {}
  for e in transfer:
    split = split_of.get(e.id) or split_of.get(e.text)
    if split:
      dropped.setdefault(split, []).append(e.id)
    else:
      kept.append(e)
  for split, ids in dropped.items():
    logging.warning("%s (config.distill.transfer_file): dropped %d texts that are also %s "
                    "examples, e.g. %r", path, len(ids), split, ids[0])
  if not kept:
    raise DataError(f"{path} (config.distill.transfer_file): every text is also a labelled "
                    "example; the transfer set must hold other texts")
  return kept


def fingerprint(data_cfg, spec: str | None = None, key: str = "data.train_file") -> str:
  """Names the fine-tuning data (file contents, or a TFDS dataset's version and split, + fields),
  e.g. for its tokenizer: data.train_file's, or another dataset's (`spec`) read the same way."""
  h = hashlib.blake2b(digest_size=6)
  sources_lib.fingerprint_update(h, spec or data_cfg.train_file, key, data_cfg)
  h.update(f"{data_cfg.text_field}|{data_cfg.summary_field}".encode())
  if gap_sentences.enabled(data_cfg):
    h.update(repr(sorted(data_cfg.gap_sentences.items())).encode())
  return "ft" + h.hexdigest()


class TextSource:
  """The train texts in the shape the tokenizer trainer reads (records of id/text bytes)."""

  def __init__(self, examples: list[Example], task: str):
    texts = [e.text + ("\n" + e.target if task == "summarize" else "") for e in examples]
    self._records = [{"id": e.id.encode(), "text": t.encode()} for e, t in zip(examples, texts)]

  def __len__(self):
    return len(self._records)

  def __getitems__(self, indices):
    return [self._records[i] for i in indices]


def encode(example: Example, tokenizer, task: str, data_cfg) -> dict[str, np.ndarray]:
  """One fixed-length row (see the module docstring)."""
  seq_len = data_cfg.seq_len
  if task == "classify":
    ids = tokenizer.encode_framed(example.text, seq_len, data_cfg.truncation)
    row = {"label": np.int32(example.target)}
  else:
    summary = tokenizer.encode(example.target)[:data_cfg.target_len - 1] + [tokenizer.eos_id]
    doc = tokenizer.encode_framed(example.text, seq_len - len(summary), data_cfg.truncation)
    ids = doc + summary
    row = {"prefix_len": np.int32(len(doc))}
  return _padded(ids, seq_len, row)


def _padded(ids: list[int], seq_len: int, row: dict) -> dict[str, np.ndarray]:
  """`row` plus `tokens` (ids right-padded with 0 to seq_len) and their `mask`."""
  tokens = np.zeros(seq_len, np.int32)
  tokens[:len(ids)] = ids
  row.update(tokens=tokens, mask=(np.arange(seq_len) < len(ids)).astype(np.int32))
  return row


def pad_batch(rows, batch_size: int):
  """Stacks rows; a short final batch is filled with all-zero rows (mask 0: never scored)."""
  out = {}
  for key in rows[0]:
    x = np.stack([r[key] for r in rows])
    out[key] = np.pad(x, [(0, batch_size - len(rows))] + [(0, 0)] * (x.ndim - 1))
  return out


def make_iterator(rows: list[dict], data_cfg, *, split: str, shuffle: bool, repeat: bool,
                  seed: int, process_index: int = 0, process_count: int = 1,
                  identity: dict | None = None) -> LMIterator:
  """Batches of this process's rows; checkpointable like the pre-training iterator."""
  batch_size = data_cfg.batch_size // process_count
  ds = grain.MapDataset.source(rows)[process_index::process_count]
  if not len(ds):
    raise DataError(f"process {process_index} of {process_count} gets no {split} examples")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  ds = ds.batch(batch_size, drop_remainder=repeat,
                batch_fn=lambda b: pad_batch(b, batch_size)).to_iter_dataset()
  if data_cfg.prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=data_cfg.prefetch)
  ident = {"split": split, "rows": len(rows), "seq_len": data_cfg.seq_len,
           "batch_size": batch_size, "process_index": process_index,
           "process_count": process_count, "shuffle": shuffle, "repeat": repeat, "seed": seed,
           **(identity or {})}
  return LMIterator(ds, ident)
