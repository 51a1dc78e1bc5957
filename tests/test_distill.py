"""Distillation: a student learns from one frozen teacher or from an ensemble of them.

A tiny classifier trained here is the teacher (two of its checkpoints make an ensemble); the
loss of an ensemble is checked against a by-hand numpy computation of KL(mean of the teachers'
tempered probabilities || student) and of the mean relation target (per example for a
classifier, per summary token for a summarizer), and on a 2x2x2 mesh of the 8 fake devices
against one device.
"""
import dataclasses
import json
import re

import chex
import jax
import numpy as np
import pytest
import sentencepiece as spm

from configs import sentiment_distill, sentiment_finetune
from helpers import _sentiment_config, fine_tune_parts, losses
from infer import loading
from model import tokenizer as tokenizer_lib
from model.transformer import Transformer
from train import build, finetune
from train import run as run_lib
from train import state as state_lib
from train.config_check import ConfigError
from train.tasks import classify
from train.tasks.distill import DistillTask

pytestmark = pytest.mark.usefixtures("one_device")   # in-process runs on 1 of the 8 fake devices


@pytest.fixture(scope="module")
def teacher_run(sentiment_files, tmp_path_factory):
  """A tiny classifier trained from scratch (checkpoints 30 and 40 kept, and its best)."""
  root = tmp_path_factory.mktemp("teacher")
  config = _sentiment_config(sentiment_files, root / "cache", num_steps=40)
  run_lib.train(config, str(root / "run"))
  return root / "run"


def _student_config(sentiment_files, tmp_path, teacher: str):
  config = sentiment_distill.get_config("tiny")
  config.data.update(train_file=str(sentiment_files / "train.jsonl.gz"),
                     test_file=str(sentiment_files / "test.jsonl"), data_dir=str(tmp_path))
  config.distill.teacher = teacher
  return config


def _restored(workdir):
  """A run's parameters as the tiny teacher model holds them."""
  model, _, _, mesh = fine_tune_parts(sentiment_finetune.get_config("tiny"))
  return loading.restore_params(loading.open_run(str(workdir), prefer_best=True), model, mesh)


@pytest.mark.slow
def test_distilled_student_learns_from_frozen_teacher(sentiment_files, teacher_run, tmp_path):
  config = _student_config(sentiment_files, tmp_path, str(teacher_run))
  # One block of the teacher's width, started from its embedding, head and last block: the
  # train step must donate the student's copies while the teacher's stay intact.
  teacher_model = sentiment_finetune.get_config("tiny").model
  config.model.update({k: teacher_model[k] for k in build.ARCHITECTURE_KEYS}, num_layers=1)
  config.distill.init_student = "teacher_layers"
  config.train.update(num_steps=60, eval_every=20, checkpoint_every=20)
  result = run_lib.train(config, str(tmp_path / "student"))
  # The teacher's parameters are the teacher run's best state, untouched by 60 updates.
  chex.assert_trees_all_equal(result["state"].params["teacher"],   # one teacher, stacked
                              jax.tree.map(lambda x: x[None], _restored(teacher_run)))
  student = result["test"]["model: classification"]
  assert student["accuracy"] > 0.8, student
  # The report counts the student's parameters only.
  student_params = state_lib.param_count(result["state"].params["student"])
  assert f"parameters: {student_params}" in (tmp_path / "student" / "report.md").read_text()


@pytest.mark.slow
def test_an_ensemble_of_teachers_is_restored_in_order_and_teaches(sentiment_files, teacher_run,
                                                                  tmp_path):
  late, early = teacher_run / "checkpoints" / "40", teacher_run / "checkpoints" / "30"
  config = _student_config(sentiment_files, tmp_path, f"{late}, {early}")
  # One block started from the first teacher's (embedding, head, last block), as above.
  teacher_model = sentiment_finetune.get_config("tiny").model
  config.model.update({k: teacher_model[k] for k in build.ARCHITECTURE_KEYS}, num_layers=1)
  config.distill.init_student = "teacher_layers"
  config.train.update(num_steps=30, eval_every=15, checkpoint_every=30)
  result = run_lib.train(config, str(tmp_path / "student"))
  first, second = _restored(late), _restored(early)
  assert not np.allclose(first["cls_head"]["kernel"], second["cls_head"]["kernel"])
  chex.assert_trees_all_equal(result["state"].params["teacher"],
                              jax.tree.map(lambda a, b: np.stack([a, b]), first, second))
  student = result["test"]["model: classification"]
  assert student["accuracy"] > 0.8, student
  validation = losses(tmp_path / "student", "validation")
  assert validation[30] < validation[0], validation


