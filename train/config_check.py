"""Checks a run's config once, up front, so mistakes fail in seconds with the key's name."""
import math
import os

from model import errors
from model import sharding as sharding_lib
from model.config import ModelConfig
from model.task_kind import task_kind


class ConfigError(errors.UserError):
  """A config value that cannot work; the message names the key and what was expected."""


def validate(config, num_devices: int, process_count: int) -> ModelConfig:
  """Raises ConfigError naming the key and what was expected; returns the validated
  ModelConfig of config.model (the one a run builds its model from)."""
  mesh, model_cfg = _mesh_of_buildable(config, num_devices)
  checks = _size_checks(config, mesh, process_count) + _setting_checks(config)
  for ok, message in checks:
    if not ok:
      raise ConfigError(message)
  if not math.isfinite(config.optim.lr) or config.optim.lr <= 0:
    raise ConfigError(f"config.optim.lr={config.optim.lr} must be a positive number")
  _check_lora(config, model_cfg)
  check_decode(config)
  return model_cfg


def _mesh_of_buildable(config, num_devices: int) -> tuple[dict, ModelConfig]:
  """The mesh's axis sizes and the ModelConfig, once the task, model, schedule and mesh build
  (their ValueErrors become ConfigErrors)."""
  from train import optim, tasks   # here, not at import time: tasks import the model stack
  try:
    tasks.get_task(config.task)
    model_cfg = ModelConfig.from_config(config.model, config.data.vocab_size)
    optim.make_schedule(config.optim, max(config.train.num_steps, 1))
    mesh = dict(zip(sharding_lib.MESH_AXES, sharding_lib.mesh_shape(config.mesh, num_devices)))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return mesh, model_cfg


