"""The one factory: a finished config -> model, task, optimizer, mesh, sharded abstract state and
the compiled train step. Training, the ahead-of-time check, the step-time benchmark and the tests
all build through `build`, so they run the same program.

Before building, `resolve` finishes the config, validates it and freezes it, in that order:
  finish    adopt what other runs decide: a pre-trained run's architecture and vocabulary
            (`train.init_from`), a teacher's vocabulary and architecture (`distill.teacher`,
            recorded as `distill.teacher_model`), and `train.num_epochs` -> `train.num_steps`
            from the number of training examples;
  validate  train/config_check.py, on the finished values;
  freeze    a FrozenConfigDict: what was validated is what runs (and what is saved).
"""
import dataclasses

import jax
import ml_collections
from absl import logging

from configs import model_schema
from infer import loading
from infer import lora_weights
from model import sharding as sharding_lib
from model.config import ModelConfig
from model.task_kind import task_kind
from model.transformer import Transformer
from train import config_check, optim, tasks
from train.tasks import pretrain
from train import state as state_lib
from train import step as step_lib
from train.config_check import ConfigError
from train.data import examples as examples_lib

# What a fine-tuning run takes from its init_from run (besides data.vocab_size): every model key
# declared as architecture in configs/model_schema.py (not dtype, remat, scan_layers,
# dropout_rate, num_classes, pooling; attention.* by its kind, in `finish`).
ARCHITECTURE_KEYS = model_schema.ARCHITECTURE_KEYS


def is_finetuning(config) -> bool:
  return task_kind(config) in ("classify", "summarize")


@dataclasses.dataclass
class Sources:
  """The other runs and data a resolved config was finished from."""
  pretrained: loading.Run | None = None   # train.init_from
  teachers: list = dataclasses.field(default_factory=list)   # distill.teacher (loading.Run)
  splits: dict | None = None              # fine-tuning examples {split: [Example]}
  transfer: list = dataclasses.field(default_factory=list)  # distill.transfer_file's texts
  model_cfg: ModelConfig | None = None    # the finished config.model, validated (built once)


def _open(path: str, key: str, prefer_best: bool = False) -> loading.Run:
  try:
    run = loading.open_run(path, prefer_best=prefer_best, what=f"config.{key}")
  except loading.LoadError as e:
    raise ConfigError(str(e)) from None
  if run.quantization != "none":
    raise ConfigError(f"config.{key}={path} is a quantized ({run.quantization}) run; train "
                      "from the float run it was made from")
  logging.info("config.%s: %s step %d (%.2fM params)", key, run.workdir, run.step,
               run.meta.get("params", 0) / 1e6)
  return run


def teacher_workdirs(config) -> list[str]:
  """distill.teacher's runs: one workdir, or several (an ensemble) separated by commas."""
  return loading.split_workdirs(config.distill.teacher)


# What the teachers of one distillation must share: they run as one stacked model.
_TEACHER_KEYS = ARCHITECTURE_KEYS + ("num_classes", "pooling", "attention")


def _check_same_teacher(first: loading.Run, other: loading.Run):
  """`other` computes with `first`'s architecture and tokenizer, or a ConfigError naming both."""
  a, b = first.meta["config"]["model"], other.meta["config"]["model"]
  differ = [f"{k} {a[k]!r} vs {b[k]!r}" for k in _TEACHER_KEYS if a[k] != b[k]]
  if differ:
    raise ConfigError(f"config.distill.teacher: {other.workdir} and {first.workdir} differ in "
                      f"{'; '.join(differ)}; an ensemble of teachers shares one architecture")
  if _tokenizer_fingerprint(first) != _tokenizer_fingerprint(other):
    raise ConfigError(f"config.distill.teacher: {other.workdir}'s tokenizer "
                      f"{other.meta['tokenizer_path']} differs from {first.workdir}'s "
                      f"{first.meta['tokenizer_path']}; the teachers must read the same tokens")


def _tokenizer_fingerprint(run: loading.Run) -> str:
  try:
    return run.tokenizer().fingerprint
  except loading.LoadError as e:
    raise ConfigError(f"config.distill.teacher: {e}") from None