def _classifier_with_teachers(num_teachers: int = 2, **distill):
  """(student, teachers' config, DistillTask, fresh one-device state): a tiny student
  classifier and `num_teachers` different one-block teachers."""
  config = sentiment_distill.get_config("tiny")
  config.task = "classify"     # fine_tune_parts builds the student and its own task
  config.distill.update(distill)
  model, _, tx, mesh = fine_tune_parts(config)
  teacher_cfg = dataclasses.replace(model.cfg, num_layers=1)
  task = DistillTask(classify.ClassifyTask(model), teacher_cfg, config.distill, num_teachers)
  state, _, _ = state_lib.create_state(task.model, tx, task.dummy_batch(1, 8), mesh, seed=0)
  return model, teacher_cfg, task, state


@pytest.mark.slow
def test_an_ensemble_teaches_its_mean_tempered_probabilities():
  model, teacher_cfg, task, state = _classifier_with_teachers(temperature=2.0,
                                                                  hidden_weight=0.5)
  rng = np.random.default_rng(0)
  mask = np.ones((4, 12), np.int32)
  mask[3, 7:] = 0                           # a shorter review, right-padded
  batch = {"tokens": rng.integers(3, 500, (4, 12)).astype(np.int32) * mask, "mask": mask,
           "label": np.array([0, 1, 1, 0], np.int32)}
  _, sums = task.loss(state.params, batch, jax.random.PRNGKey(0), train=False)

  def run(module, params):
    logits, hidden = module.apply({"params": params}, batch["tokens"], with_hidden=True,
                                  pool_mask=batch["mask"] > 0)
    return np.asarray(logits, np.float64), np.asarray(hidden, np.float64)

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  def similarities(h):
    h = h / np.sqrt((h * h).sum(-1, keepdims=True) + 1e-6)
    pair = mask[:, :, None] * mask[:, None, :]
    return np.einsum("btd,bsd->bts", h, h) * pair, pair

  s_logits, s_hidden = run(model, state.params["student"])
  teachers = [run(Transformer(teacher_cfg), jax.tree.map(lambda x: x[k], state.params["teacher"]))
              for k in range(2)]
  probs = [np.exp(log_softmax(logits / 2.0)) for logits, _ in teachers]
  assert np.abs(probs[0] - probs[1]).max() > 1e-3     # two different teachers
  mean = (probs[0] + probs[1]) / 2
  kd = 4.0 * np.sum(mean * (np.log(mean) - log_softmax(s_logits / 2.0)))
  np.testing.assert_allclose(sums["kd"], kd, rtol=2e-4)
  target = (similarities(teachers[0][1])[0] + similarities(teachers[1][1])[0]) / 2
  student_sim, pair = similarities(s_hidden)
  relation = np.sum(np.square(student_sim - target).sum((1, 2)) / pair.sum((1, 2)))
  np.testing.assert_allclose(sums["relation"], relation, rtol=2e-4)


