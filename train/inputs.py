"""A run's inputs, one function per kind of data: the tokenizer, the train iterator and a
factory of validation iterators. Pre-training reads the packed corpus (train/data/pipeline.py);
fine-tuning (and distilling a classifier or summarizer) reads JSONL examples
(train/data/examples.py). The loop sees the same `Inputs` either way.
"""
import dataclasses
import itertools
import os
from typing import Callable, Iterator

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from model import tokenizer as tokenizer_lib
from model.task_kind import task_kind
from train import build
from train.config_check import ConfigError
from train.data import examples as examples_lib
from train.data import pipeline
from train.data import soft_targets
from train.data import tokenizer_training


@dataclasses.dataclass
class Inputs:
  tokenizer: tokenizer_lib.Tokenizer
  train_iter: Iterator                  # process-local numpy batches; get_state / set_state
  make_eval_iter: Callable[[], Iterator]
  source: str                           # what the run trained on, for its record
  splits: dict | None = None            # fine-tuning: {split: [Example]}
  rows: dict | None = None              # fine-tuning: {split: [encoded row]}


def make(config, sources: build.Sources, resumed_meta: dict | None) -> Inputs:
  pi, pc = jax.process_index(), jax.process_count()
  if build.is_finetuning(config):
    inputs = _finetune(config, sources, resumed_meta, pi, pc)
  else:
    teacher_meta = sources.teachers[0].meta if sources.teachers else None
    inputs = _pretrain(config, resumed_meta or teacher_meta, pi, pc)
  # The embedding is sized by config (shardable, stable across corpora); a tokenizer trained on
  # a small corpus may have fewer pieces, never more.
  if inputs.tokenizer.vocab_size > config.data.vocab_size:
    raise ConfigError(f"tokenizer {inputs.tokenizer.path} has {inputs.tokenizer.vocab_size} "
                      f"pieces, more than config.data.vocab_size={config.data.vocab_size}")
  return inputs


def _corpus(config, run_meta):
  """(tokenizer, dataset). Process 0 builds what is missing; the others wait, then read. A
  resumed run (or a distilled student) keeps the tokenizer recorded with `run_meta`."""
  if jax.process_index() == 0:
    tokenizer, dataset = pipeline.prepare(config.data)
  multihost_utils.sync_global_devices("data prepared")
  if jax.process_index() != 0:
    tokenizer, dataset = pipeline.prepare(config.data)
  if run_meta:
    saved = run_meta.get("tokenizer_path")
    if saved and os.path.exists(saved):
      tokenizer = tokenizer_lib.load_tokenizer(saved)
    if run_meta.get("vocab_size") != tokenizer.vocab_size:
      raise ConfigError(
          f"the checkpoint was trained with vocab_size={run_meta.get('vocab_size')} "
          f"(tokenizer {saved}) but the tokenizer now has {tokenizer.vocab_size}; use the "
          "original config.data or a new --workdir")
  return tokenizer, dataset


def _pretrain(config, run_meta, pi: int, pc: int) -> Inputs:
  tokenizer, dataset = _corpus(config, run_meta)
  train_iter = pipeline.make_lm_iterator(config.data, tokenizer, "train", process_index=pi,
                                         process_count=pc, shuffle=True, repeat=True,
                                         seed=config.seed, dataset=dataset)

  def make_eval_iter():
    # Repeating, unshuffled: every process yields exactly eval_batches batches, the same ones
    # at every evaluation.
    it = pipeline.make_lm_iterator(config.data, tokenizer, "validation", process_index=pi,
                                   process_count=pc, shuffle=False, repeat=True, seed=0,
                                   dataset=dataset)
    return itertools.islice(it, config.train.eval_batches)
  return Inputs(tokenizer, train_iter, make_eval_iter, dataset.dir)


def _finetune_tokenizer(config, sources: build.Sources, resumed_meta):
  """The tokenizer of the run this one resumes, else of init_from (or the teacher), else one
  trained here on the train examples ("from scratch")."""
  origin = sources.pretrained or (sources.teachers[0] if sources.teachers else None)
  if resumed_meta and resumed_meta.get("tokenizer_path"):
    return tokenizer_lib.load_tokenizer(resumed_meta["tokenizer_path"])
  if origin is not None:
    return origin.tokenizer()
  return tokenizer_training.train_tokenizer(
      config.data, examples_lib.TextSource(sources.splits["train"], task_kind(config)),
      examples_lib.fingerprint(config.data))


def _finetune(config, sources: build.Sources, resumed_meta, pi: int, pc: int) -> Inputs:
  kind = task_kind(config)
  tokenizer = _finetune_tokenizer(config, sources, resumed_meta)
  splits = sources.splits
  rows = {name: [examples_lib.encode(e, tokenizer, kind, config.data) for e in exs]
          for name, exs in splits.items()}
  # What the train iterator draws from: the train rows, then distill.transfer_file's
  # unlabelled texts.
  transfer = [examples_lib.encode(e, tokenizer, kind, config.data) for e in sources.transfer]
  drawn = rows["train"] + transfer
  if config.task == "distill" and config.distill.offline_teacher:
    _add_offline_teacher(config, splits, sources.transfer, rows, drawn)
  logging.info("examples: %s (%s)", {k: len(v) for k, v in splits.items()}, kind)
  ident = {"data": examples_lib.fingerprint(config.data), "tokenizer": tokenizer.fingerprint,
           "max_examples": config.data.max_examples,
           **({"transfer": examples_lib.fingerprint(
               config.data, config.distill.transfer_file, "distill.transfer_file")}
              if sources.transfer else {})}
  train_iter = examples_lib.make_iterator(
      drawn, config.data, split="train", shuffle=True, repeat=True, seed=config.seed,
      process_index=pi, process_count=pc, identity=ident)
  # The whole validation split every time; processes with fewer rows pad with empty batches so
  # every process runs the same number of eval steps.
  num_batches = -(-len(rows["validation"]) // config.data.batch_size)
  blank = examples_lib.pad_batch(rows["validation"][:1], config.data.batch_size // pc)
  blank = {k: np.zeros_like(v) for k, v in blank.items()}

  def make_eval_iter():
    it = examples_lib.make_iterator(rows["validation"], config.data, split="validation",
                                    shuffle=False, repeat=False, seed=0, process_index=pi,
                                    process_count=pc, identity=ident)
    return itertools.islice(itertools.chain(it, itertools.repeat(blank)), num_batches)
  return Inputs(tokenizer, train_iter, make_eval_iter, config.data.train_file, splits, rows)


def _add_offline_teacher(config, splits, transfer, rows, drawn):
  """Every row the train iterator draws (`drawn`: the train examples', then the transfer
  texts') and each validation row gets its example's offline-teacher probabilities as
  `teacher_probs` (train/data/soft_targets.py; train/tasks/distill.py)."""
  targets = soft_targets.load(config.distill, splits, config.model.num_classes, transfer)
  for example, row in zip(splits["train"] + transfer, drawn):
    row["teacher_probs"] = targets[example.id]
  for example, row in zip(splits["validation"], rows["validation"]):
    row["teacher_probs"] = targets[example.id]
