"""What fine-tuning adds to a run: a pre-trained starting point and JSONL example data.

`config.train.init_from` names a pre-training run (its workdir, or its checkpoints folder). The
fine-tuning run then takes that run's architecture (`ARCHITECTURE_KEYS` of config.model and
data.vocab_size) and tokenizer, so a fine-tuning config only states what fine-tuning changes
(head, dropout, data, schedule); the restored backbone replaces the fresh parameters wherever
the trees match and the new parts (the classifier head) keep their initialisation.
Without init_from the run is "from scratch": a tokenizer is trained on the train examples.
"""
import dataclasses
import os

import flax.linen as nn
import jax
import ml_collections
from absl import logging

from model import sharding as sharding_lib
from model.config import ModelConfig
from model.transformer import Transformer
from model import checkpoint as checkpoint_lib
from train import state as state_lib
from train.config_check import ConfigError
from train.data import examples as examples_lib
from model import tokenizer as tokenizer_lib
from train.data import tokenizer_training

ARCHITECTURE_KEYS = ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                     "mlp_activation", "positions", "rope_theta", "max_len", "tie_embeddings")


@dataclasses.dataclass
class Pretrained:
  """A finished run to start from (or learn from): its checkpoint step and metadata."""
  checkpointer: checkpoint_lib.Checkpointer
  step: int
  meta: dict

  def model_config(self, **changes) -> ModelConfig:
    source = ml_collections.ConfigDict(self.meta["config"])
    cfg = ModelConfig.from_config(source.model, source.data.vocab_size)
    return dataclasses.replace(cfg, **changes)


def find_run(path: str, key: str, prefer_best: bool = False) -> Pretrained:
  """The newest checkpoint of the run at `path` (a workdir or its checkpoints folder); with
  prefer_best, its best-validation state when it kept one. `key` names the config key."""
  found = checkpoint_lib.find_finished(path, prefer_best)
  if found is not None:
    checkpointer, step = found
    meta = checkpointer.restore_meta(step)
    logging.info("%s: %s step %d (%.2fM params)", key,
                 os.path.dirname(checkpointer.directory), step, meta.get("params", 0) / 1e6)
    return Pretrained(checkpointer, step, meta)
  raise ConfigError(f"{key}={path}: no checkpoints/ folder with a finished checkpoint there; "
                    "expected the workdir of a finished run")


def open_pretrained(config) -> Pretrained | None:
  """init_from's newest checkpoint; adopts its architecture and vocabulary into `config`."""
  if not config.train.init_from:
    return None
  pretrained = find_run(config.train.init_from, "config.train.init_from")
  source = pretrained.meta["config"]
  changed = []
  for key in ARCHITECTURE_KEYS:
    if config.model[key] != source["model"][key]:
      changed.append(f"model.{key}: {config.model[key]} -> {source['model'][key]}")
      config.model[key] = source["model"][key]
  _adopt_vocab(config, pretrained, changed)
  if changed:
    logging.info("architecture taken from the pre-trained run: %s", ", ".join(changed))
  return pretrained


def open_teacher(config) -> Pretrained:
  """The distillation teacher (its best state if kept); the student adopts its vocabulary."""
  if not config.distill.teacher:
    raise ConfigError("config.task='distill' needs config.distill.teacher (a run's workdir)")
  teacher = find_run(config.distill.teacher, "config.distill.teacher", prefer_best=True)
  _adopt_vocab(config, teacher, [])
  return teacher


def _adopt_vocab(config, run: Pretrained, changed: list):
  vocab = run.meta["config"]["data"]["vocab_size"]
  if config.data.vocab_size != vocab:
    changed.append(f"data.vocab_size: {config.data.vocab_size} -> {vocab}")
    config.data.vocab_size = vocab