@pytest.mark.slow
def test_an_ensemble_teaches_a_summarizer_token_by_token():
  """Token-level KD: per scored summary token, KL(mean of three teachers' probabilities over
  the vocabulary || student), weighted like the task's own loss (T = 1, legal_distill's)."""
  from configs import legal_distill
  from train.tasks import summarize
  config = legal_distill.get_config("tiny")
  config.task = "summarize"
  model, _, tx, mesh = fine_tune_parts(config)
  base = summarize.SummarizeTask(model)
  teacher_cfg = dataclasses.replace(model.cfg, num_layers=1)
  task = DistillTask(base, teacher_cfg, config.distill, num_teachers=3)
  state, _, _ = state_lib.create_state(task.model, tx, task.dummy_batch(1, 8), mesh, seed=0)
  rng = np.random.default_rng(2)
  mask = np.ones((3, 16), np.int32)
  mask[2, 12:] = 0
  batch = {"tokens": rng.integers(3, 200, (3, 16)).astype(np.int32) * mask, "mask": mask,
           "prefix_len": np.array([6, 9, 4], np.int32)}
  _, sums = task.loss(state.params, batch, jax.random.PRNGKey(0), train=False)
  tokens, kwargs = base.inputs(batch)

  def log_probs(module, params):
    logits = np.asarray(module.apply({"params": params}, tokens, **kwargs), np.float64)
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))

  mean = np.mean([np.exp(log_probs(Transformer(teacher_cfg),
                                   jax.tree.map(lambda x: x[k], state.params["teacher"])))
                  for k in range(3)], axis=0)
  kl = np.sum(mean * (np.log(mean) - log_probs(model, state.params["student"])), axis=-1)
  weights = np.asarray(base.weights(batch))
  assert 0 < weights.sum() < weights.size          # only summary tokens are scored
  np.testing.assert_allclose(sums["kd"], np.sum(kl * weights), rtol=2e-4)

@pytest.mark.slow
def test_stacked_teachers_shard_like_the_student():
  """On a 2x2x2 mesh of the 8 fake devices every teacher parameter keeps the student's layout
  behind an unsharded teacher axis, and the loss is the one-device loss."""
  import ml_collections
  from model import sharding as sharding_lib
  config = sentiment_distill.get_config("tiny")
  config.task = "classify"
  config.distill.hidden_weight = 0.5
  model, _, tx, _ = fine_tune_parts(config)
  task = DistillTask(classify.ClassifyTask(model), dataclasses.replace(model.cfg, num_layers=1),
                     config.distill, num_teachers=3)
  rng = np.random.default_rng(1)
  batch = {"tokens": rng.integers(3, 500, (8, 16)).astype(np.int32),
           "mask": np.ones((8, 16), np.int32), "label": rng.integers(0, 2, 8).astype(np.int32)}
  sums = []
  for shape, devices in (((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), jax.devices())):
    mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"),
                                                                     shape))), devices)
    state, _, _ = state_lib.create_state(task.model, tx, task.dummy_batch(1, 8), mesh, seed=0)
    student, teacher = state.params["student"], state.params["teacher"]
    kernel = teacher["block_0"]["attn"]["query"]["kernel"]
    assert kernel.shape[0] == 3
    assert tuple(kernel.sharding.spec) == (None, *student["block_0"]["attn"]["query"]["kernel"]
                                           .sharding.spec)
    step = jax.jit(lambda p, b: task.loss(p, b, jax.random.PRNGKey(0), train=False)[1])
    sums.append(jax.device_get(step(state.params, batch)))
  assert "tensor" in str(kernel.sharding.spec)     # really split on the 8-device mesh
  chex.assert_trees_all_close(sums[0], sums[1], rtol=1e-5)

def _fake_run(workdir, tokenizer_path, **model):
  base = sentiment_finetune.get_config("tiny").model.to_dict()
  return loading.Run(workdir, 0, {"config": {"model": {**base, **model}},
                                  "tokenizer_path": str(tokenizer_path)}, checkpointer=None)