def _size_checks(config, mesh: dict, process_count: int) -> list:
  """(ok, message) pairs on sizes: sequence, vocabulary, batch over processes and mesh,
  positions, steps and intervals."""
  d, t = config.data, config.train
  accum = config.optim.grad_accum_steps
  batch_shards = mesh["data"] * mesh["fsdp"]
  checks = [
      (d.seq_len >= 2, f"config.data.seq_len={d.seq_len} must be at least 2"),
      (d.vocab_size >= 256, f"config.data.vocab_size={d.vocab_size} must be >= 256 "
                            "(sentencepiece byte fallback needs 256 byte pieces)"),
      (accum >= 1, f"config.optim.grad_accum_steps={accum} must be >= 1"),
      (config.optim.loss_chunk >= -1, f"config.optim.loss_chunk={config.optim.loss_chunk} must "
                                      "be -1 (auto), 0 (plain) or a number of rows"),
      (d.batch_size % process_count == 0,
       f"config.data.batch_size={d.batch_size} must be divisible by the {process_count} processes"),
      (d.batch_size % accum == 0 and (d.batch_size // accum) % batch_shards == 0,
       f"config.data.batch_size={d.batch_size} / grad_accum_steps={accum} must be divisible by "
       f"mesh data x fsdp = {batch_shards}"),
      (config.model.positions != "learned" or
       d.seq_len <= config.model.max_len - config.model.position_offset,
       f"config.data.seq_len={d.seq_len} exceeds config.model.max_len={config.model.max_len} "
       f"- position_offset={config.model.position_offset} (learned positions)"),
      (config.model.causal or task_kind(config) == "classify",
       f"config.model.causal=False (a bidirectional encoder) trains only a classifier (task "
       f"classify, or distill with distill.task=classify), not {task_kind(config)!r}"),
      (not (config.train.init_from and config.task == "distill"
            and config.distill.init_student == "teacher_layers"),
       "config.train.init_from and config.distill.init_student='teacher_layers' both start the "
       "student; set one"),
      (0 <= d.validation_fraction < 1,
       f"config.data.validation_fraction={d.validation_fraction} must be in [0, 1)"),
      (t.num_steps >= 1, f"config.train.num_steps={t.num_steps} must be >= 1"),
      _context_check(config, mesh["context"]),
  ]
  for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    checks.append((t[key] >= 1, f"config.train.{key}={t[key]} must be >= 1"))
  return checks


def _context_check(config, context: int) -> tuple:
  """Each of the `context` devices holds an equal part of the sequence; causal attention
  without a window cuts it into 2 x context chunks (model/attention/context_parallel.py)."""
  seq_len = config.data.seq_len
  zigzag = config.model.causal and config.model.attention.kind != "local"
  parts = 2 * context if zigzag else context
  return (context == 1 or seq_len % parts == 0,
          f"config.data.seq_len={seq_len} must be divisible by "
          f"{'2 x ' if zigzag else ''}config.mesh.context={context} = {parts}"
          f"{' (the zig-zag layout of causal attention)' if zigzag else ''}")


def _setting_checks(config) -> list:
  """(ok, message) pairs on choices and the settings that belong to some tasks only."""
  d, t = config.data, config.train
  select_by = t.select_by
  gaps = d.gap_sentences
  return [
      (config.train.nonfinite in ("stop", "skip"),
       f"config.train.nonfinite={config.train.nonfinite!r}; expected 'stop' or 'skip'"),
      (d.bad_lines in ("fail", "skip"),
       f"config.data.bad_lines={d.bad_lines!r}; expected 'fail' or 'skip'"),
      (d.truncation in ("head", "head_tail"),
       f"config.data.truncation={d.truncation!r}; expected 'head' or 'head_tail'"),
      (config.task != "classify" or config.model.num_classes >= 2,
       f"config.task='classify' needs config.model.num_classes >= 2 (got "
       f"{config.model.num_classes})"),
      (0 <= config.eval.window_stride <= d.seq_len - 2,
       f"config.eval.window_stride={config.eval.window_stride}: expected 0 (off) .. "
       f"data.seq_len - 2 = {d.seq_len - 2} (a row's text ids)"),
      (0 <= gaps["ratio"] < 1 and gaps["passage_words"] >= 1,
       f"config.data.gap_sentences: ratio={gaps['ratio']} must be in [0, 1) and passage_words="
       f"{gaps['passage_words']} >= 1"),
      (not gaps["ratio"] or config.task == "summarize",
       f"config.data.gap_sentences.ratio={gaps['ratio']} makes pseudo-summaries for a summarizer "
       f"(task summarize), not task {config.task!r}; set it to 0"),
      (config.task != "summarize" or 1 <= d.target_len < d.seq_len - 2,
       f"config.data.target_len={d.target_len} must be in [1, seq_len - 2 = {d.seq_len - 2})"),
      (config.distill.init_student in ("none", "teacher_layers"),
       f"config.distill.init_student={config.distill.init_student!r}; expected 'none' or "
       "'teacher_layers'"),
      (not config.distill.offline_teacher or (config.task == "distill"
                                                     and config.distill.task == "classify"),
       f"config.distill.offline_teacher={config.distill.offline_teacher!r} teaches a "
       "classifier (task distill with distill.task=classify); set it to ''"),
      (not config.distill.offline_teacher
       or os.path.isfile(os.path.expanduser(config.distill.offline_teacher)),
       f"config.distill.offline_teacher={config.distill.offline_teacher!r}: no such "
       "file; expected a JSONL file of {\"id\", \"probs\"} lines (or '' for none)"),
      (not config.distill.transfer_file or (config.task == "distill"
                                                   and config.distill.task == "classify"),
       f"config.distill.transfer_file={config.distill.transfer_file!r} holds unlabelled "
       "texts for a classifier's student (task distill with distill.task=classify); set it "
       "to ''"),
      (0 < config.distill.offline_weight <= 1,
       f"config.distill.offline_weight={config.distill.offline_weight} must be in (0, 1]"),
      (config.train.early_stopping >= 0,
       f"config.train.early_stopping={config.train.early_stopping} must be >= 0"),
      (select_by == "loss" or (select_by.count("/") == 1 and
                               select_by.split("/")[0] in config.eval.evaluators),
       f"config.train.select_by={select_by!r}; expected 'loss' or "
       f"'<evaluator>/<metric>' with an evaluator of config.eval.evaluators "
       f"{tuple(config.eval.evaluators)}, e.g. 'rouge/rougeL'"),
  ]


def _check_lora(config, model_cfg: ModelConfig):
  """train.lora: adapters on a pre-trained model being fine-tuned, on projections it has."""
  from train import lora   # here, not at import time: it imports the model stack and qwix
  lora_cfg = config.train.lora
  if lora_cfg.rank == 0:
    return
  if config.model.scan_layers:
    raise ConfigError("config.train.lora with config.model.scan_layers=True: the adapters target "
                      "per-layer projections (block_N/...); set config.model.scan_layers=False "
                      "(a scanned checkpoint still loads: its layers are unstacked)")
  if config.task not in ("classify", "summarize"):
    raise ConfigError(f"config.train.lora.rank={lora_cfg.rank}: LoRA fine-tunes a classifier or "
                      f"summarizer from a pre-trained run, not a {config.task!r} run")
  if not config.train.init_from:
    raise ConfigError(f"config.train.lora.rank={lora_cfg.rank} needs config.train.init_from (the "
                      "pre-trained run whose weights LoRA freezes)")
  try:
    lora.check(lora.LoraSpec(lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout, lora_cfg.targets),
               model_cfg)
  except lora.LoraConfigError as e:
    raise ConfigError(str(e)) from None


def check_decode(config):
  """eval.decode: how summaries are decoded at validation and test (configs/common.py)."""
  cfg = config.eval.decode
  cap = config.eval.decode_len
  ratio = cfg.length_ratio
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  checks = [
      (cfg.beam == 0 or cfg.beam >= 2, f"config.eval.decode.beam={cfg.beam}: expected 0 (greedy) "
                                       "or >= 2 beams"),
      (number(cfg.length_penalty), f"config.eval.decode.length_penalty={cfg.length_penalty} must "
                                   "be a finite number"),
      (cfg.beam >= 2 or cfg.length_penalty == 1.0,
       f"config.eval.decode.length_penalty={cfg.length_penalty} applies to beam search only: set "
       "config.eval.decode.beam >= 2"),
      (0 <= cfg.no_repeat_ngram_size <= cap,
       f"config.eval.decode.no_repeat_ngram_size={cfg.no_repeat_ngram_size}: expected 0 (off) .. "
       f"eval.decode_len={cap}"),
      (number(cfg.repetition_penalty) and cfg.repetition_penalty > 0,
       f"config.eval.decode.repetition_penalty={cfg.repetition_penalty} must be > 0 (1: off)"),
      (0 <= cfg.min_new <= cap,
       f"config.eval.decode.min_new={cfg.min_new}: expected 0..eval.decode_len={cap}"),
      (ratio == "train" or (number(ratio) and ratio >= 0),
       f"config.eval.decode.length_ratio={ratio!r}: expected 0 (off), a positive number (summary "
       "tokens per document token) or 'train' (learned on the train split)"),
      (cfg.samples or (cfg.temperature == 1.0 and cfg.top_p == 1.0 and not cfg.source_weight),
       "config.eval.decode.temperature, top_p and source_weight apply to MBR sampling only: "
       "set config.eval.decode.samples > 0"),
  ]
  # MBR's settings, by the check LoadedModel.summarize applies.
  from infer import rerank   # as for LoRA: the decoder lives below train/
  try:
    rerank.Sampling(cfg.samples, cfg.temperature, cfg.top_p, source_weight=cfg.source_weight)
  except ValueError as e:
    raise ConfigError(f"config.eval.decode.{e}") from None
  for ok, message in checks:
    if not ok:
      raise ConfigError(message)