def restore_model_params(run: Pretrained, model, mesh):
  """The parameters `model` has, from `run`'s checkpoint, in their logical shardings."""
  tokens = jax.numpy.zeros((1, 8), jax.numpy.int32)
  boxed = jax.eval_shape(lambda r: model.init(r, tokens), jax.random.PRNGKey(0))
  abstract = state_lib.abstract_with_shardings(
      nn.meta.unbox(boxed["params"]),
      sharding_lib.logical_sharding(nn.get_partition_spec(boxed["params"]), mesh))
  return run.checkpointer.restore_params(run.step, abstract)


def load_backbone(pretrained: Pretrained, state, mesh):
  """`state` with every parameter the pre-trained model also has replaced by its value."""
  restored = restore_model_params(pretrained, Transformer(pretrained.model_config()), mesh)
  params = dict(state.params)
  new = sorted(set(params) - set(restored))
  unused = sorted(set(restored) - set(params))
  for key in set(params) & set(restored):
    params[key] = jax.tree.map(lambda r, s: jax.device_put(r, s.sharding), restored[key],
                               params[key])
  logging.info("restored %d pre-trained parameter groups; newly initialised: %s; unused: %s",
               len(set(params) & set(restored)), new or "none", unused or "none")
  return state.replace(params=params)


def teacher_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
  """The teacher block each student block starts from: evenly spaced, first and last kept (the
  last feeds the head the student also inherits)."""
  if student_layers == 1:
    return [teacher_layers - 1]
  return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def init_student_from_teacher(state, student_layers: int, teacher_layers: int):
  """`state` with the student's parameters copied from the (restored) teacher's: every group
  but the blocks by name, block i from teacher block teacher_layer_map()[i]. Shapes must match:
  the student may be shallower than the teacher, not narrower."""
  student, teacher = state.params["student"], state.params["teacher"]
  layer_map = teacher_layer_map(student_layers, teacher_layers)
  source = {name: (f"block_{layer_map[int(name[6:])]}" if name.startswith("block_") else name)
            for name in student}
  copied = {}
  for name, origin in source.items():
    if origin not in teacher:
      raise ConfigError(f"config.distill.init_student='teacher_layers': the teacher has no "
                        f"parameter group {origin!r} for the student's {name!r}")
    for (path, s), t in zip(jax.tree_util.tree_leaves_with_path(student[name]),
                            jax.tree.leaves(teacher[origin])):
      if s.shape != t.shape:
        raise ConfigError(
            f"config.distill.init_student='teacher_layers' needs the teacher's width: student "
            f"{name}{jax.tree_util.keystr(path)} is {s.shape}, the teacher's is {t.shape}")
    # Copies (may_alias=False): the train step donates the student's buffers, never the
    # teacher's, so the two must not share one.
    copied[name] = jax.tree.map(lambda t, s: jax.device_put(t, s.sharding, may_alias=False),
                                teacher[origin], student[name])
  logging.info("student initialised from the teacher: blocks %s", layer_map)
  return state.replace(params={**state.params, "student": copied})


def load_data(config, task: str, pretrained: Pretrained | None, resumed_meta: dict | None):
  """(tokenizer, {split: [Example]}, {split: [row]}) for a classify/summarize run; the
  tokenizer of the run it resumes, else of `pretrained` (or teacher), else trained here."""
  splits = examples_lib.load_splits(config.data, task, config.model.num_classes)
  if resumed_meta and resumed_meta.get("tokenizer_path"):
    tokenizer = tokenizer_lib.load_tokenizer(resumed_meta["tokenizer_path"])
  elif pretrained is not None:
    tokenizer = tokenizer_lib.load_tokenizer(pretrained.meta["tokenizer_path"])
  else:
    tokenizer = tokenizer_training.train_tokenizer(
        config.data, examples_lib.TextSource(splits["train"], task),
        examples_lib.fingerprint(config.data))
  if tokenizer.vocab_size > config.data.vocab_size:
    raise ConfigError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces, more than "
                      f"config.data.vocab_size={config.data.vocab_size}")
  rows = {name: [examples_lib.encode(e, tokenizer, task, config.data) for e in exs]
          for name, exs in splits.items()}
  logging.info("examples: %s (%s)", {k: len(v) for k, v in splits.items()}, task)
  return tokenizer, splits, rows