@pytest.mark.slow
def test_teachers_must_share_architecture_and_tokenizer(teacher_run, tmp_path):
  tokenizer = loading.open_run(str(teacher_run)).meta["tokenizer_path"]
  a = _fake_run("runs/a", tokenizer)
  build._check_same_teacher(a, _fake_run("runs/b", tokenizer, dropout_rate=0.3))  # training only
  with pytest.raises(ConfigError, match=r"runs/b and runs/a differ in d_model 64 vs 96; .* one "
                                        "architecture"):
    build._check_same_teacher(a, _fake_run("runs/b", tokenizer, d_model=96))
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(["a contract between the parties", "the judgment was upheld"] * 50),
      model_prefix=str(tmp_path / "other"), vocab_size=40, hard_vocab_limit=False,
      pad_id=tokenizer_lib.PAD_ID, unk_id=tokenizer_lib.UNK_ID, bos_id=tokenizer_lib.BOS_ID,
      eos_id=tokenizer_lib.EOS_ID, minloglevel=2)
  with pytest.raises(ConfigError, match=r"runs/c's tokenizer .*other.model differs from runs/a's"):
    build._check_same_teacher(a, _fake_run("runs/c", tmp_path / "other.model"))
  with pytest.raises(ConfigError, match=r"runs/d: the run's tokenizer .*missing.model is missing"):
    build._check_same_teacher(a, _fake_run("runs/d", tmp_path / "missing.model"))


def test_teacher_layer_map_keeps_first_and_last():
  assert finetune.teacher_layer_map(2, 4) == [0, 3]
  assert finetune.teacher_layer_map(3, 6) == [0, 2, 5]   # round(2.5) = 2: banker's rounding
  assert finetune.teacher_layer_map(1, 4) == [3]


def test_student_starts_from_teacher_layers():
  config = sentiment_distill.get_config("tiny")
  config.task = "classify"     # fine_tune_parts builds the student and its own task
  model, _, tx, mesh = fine_tune_parts(config)
  student_cfg = model.cfg
  task = DistillTask(classify.ClassifyTask(model), dataclasses.replace(student_cfg, num_layers=3),
                     config.distill)
  state, _, _ = state_lib.create_state(task.model, tx, task.dummy_batch(1, 8), mesh, seed=0)
  teacher = jax.tree.map(lambda x: x[0], state.params["teacher"])   # the one teacher
  student = finetune.init_student_from_teacher(state, 2, 3).params["student"]
  expected = {**{k: v for k, v in teacher.items() if not k.startswith("block_")},
              "block_0": teacher["block_0"], "block_1": teacher["block_2"]}
  chex.assert_trees_all_equal(student, expected)
  # A narrower student cannot take the teacher's blocks: a ConfigError naming the array.
  wide = DistillTask(classify.ClassifyTask(model),
                     dataclasses.replace(student_cfg, d_model=2 * student_cfg.d_model),
                     config.distill)
  state, _, _ = state_lib.create_state(wide.model, tx, wide.dummy_batch(1, 8), mesh, seed=0)
  with pytest.raises(ConfigError, match=r"needs the teacher's width: student block_0"):
    finetune.init_student_from_teacher(state, 2, 2)


def test_an_offline_teacher_joins_the_mixture():
  """With offline probabilities in the batch the target is (1 - w) * the networks' mean
  tempered probabilities + w * the offline ones tempered the same way (T = 2, w = 0.25)."""
  model, teacher_cfg, task, state = _classifier_with_teachers(temperature=2.0,
                                                                  offline_weight=0.25)
  rng = np.random.default_rng(3)
  offline = np.array([[0.9, 0.1], [0.2, 0.8], [1.0, 0.0], [0.5, 0.5]], np.float32)
  batch = {"tokens": rng.integers(3, 500, (4, 12)).astype(np.int32),
           "mask": np.ones((4, 12), np.int32), "label": np.array([0, 1, 0, 1], np.int32),
           "teacher_probs": offline}
  _, sums = task.loss(state.params, batch, jax.random.PRNGKey(0), train=False)

  def tempered(logits):
    z = np.exp((logits - logits.max(-1, keepdims=True)) / 2.0)
    return z / z.sum(-1, keepdims=True)

  def logits_of(module, params):
    return np.asarray(module.apply({"params": params}, batch["tokens"],
                                   pool_mask=batch["mask"] > 0), np.float64)

  networks = np.mean([tempered(logits_of(Transformer(teacher_cfg),
                                         jax.tree.map(lambda x: x[k], state.params["teacher"])))
                      for k in range(2)], axis=0)
  with np.errstate(divide="ignore"):
    offline_tempered = tempered(np.log(offline.astype(np.float64)))   # p^(1/T), renormalised
  target = 0.75 * networks + 0.25 * offline_tempered
  student = tempered(logits_of(model, state.params["student"]))
  kd = 4.0 * np.sum(target * (np.log(target) - np.log(student)))
  np.testing.assert_allclose(sums["kd"], kd, rtol=2e-4)
  without, _ = task.loss(state.params, {k: v for k, v in batch.items() if k != "teacher_probs"},
                         jax.random.PRNGKey(0), train=False)
  assert abs(float(without) - float(sums["loss"])) > 1e-3     # the offline teacher counts


