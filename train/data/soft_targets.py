"""An offline teacher for distilling a classifier: class probabilities for each train and
validation example (and each unlabelled text of distill.transfer_file), made before training
instead of by a network inside the step.

`distill.offline_teacher` names a JSONL file of one {"id", "probs"} per example (e.g. another
framework's model; a run's test_predictions.jsonl and infer.main's output have this shape),
covering every train, validation and transfer id.
train/tasks/distill.py mixes these probabilities into the networks' (`distill.offline_weight`).
"""
import numpy as np

from model.errors import DataError
from train.data import sources as sources_lib

SPLITS = ("train", "validation")


def load(distill_cfg, splits: dict, num_classes: int,
         transfer: list | None = None) -> dict[str, np.ndarray]:
  """{example id: float32 [num_classes] probabilities} for every train and validation example
  and every unlabelled text of the transfer set (distill.transfer_file)."""
  covered = {**{split: splits[split] for split in SPLITS}, "transfer": transfer or []}
  return _read(distill_cfg.offline_teacher, covered, num_classes)


def _read(path: str, splits: dict, num_classes: int) -> dict[str, np.ndarray]:
  key = "distill.offline_teacher"   # records() names it as config.<key>
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
      raise DataError(f"{path} (config.{key}) has no probabilities for {len(missing)} of the "
                      f"{len(examples)} {split} examples, e.g. id {missing[0]!r}; it needs one "
                      "{\"id\", \"probs\"} line per train and validation example (and "
                      "transfer text: config.distill.transfer_file)")
  return targets