def _adopt(config, key: str, value, changed: list):
  *sections, name = key.split(".")
  node = config
  for section in sections:
    node = node[section]
  if node[name] != value:
    changed.append(f"{key}: {node[name]} -> {value}")
    node[name] = value


def finish(config) -> tuple[ml_collections.ConfigDict, Sources]:
  """A finished copy of `config` (see the module docstring) and what it was finished from."""
  config = ml_collections.ConfigDict(config.to_dict())
  sources, changed = Sources(), []
  if config.task == "distill":
    workdirs = teacher_workdirs(config)
    if not workdirs:
      raise ConfigError("config.task='distill' needs config.distill.teacher (a run's workdir, "
                        "or several separated by commas)")
    sources.teachers = [_open(w, "distill.teacher", prefer_best=True) for w in workdirs]
    for run in sources.teachers[1:]:
      _check_same_teacher(sources.teachers[0], run)
    teacher_config = sources.teachers[0].meta["config"]
    _adopt(config, "data.vocab_size", teacher_config["data"]["vocab_size"], changed)
    config.distill.teacher_model = ml_collections.ConfigDict(teacher_config["model"])
  if is_finetuning(config) and config.train.init_from:
    sources.pretrained = _open(config.train.init_from, "train.init_from")
    source = sources.pretrained.meta["config"]
    for key in ARCHITECTURE_KEYS:
      _adopt(config, f"model.{key}", source["model"][key], changed)
    if not source["model"]["causal"]:
      # An encoder's classifier reads the state its pre-training trained for it ([CLS] / <s>).
      _adopt(config, "model.pooling", source["model"]["pooling"], changed)
    attention = source["model"]["attention"]
    if attention["kind"] == "local":
      # A sliding window (Mistral's) is part of what the model computes; full and blocked are
      # the same attention, so the fine-tuning config's choice between them stands.
      for key in ("kind", "window", "num_global"):
        _adopt(config, f"model.attention.{key}", attention[key], changed)
    _adopt(config, "data.vocab_size", source["data"]["vocab_size"], changed)
  if changed:
    logging.info("taken from the runs this one starts from: %s", ", ".join(changed))
  if is_finetuning(config):
    sources.splits = examples_lib.load_splits(config.data, task_kind(config),
                                              config.model.num_classes)
    if (config.task == "distill" and config.distill.task == "classify"
        and config.distill.transfer_file):   # config_check rejects it elsewhere
      sources.transfer = examples_lib.load_transfer(config.distill.transfer_file, config.data,
                                                    sources.splits)
      logging.info("transfer set: %d unlabelled texts beside %d train examples",
                   len(sources.transfer), len(sources.splits["train"]))
    if config.train.num_epochs > 0:   # an epoch: every train example and transfer text once
      rows = len(sources.splits["train"]) + len(sources.transfer)
      epoch = -(-rows // config.data.batch_size)
      config.train.num_steps = max(1, round(config.train.num_epochs * epoch))
      config.train.eval_every = epoch
      logging.info("%g epochs of %d steps: num_steps=%d, validation every epoch",
                   config.train.num_epochs, epoch, config.train.num_steps)
  return config, sources


def resolve(config, num_devices: int | None = None, process_count: int | None = None):
  """(frozen finished config, Sources): finish, then validate, then freeze."""
  config, sources = finish(config)
  sources.model_cfg = config_check.validate(config, num_devices or jax.device_count(),
                                            process_count or jax.process_count())
  return ml_collections.FrozenConfigDict(config), sources


def make_task(config, model, num_devices: int = 1):
  """The task for `config` on `model` (trained on `num_devices`); distillation wraps the
  student's own task around the teacher recorded in distill.teacher_model. Tasks get the
  sub-configs they use."""
  task_cls = tasks.get_task(task_kind(config))
  d = config.data
  loss_chunk = (pretrain.auto_loss_chunk(d.batch_size // config.optim.grad_accum_steps,
                                         d.seq_len, d.vocab_size, num_devices)
                if config.optim.loss_chunk == -1 else config.optim.loss_chunk)
  base = task_cls(model, z_loss=config.optim.z_loss, loss_chunk=loss_chunk)
  if config.task != "distill":
    return base
  from train.tasks import distill
  if not config.distill.get("teacher_model"):
    raise ConfigError("config.distill.teacher_model is unset: resolve the config (it is read "
                      "from the run config.distill.teacher names)")
  teacher_cfg = ModelConfig.from_config(config.distill.teacher_model, config.data.vocab_size)
  return distill.DistillTask(base, teacher_cfg, config.distill,
                             num_teachers=max(1, len(teacher_workdirs(config))))


@dataclasses.dataclass
class Parts:
  """What `build` returns: everything a train step needs, nothing allocated yet."""
  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  model: Transformer                 # the trained model (the student when distilling; with
                                     # train.lora, the Transformer wrapped with adapters)
  task: object
  tx: object
  schedule: object
  mesh: jax.sharding.Mesh
  abstract: state_lib.TrainState     # unboxed ShapeDtypeStructs
  shardings: state_lib.TrainState    # NamedShardings of the same tree
  trainable: object = None           # None (all) or a predicate on flat param paths (LoRA)

  @property
  def distilling(self) -> bool:
    return self.config.task == "distill"

  def eval_params(self, params):
    """The evaluated model's parameters in the train state's."""
    return params["student"] if self.distilling else params

  def dummy_batch(self, batch_size: int | None = None, seq_len: int | None = None) -> dict:
    return self.task.dummy_batch(batch_size or self.config.data.batch_size,
                                 seq_len or self.config.data.seq_len)

  def abstract_target(self):
    """ShapeDtypeStructs with shardings: what a checkpoint restores into."""
    return state_lib.abstract_with_shardings(self.abstract, self.shardings)

  def init_state(self, seed: int | None = None):
    """A fresh state, created directly into its shardings."""
    state, _, _ = state_lib.create_state(self.task.model, self.tx, self.dummy_batch(1),
                                         self.mesh, self.config.seed if seed is None else seed)
    return state

  def compile_train_step(self, batch: dict | None = None):
    """The sharded, donating train step, compiled for `batch`'s shapes (default: the config's
    batch_size x seq_len)."""
    return step_lib.compile_train_step(
        self.task, self.tx, self.schedule, self.config.optim.grad_accum_steps, self.mesh,
        self.abstract, self.shardings, batch or self.dummy_batch(),
        skip_nonfinite=self.config.train.nonfinite == "skip", trainable=self.trainable,
        cpu_dot_library=self.config.train.xla_cpu_dot_library,
        compute_dtype=self.config.model.dtype)

  def param_count(self) -> int:
    return state_lib.param_count(self.eval_params(self.abstract.params))


def build(config, mesh: jax.sharding.Mesh | None = None,
          model_cfg: ModelConfig | None = None) -> Parts:
  """Model -> task -> optimizer -> mesh -> abstract sharded state for a resolved config;
  model_cfg: its ModelConfig when the caller has it (Sources.model_cfg from `resolve`)."""
  model_cfg = model_cfg or ModelConfig.from_config(config.model, config.data.vocab_size)
  lora = lora_weights.LoraSpec.from_config(config.train.lora)
  # LoRA: the model trained (and evaluated during the run) is the adapter-wrapped Transformer;
  # only the adapters and the task head are differentiated and carry optimizer state.
  model, trainable = Transformer(model_cfg), None
  if lora is not None:
    from train import lora as lora_lib   # qwix takes ~0.8 s to import: only LoRA runs need it
    model, trainable = lora_lib.lora_model(model_cfg, lora), lora_lib.is_trained
  mesh = mesh or sharding_lib.make_mesh(config.mesh)
  task = make_task(config, model, mesh.size)
  tx, schedule = optim.make_optimizer(config.optim, config.train.num_steps,
                                     frozen=("teacher",) if config.task == "distill" else (),
                                     trainable=trainable)
  abstract, shardings = state_lib.state_shardings(task.model, tx, task.dummy_batch(
      1, config.data.seq_len), mesh)
  return Parts(config, model_cfg, model, task, tx, schedule, mesh, abstract, shardings,
               trainable)