@pytest.mark.slow
def test_a_teachers_own_predictions_teach_offline_as_it_does_online(teacher_run, tmp_path):
  """offline_weight = 1: a teacher's probabilities carried in the batch give the loss the
  teacher gives in the step (T = 2), without running it (NaN teacher weights stay unread); and
  train.redecode --split=train writes such probabilities for every train example."""
  from train import redecode
  from train.data import examples as examples_lib, soft_targets
  model, teacher_cfg, task, state = _classifier_with_teachers(1, temperature=2.0,
                                                              offline_weight=1.0)
  rng = np.random.default_rng(4)
  batch = {"tokens": rng.integers(3, 500, (4, 12)).astype(np.int32),
           "mask": np.ones((4, 12), np.int32), "label": np.array([0, 1, 0, 1], np.int32)}
  teacher = jax.tree.map(lambda x: x[0], state.params["teacher"])
  logits = Transformer(teacher_cfg).apply({"params": teacher}, batch["tokens"],
                                          pool_mask=batch["mask"] > 0)
  _, online = task.loss(state.params, batch, jax.random.PRNGKey(0), train=False)
  unread = {**state.params, "teacher": jax.tree.map(lambda x: x * np.nan, state.params["teacher"])}
  _, offline = task.loss(unread, {**batch, "teacher_probs": jax.nn.softmax(logits)},
                         jax.random.PRNGKey(0), train=False)
  chex.assert_trees_all_close(offline, online, rtol=1e-5)

  for split in ("train", "validation"):
    redecode.redecode(str(teacher_run), str(tmp_path / split), split=split)
  # An ensemble of such predictions is scored as a train split (here one run twice).
  from train import ensemble
  ensemble.ensemble([str(tmp_path / "train")] * 2, str(tmp_path / "ens_train"), str(teacher_run))
  assert "train (not test)" in (tmp_path / "ens_train" / "report.md").read_text()
  joined = tmp_path / "teacher.jsonl"
  joined.write_text("".join((tmp_path / split / "test_predictions.jsonl").read_text()
                            for split in ("train", "validation")))
  config = loading.open_run(str(teacher_run)).config
  config.distill.offline_teacher = str(joined)
  splits = examples_lib.load_splits(config.data, "classify", 2)
  targets = soft_targets.load(config.distill, splits, 2)
  assert len(targets) == len(splits["train"]) + len(splits["validation"])
  train_accuracy = np.mean([targets[e.id].argmax() == e.target for e in splits["train"]])
  assert train_accuracy > 0.8, train_accuracy


@pytest.mark.parametrize("update, message", [
    (dict(offline_weight=0.0), "config.distill.offline_weight=0.0 must be in (0, 1]"),
    (dict(task="summarize"), "config.distill.offline_teacher='<file>' teaches a classifier"),
    (dict(offline_teacher="tfidf"), "config.distill.offline_teacher='tfidf': no such file; "
                                    "expected a JSONL file of {\"id\", \"probs\"} lines"),
])
def test_offline_teacher_config_errors(update, message, tmp_path):
  from train import config_check
  config = sentiment_distill.get_config("tiny")
  teacher = tmp_path / "teacher.jsonl"
  teacher.write_text('{"id": "a", "probs": [0.5, 0.5]}\n')
  config.distill.update(offline_teacher=str(teacher))
  config.distill.update(**update)
  message = message.replace("<file>", str(teacher))
  with pytest.raises(ConfigError, match=re.escape(message)):
    config_check.validate(config, 1, 1)


