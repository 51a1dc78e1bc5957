"""An offline teacher for distilling a classifier: class probabilities for each train and
validation example (and each unlabelled text of distill.transfer_file), made before training
instead of by a network inside the step.

`distill.offline_teacher` is either
  "tfidf"         TF-IDF + logistic regression (eval/tfidf_baseline.py) fitted here: each train
                  example's probabilities come from a fit on the other `distill.offline_folds`
                  folds of the train split (out-of-fold, so a target never echoes the example's
                  own label), each validation example's and transfer text's from a fit on the
                  whole train split;
  a JSONL file    one {"id", "probs"} per example (e.g. another framework's model; a run's
                  test_predictions.jsonl and infer.main's output have this shape), covering
                  every train, validation and transfer id.
Why a bag-of-n-grams teacher at all: its errors differ from a transformer's (four IMDB
fine-tunes' mean probabilities averaged with TF-IDF's score 0.914 on validation against 0.904
without), at a minute of CPU instead of a forward pass per step. Measured, though, a student
taught by that mixture scored below one taught by the fine-tunes alone (docs/results/imdb.md):
on the train reviews its out-of-fold targets are right on 0.905 of them, a fine-tune's
in-sample ones on 0.933.
train/tasks/distill.py mixes these probabilities into the networks' (`distill.offline_weight`).
The TF-IDF targets are kept under `cache_dir` (data.data_dir), named by a hash of every
covered example (id, text, label) and the fold count: a resumed or repeated run reads them
instead of refitting (77 s on IMDB's 25k reviews, docs/results/imdb.md), and any change to
the data refits.
"""
import hashlib
import os
import time

import numpy as np
from absl import logging

from eval import tfidf_baseline
from model.errors import DataError
from train.data import sources as sources_lib

SPLITS = ("train", "validation")


def load(distill_cfg, splits: dict, num_classes: int, transfer: list | None = None,
         cache_dir: str | None = None) -> dict[str, np.ndarray]:
  """{example id: float32 [num_classes] probabilities} for every train and validation example
  and every unlabelled text of the transfer set (distill.transfer_file)."""
  source = distill_cfg.offline_teacher
  covered = {**{split: splits[split] for split in SPLITS}, "transfer": transfer or []}
  if source != "tfidf":
    return _read(source, covered, num_classes)
  folds = distill_cfg.offline_folds
  if not cache_dir:
    return _tfidf(covered, num_classes, folds)
  h = hashlib.blake2b(f"{num_classes}|{folds}".encode(), digest_size=10)
  for name, examples in covered.items():
    for e in examples:
      h.update(f"\0{name}\0{e.id}\0{e.target}\0{e.text}".encode())
  path = os.path.join(os.path.expanduser(cache_dir), "offline_teacher",
                      f"tfidf-{h.hexdigest()}.npz")
  if os.path.exists(path):
    with np.load(path) as saved:
      logging.info("offline teacher tf-idf: read from %s (fitted on the same data before)", path)
      return dict(zip(saved["ids"].tolist(), saved["probs"]))
  targets = _tfidf(covered, num_classes, folds)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp.npz"   # written whole, then renamed: no half-read file
  np.savez(tmp, ids=np.array(list(targets)), probs=np.stack(list(targets.values())))
  os.replace(tmp, path)
  return targets


def _tfidf(splits: dict, num_classes: int, folds: int) -> dict[str, np.ndarray]:
  start = time.perf_counter()
  train, validation, transfer = (
      [{"id": e.id, "text": e.text, "label": max(int(e.target), 0)} for e in splits[name]]
      for name in ("train", "validation", "transfer"))   # a transfer text's label is unused
  train_probs = tfidf_baseline.out_of_fold(train, folds)
  scored, _ = tfidf_baseline.predict(train, validation + transfer)
  targets = {}
  for records, probs in ((train, train_probs),
                         (validation + transfer, [r["probs"] for r in scored])):
    for record, p in zip(records, probs):
      row = np.zeros(num_classes, np.float32)
      row[:len(p)] = p
      targets[record["id"]] = row
  for name, records in (("train (out-of-fold)", train), ("validation", validation)):
    hits = np.mean([targets[r["id"]].argmax() == r["label"] for r in records])
    logging.info("offline teacher tf-idf: %s accuracy %.4f", name, hits)
  logging.info("offline teacher tf-idf: %d folds fitted in %.0f s", folds,
               time.perf_counter() - start)
  return targets


def _read(path: str, splits: dict, num_classes: int) -> dict[str, np.ndarray]:
  key = "config.distill.offline_teacher"
  targets = {}
  for where, record in sources_lib.records(path, key, None, ("id", "probs"), ()):
    if isinstance(record, DataError):
      raise DataError(f"{where}: {record}")
    try:
      probs = np.asarray(record.get("probs"), np.float64)
    except (TypeError, ValueError):   # not a list of numbers
      probs = np.zeros(0)
    if probs.shape != (num_classes,) or not np.all(np.isfinite(probs)) or (probs < 0).any() \
        or probs.sum() <= 0:
      raise DataError(f"{where}: expected 'probs' to be {num_classes} non-negative numbers "
                      f"(config.model.num_classes), got {record.get('probs')!r}")
    targets[str(record.get("id"))] = (probs / probs.sum()).astype(np.float32)
  for split, examples in splits.items():
    missing = [e.id for e in examples if e.id not in targets]
    if missing:
      raise DataError(f"{path} ({key}) has no probabilities for {len(missing)} of the "
                      f"{len(examples)} {split} examples, e.g. id {missing[0]!r}; it needs one "
                      "{\"id\", \"probs\"} line per train and validation example (and "
                      "transfer text: config.distill.transfer_file)")
  return targets