def test_an_offline_teacher_file_must_cover_every_example(sentiment_files, tmp_path):
  from model.errors import DataError
  from train.data import examples as examples_lib, soft_targets
  config = _student_config(sentiment_files, tmp_path, "unused")
  splits = examples_lib.load_splits(config.data, "classify", 2)
  path = tmp_path / "teacher.jsonl"
  ids = [e.id for e in splits["train"] + splits["validation"]]
  path.write_text("".join(json.dumps({"id": i, "probs": [3.0, 1.0]}) + "\n" for i in ids))
  config.distill.offline_teacher = str(path)
  targets = soft_targets.load(config.distill, splits, 2)
  np.testing.assert_array_equal(targets[ids[0]], np.float32([0.75, 0.25]))   # normalised
  path.write_text("".join(json.dumps({"id": i, "probs": [0.5, 0.5]}) + "\n" for i in ids[1:]))
  with pytest.raises(DataError, match=f"no probabilities for 1 of .* {ids[0]!r}"):
    soft_targets.load(config.distill, splits, 2)
  path.write_text(json.dumps({"id": ids[0], "probs": [1.0]}) + "\n")
  with pytest.raises(DataError, match=r"teacher.jsonl:1: expected 'probs' to be 2 non-negative"):
    soft_targets.load(config.distill, splits, 2)


def test_unlabelled_rows_are_taught_by_the_teachers_alone():
  """A row labelled -1 (a transfer text) scores no cross-entropy and no hit, but the KL to the
  teachers covers it exactly as a labelled row."""
  model, _, task, state = _classifier_with_teachers(temperature=2.0)
  rng = np.random.default_rng(5)
  batch = {"tokens": rng.integers(3, 500, (4, 12)).astype(np.int32),
           "mask": np.ones((4, 12), np.int32), "label": np.array([0, 1, 0, 1], np.int32)}
  unlabelled = {**batch, "label": np.array([0, 1, -1, -1], np.int32)}
  _, sums = task.loss(state.params, batch, jax.random.PRNGKey(0), train=False)
  _, part = task.loss(state.params, unlabelled, jax.random.PRNGKey(0), train=False)
  np.testing.assert_allclose(part["kd"], sums["kd"], rtol=1e-6)
  assert float(part["weight"]) == 4.0
  logits = model.apply({"params": state.params["student"]}, batch["tokens"],
                       pool_mask=batch["mask"] > 0)
  nll = -np.asarray(jax.nn.log_softmax(logits))[[0, 1], [0, 1]]
  np.testing.assert_allclose(part["task_loss"], nll.sum(), rtol=1e-5)
  hits = (np.asarray(logits).argmax(-1)[:2] == [0, 1]).sum()
  assert float(part["accuracy"]) == hits


def _transfer_file(sentiment_files, path, extra: list[dict] = ()):
  """Unlabelled texts (no label field): each train review said twice, under a new id."""
  from eval.common import read_jsonl
  records = [{"id": f"unlab/{i}", "text": r["text"] + " " + r["text"]}
             for i, r in enumerate(read_jsonl(str(sentiment_files / "train.jsonl.gz")))]
  path.write_text("".join(json.dumps(r) + "\n" for r in records + list(extra)))
  return records


def test_a_transfer_set_drops_texts_of_labelled_splits(sentiment_files, tmp_path):
  from model.errors import DataError
  from train.data import examples as examples_lib
  config = _student_config(sentiment_files, tmp_path, "unused")
  splits = examples_lib.load_splits(config.data, "classify", 2)
  test, train = splits["test"][0], splits["train"][0]
  path = tmp_path / "unlabelled.jsonl"
  records = _transfer_file(sentiment_files, path, [{"id": "copy", "text": test.text},
                                                   {"id": train.id, "text": "new words"}])
  transfer = examples_lib.load_transfer(str(path), config.data, splits)
  assert [e.id for e in transfer] == [r["id"] for r in records]   # the two clashes dropped
  assert {e.target for e in transfer} == {examples_lib.UNLABELLED}
  path.write_text(json.dumps({"id": "a", "text": test.text}) + "\n")
  with pytest.raises(DataError, match="every text is also a labelled example"):
    examples_lib.load_transfer(str(path), config.data, splits)
  path.write_text(json.dumps({"id": "a", "body": "no text field"}) + "\n")
  with pytest.raises(DataError, match=r"unlabelled.jsonl:1: .*'text'"):
    examples_lib.load_transfer(str(path), config.data, splits)


@pytest.mark.slow
def test_a_student_learns_from_unlabelled_texts(sentiment_files, teacher_run, tmp_path):
  """distill.transfer_file: its texts join the train rows (label -1, the offline teacher's
  probabilities riding along), an epoch covers them, and a student taught by the offline
  targets alone (alpha 1, offline_weight 1) learns; a file that misses a transfer id fails."""
  from model.errors import DataError
  from train import inputs as inputs_lib
  config = _student_config(sentiment_files, tmp_path, str(teacher_run))
  transfer = _transfer_file(sentiment_files, tmp_path / "unlabelled.jsonl")
  resolved, sources = build.resolve(config)   # the splits, to write the teacher's file
  train_label = {e.id: e.target for e in sources.splits["train"]}
  label_of = {e.id: e.target for e in sources.splits["train"] + sources.splits["validation"]}
  label_of.update({r["id"]: train_label[f"train.jsonl.gz:{i}"] for i, r in enumerate(transfer)
                   if f"train.jsonl.gz:{i}" in train_label})
  teacher = tmp_path / "teacher.jsonl"
  teacher.write_text("".join(json.dumps({"id": i, "probs": [0.9, 0.1] if y == 0 else [0.1, 0.9]})
                             + "\n" for i, y in label_of.items()))
  config.distill.update(transfer_file=str(tmp_path / "unlabelled.jsonl"),
                        offline_teacher=str(teacher), offline_weight=1.0, alpha=1.0)
  config.train.update(num_epochs=1.0)
  with pytest.raises(DataError, match=r"no probabilities for \d+ of the \d+ transfer examples"):
    inputs_lib.make(*build.resolve(config), None)   # validation reviews' copies have none
  kept = [r for r in transfer if r["id"] in label_of]
  (tmp_path / "unlabelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
  resolved, sources = build.resolve(config)
  assert len(sources.transfer) == len(kept)
  batch = config.data.batch_size
  assert resolved.train.num_steps == -(-(len(sources.splits["train"]) + len(kept)) // batch)
  inputs = inputs_lib.make(*build.resolve(config), None)
  seen = {"labelled": 0, "unlabelled": 0}
  for _ in range(resolved.train.num_steps):
    b = next(inputs.train_iter)
    seen["unlabelled"] += int((b["label"] == -1).sum())
    seen["labelled"] += int((b["label"] >= 0).sum())
    np.testing.assert_allclose(b["teacher_probs"].max(-1), 0.9, rtol=1e-6)
  assert seen["unlabelled"] >= len(kept) - batch and seen["labelled"] >= len(
      sources.splits["train"]) - batch, seen
  run_lib.train(config, str(tmp_path / "student"))
  validation = losses(tmp_path / "student", "validation")
  steps = sorted(validation)
  assert validation[steps[-1]] < validation[steps[0]], validation


@pytest.mark.parametrize("update, message", [
    (dict(transfer_file="u.jsonl", task="summarize"),
     "config.distill.transfer_file='u.jsonl' holds unlabelled texts for a classifier's student"),
    (dict(offline_teacher="tfds:imdb_reviews:train"), "no such file; expected a JSONL file"),
])
def test_transfer_and_offline_source_config_errors(update, message):
  from train import config_check
  config = sentiment_distill.get_config("tiny")
  config.distill.update(**update)
  with pytest.raises(ConfigError, match=re.escape(message)):
    config_check.validate(config, 1, 1)
