"""Fine-tuning: JSONL examples, classify/summarize tasks, pre-trained starts, the final report.

Runs are in-process on tiny generated data (no shared datasets needed): a sentiment task a
2-layer model separates within 40 steps, and a summarization task whose pipeline (prefix-LM
loss, greedy decoding, ROUGE with CIs, lead baselines, rubric sheet) is checked end to end.
"""
import json
import os
import re

import chex
import jax
import ml_collections
import numpy as np
import pytest

from configs import common as configs_common
from configs import legal_pretrain, legal_summ_finetune, sentiment_finetune
from helpers import _sentiment_config, _summary_file, fine_tune_parts, losses
from infer import loading
from train import build, finetune, optim
from train import run as run_lib
from train import state as state_lib
from train.config_check import ConfigError
from train.data import examples as examples_lib
from model import tokenizer as tokenizer_lib
from model.errors import DataError
from train.tasks import summarize

pytestmark = pytest.mark.usefixtures("one_device")   # in-process runs on 1 of the 8 fake devices


@pytest.fixture(scope="module")
def classifier_run(sentiment_files, tmp_path_factory):
  """A tiny classifier trained from scratch: (workdir, result); also the distillation teacher."""
  root = tmp_path_factory.mktemp("classifier")
  config = _sentiment_config(sentiment_files, root / "cache", num_steps=40)
  return root, run_lib.train(config, str(root / "run"))


@pytest.mark.slow
def test_classifier_from_scratch_learns_and_writes_report(classifier_run):
  tmp_path, result = classifier_run
  test = result["test"]["model: classification"]
  assert test["accuracy"] > 0.85, test
  assert test["count"] == 64
  baseline = result["test"]["baseline: tf-idf + logistic regression"]
  assert baseline["accuracy"] > 0.85
  # The model minus TF-IDF on the same reviews, one review at a time.
  paired = result["test"]["paired: model minus tf-idf + logistic regression: classification"]
  assert paired["count"] == 64
  assert paired["accuracy"] == pytest.approx(test["accuracy"] - baseline["accuracy"])
  assert paired["nll"] == pytest.approx(test["nll"] - baseline["nll"])
  report = (tmp_path / "run" / "report.md").read_text()
  assert f"{test['accuracy']:.3f}" in report and "tf-idf" in report
  # The best validation state is kept and used for the test evaluation.
  assert result["best"]["step"] in (10, 20, 30, 40)
  assert os.listdir(tmp_path / "run" / "best" / "checkpoints")
  lines = (tmp_path / "run" / "test_predictions.jsonl").read_text().splitlines()
  assert len(lines) == 64 and abs(sum(json.loads(lines[0])["probs"]) - 1) < 1e-5


@pytest.mark.slow
def test_learning_curve_reads_finished_fine_tunes(classifier_run, tmp_path):
  from eval import common as eval_common
  from eval import learning_curve
  root, result = classifier_run
  scratch = str(root / "run")
  # A second point: the same run's files, as if fine-tuned from step 2 of an 8 x 32 LM.
  pretrain = tmp_path / "lm"
  (pretrain / "checkpoints").mkdir(parents=True)
  (pretrain / "config.json").write_text(json.dumps({"data": {"batch_size": 8, "seq_len": 32}}))
  tuned = tmp_path / "tuned"
  tuned.mkdir()
  for name in ("test_predictions.jsonl", "metrics.jsonl"):
    (tuned / name).write_text((root / "run" / name).read_text())
  config = json.loads((root / "run" / "config.json").read_text())
  config["train"]["init_from"] = str(pretrain / "checkpoints" / "2")
  (tuned / "config.json").write_text(json.dumps(config))

  points = [learning_curve.point(r, bootstrap=200) for r in (str(tuned), scratch)]
  assert [(p["step"], p["tokens"]) for p in points] == [(2, 2 * 8 * 32), (0, 0)]
  test = result["test"]["model: classification"]
  for p in points:
    assert p["accuracy"] == pytest.approx(test["accuracy"]) and p["count"] == 64
    assert p["accuracy_ci"][0] <= p["accuracy"] <= p["accuracy_ci"][1]
    assert p["tfidf"] == pytest.approx(
        result["test"]["baseline: tf-idf + logistic regression"]["accuracy"])
    assert p["validation_loss"] > 0 and 0.5 < p["validation_accuracy"] <= 1
  shape = f"{config['model']['num_layers']} layers x d_model {config['model']['d_model']}"
  assert [p["model"] for p in points] == [shape, shape]
  text = learning_curve.table(sorted(points, key=lambda p: p["tokens"]))
  assert text.splitlines()[2].startswith(f"| {shape} | 0.0M | 0 |")
  assert "| 2 |" in text.splitlines()[3]
  # Long reviews read whole at evaluation: a curve of its own, its validation the windowed one.
  windowed = tmp_path / "windowed"
  windowed.mkdir()
  predictions = "test_predictions.jsonl"
  (windowed / predictions).write_text((root / "run" / predictions).read_text())
  rows = [json.loads(line) for line in (root / "run/metrics.jsonl").read_text().splitlines()]
  best = min((r for r in rows if r["split"] == "validation"), key=lambda r: r["loss"])
  rows.append({"step": best["step"], "split": "validation/classification", "nll": 0.125,
               "accuracy": 0.75})
  (windowed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (windowed / "config.json").write_text(json.dumps(dict(config, eval={"window_stride": 6})))
  read_whole = learning_curve.point(str(windowed), bootstrap=20)
  assert read_whole["model"] == shape + ", windows at stride 6"
  assert (read_whole["validation_loss"], read_whole["validation_accuracy"]) == (0.125, 0.75)
  # A wider LM's point is a second curve: grouped apart from the first, and drawn as its own line.
  wide = dict(points[0], run="wide", model="1 layers x d_model 999")
  assert [p["run"] for p in learning_curve.merge(points, [wide])] == ["wide", scratch, str(tuned)]
  learning_curve.plot(points + [wide], str(tmp_path / "curve.png"), "t")
  assert (tmp_path / "curve.png").stat().st_size > 1000

  # Saved points come back equal; a run measured again replaces its saved point, by name.
  saved = tmp_path / "curve.jsonl"
  learning_curve.curve([str(tuned), scratch], [], 200, save_to=str(saved))
  restored = learning_curve.curve([], [str(saved)], 0)
  assert [(p["step"], p["run"]) for p in restored] == [(0, scratch), (2, str(tuned))]
  chex.assert_trees_all_close(restored[1]["accuracy_ci"], list(points[0]["accuracy_ci"]))
  again = dict(points[1], run="elsewhere/run", accuracy=0.5)
  merged = learning_curve.merge(restored, [again])
  assert [(p["run"], p["accuracy"]) for p in merged] == [("elsewhere/run", 0.5),
                                                          (str(tuned), restored[1]["accuracy"])]
  saved.write_text(json.dumps({"run": "x", "step": 1}) + "\n")
  with pytest.raises(eval_common.EvalError, match=r"curve.jsonl:1: a curve point needs tokens"):
    learning_curve.read_points(str(saved))

  config["train"]["init_from"] = str(pretrain)
  (tuned / "config.json").write_text(json.dumps(config))
  with pytest.raises(eval_common.EvalError, match="is a workdir.*checkpoints/<step>"):
    learning_curve.point(str(tuned), bootstrap=0)


@pytest.mark.slow
def test_windows_read_long_texts_whole_as_a_per_row_reference_does(classifier_run, tmp_path):
  from infer import classifier_rows
  from train import config_check, redecode
  root, _ = classifier_run
  loaded = loading.LoadedModel.from_workdir(str(root / "run"))
  seq_len, how = loaded.config.data.seq_len, loaded.config.data.truncation
  reviews = [json.loads(line)["text"] for line in open(loaded.config.data.test_file)][:8]
  long = " ".join(reviews)
  assert len(loaded.tokenizer.encode(long)) > 2 * seq_len
  assert all(len(loaded.tokenizer.encode(r)) <= seq_len - 2 for r in reviews[:3])
  texts = reviews[:3] + [long]
  plain = loaded.classify(texts)                 # the run's eval.window_stride: 0
  chex.assert_trees_all_close(plain, loaded.classify(texts, window_stride=0))
  windowed = loaded.classify(texts, window_stride=16)
  chex.assert_shape(windowed, (4, 2))
  chex.assert_trees_all_close(windowed[:3], plain[:3], rtol=1e-5)    # short: one row either way
  # The long text: its rows one at a time through the model, log-probabilities averaged.
  rows, _ = classifier_rows.rows_for(loaded.tokenizer, [long], seq_len, how, 16)
  assert len(rows) >= 4
  per_row = np.concatenate([np.asarray(loading.classify_probs(
      loaded.model, loaded.params, **classifier_rows.pad_rows([r], seq_len))) for r in rows])
  mean = np.log(per_row).mean(axis=0)
  chex.assert_trees_all_close(windowed[3], np.exp(mean) / np.exp(mean).sum(), atol=1e-5)
  assert abs(windowed[3, 1] - plain[3, 1]) > 1e-4     # reading it whole changed the answer
  bad = sentiment_finetune.get_config("tiny")
  bad.eval.window_stride = 63
  with pytest.raises(ConfigError, match=re.escape("config.eval.window_stride=63: expected 0 (off) "
                                                  ".. data.seq_len - 2 = 62")):
    config_check.validate(bad, 1, 1)
  chex.assert_trees_all_close(loaded.classify(texts, batch_size=3, window_stride=16), windowed,
                              atol=1e-6)
  # Chosen on validation: train.redecode re-scores the finished run with a stride.
  sections = redecode.redecode(str(root / "run"), str(tmp_path / "w16"), window_stride=16,
                               split="validation")
  assert sections["model: classification"]["count"] > 0
  report = (tmp_path / "w16" / "report.md").read_text()
  assert "long texts: also read whole in windows 16 ids apart" in report
  assert "scored split: validation (not test)" in report
  with pytest.raises(ConfigError, match="decoding flags .'beam'. apply to summarizers"):
    redecode.redecode(str(root / "run"), str(tmp_path / "bad"), beam=2)
  with pytest.raises(ConfigError, match="--window_stride=63: expected 0 .off. .. 62"):
    redecode.redecode(str(root / "run"), str(tmp_path / "bad"), window_stride=63)


@pytest.mark.slow
def test_classifier_runs_averaged_at_inference(classifier_run):
  import types
  from infer import ensemble
  from infer import inputs as inputs_lib
  root, _ = classifier_run
  run = str(root / "run")
  plain, windowed = loading.LoadedModel.from_workdir(run), loading.LoadedModel.from_workdir(run)
  with windowed.config.unlocked():
    windowed.config.eval.window_stride = 16
  reviews = [json.loads(line)["text"] for line in open(plain.config.data.test_file)][:8]
  texts = reviews[:3] + [" ".join(reviews)]     # the last is read in windows by one member
  both = ensemble.ClassifierEnsemble([plain, windowed], [run, run + "@16"])
  expected = (np.asarray(plain.classify(texts)) + np.asarray(windowed.classify(texts))) / 2
  assert np.abs(expected[3] - np.asarray(plain.classify(texts))[3]).max() > 1e-5
  results = both.predict(texts, pad_to=8)
  chex.assert_trees_all_close(np.asarray([r["probs"] for r in results]), expected, atol=1e-6)
  assert [r["label"] for r in results] == expected.argmax(1).tolist()
  # From the command line's --workdir (infer.main, infer.serve): comma-separated runs.
  loaded, max_new = inputs_lib.load_predictor(f"{run}, {run}", None, window_stride=16)
  assert isinstance(loaded, ensemble.ClassifierEnsemble) and max_new is None
  chex.assert_trees_all_close(loaded.classify(texts), np.asarray(windowed.classify(texts)),
                              atol=1e-6)
  with pytest.raises(inputs_lib.InputError, match="max_new=5: only summarizers generate"):
    inputs_lib.load_predictor(f"{run},{run}", 5)
  summarizer = types.SimpleNamespace(kind="summarize")
  with pytest.raises(ValueError, match="s holds a 'summarize' run; an ensemble averages"):
    ensemble.ClassifierEnsemble([plain, summarizer], [run, "s"])


@pytest.mark.slow
def test_init_from_adopts_architecture_and_restores_backbone(sentiment_files, tmp_path):
  # A tiny LM pre-trained on the review texts, then a classifier started from it.
  lm = legal_pretrain.get_config("tiny")
  lm.data.update(use_licensedcode=False, extra_dirs=(str(sentiment_files),), vocab_size=512,
                 data_dir=str(tmp_path / "cache"), seq_len=32, batch_size=8, max_docs=-1)
  lm.model.update(num_layers=1, d_model=48, num_heads=2, num_kv_heads=2, head_dim=24,
                  mlp_dim=96)
  lm.train.update(num_steps=4, eval_every=4, checkpoint_every=2, keep_checkpoints=5)
  run_lib.train(lm, str(tmp_path / "lm"))

  # The workdir means its newest step; <workdir>/checkpoints/<step> one kept step (a
  # learning curve fine-tunes from each).
  for init_from, step in ((tmp_path / "lm", 4), (tmp_path / "lm" / "checkpoints" / "2", 2)):
    config = _sentiment_config(sentiment_files, tmp_path / "cache")
    config.train.init_from = str(init_from)
    config, sources = build.resolve(config)
    assert (config.model.d_model, config.model.num_layers, config.data.vocab_size) == (48, 1, 512)
    assert sources.pretrained.step == step
    parts = build.build(config)
    state = parts.init_state(seed=1)
    loaded = finetune.load_backbone(sources.pretrained, state, parts.mesh)
    lm_params = _lm_params(lm, tmp_path / "lm", step)
    chex.assert_trees_all_equal(
        {k: v for k, v in loaded.params.items() if k != "cls_head"}, lm_params)
    chex.assert_trees_all_equal(loaded.params["cls_head"], state.params["cls_head"])
  config = _sentiment_config(sentiment_files, tmp_path / "cache")
  config.train.init_from = str(tmp_path / "lm" / "checkpoints" / "3")
  with pytest.raises(ConfigError, match="checkpoints/3: .* no readable checkpoint at step 3"):
    build.resolve(config)


def _lm_params(lm_config, workdir, step=None):
  from model import checkpoint as checkpoint_lib
  model, task, tx, mesh = fine_tune_parts(lm_config)
  abstract, shardings = state_lib.state_shardings(model, tx, task.dummy_batch(1, 8), mesh)
  ckpt = checkpoint_lib.Checkpointer(str(workdir), every=1, keep=5, async_save=False)
  state, _ = ckpt.restore(ckpt.latest_step() if step is None else step,
                          state_lib.abstract_with_shardings(abstract, shardings))
  return state.params


@pytest.mark.slow
def test_summarizer_pipeline_reports_rouge_with_baselines(tmp_path):
  _summary_file(tmp_path / "pairs.jsonl")
  config = legal_summ_finetune.get_config("tiny")
  config.data.update(train_file=str(tmp_path / "pairs.jsonl"), data_dir=str(tmp_path / "cache"))
  config.eval.slice_fields = ("dataset",)
  config.train.select_by = "rouge/rougeL"     # the best state by validation ROUGE-L, not loss
  result = run_lib.train(config, str(tmp_path / "run"))
  sections = result["test"]
  # The kept state is the validation with the highest ROUGE-L (the first one on a tie).
  rouge_l = losses(tmp_path / "run", "validation/rouge", "rougeL")
  assert sorted(rouge_l) == [0, 10, 20, 30]
  best_step = max(sorted(s for s in rouge_l if s > 0), key=lambda s: rouge_l[s])
  assert result["best"]["step"] == best_step
  assert result["best"]["select_by"] == "rouge/rougeL"
  assert result["best"]["value"] == pytest.approx(rouge_l[best_step])
  rouge = sections["model: rouge"]
  for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
    assert 0.0 <= rouge[key] <= 1.0
  assert {"baseline: lead-3: rouge", "baseline: lead-N: rouge", "baseline: lead-K: rouge"} <= set(
      sections)
  assert "model: factual" in sections
  # Model minus lead-3 per document: its mean is the difference of the two means.
  paired = sections["paired: model minus lead-3: rouge"]
  assert paired["rouge1"] == pytest.approx(rouge["rouge1"] -
                                           sections["baseline: lead-3: rouge"]["rouge1"])
  assert paired["rouge1_ci"][0] <= paired["rouge1"] <= paired["rouge1_ci"][1]
  assert "paired: model minus lead-K: rouge" in sections
  # Lead-3 copies the source's first sentences, which contain the reference here.
  assert sections["baseline: lead-3: rouge"]["rouge1"] > 0.3
  assert (tmp_path / "run" / "rubric_sheet.csv").exists()
  report = (tmp_path / "run" / "report.md").read_text()
  assert "rouge1" in report
  assert "decoding: greedy: no_repeat_ngram_size=4" in report   # the preset's decoding


class _WordTok:
  eos_id = 3

  def encode(self, text):
    return text.split()


def test_eval_decode_options_learn_the_length_ratio_and_are_checked():
  from train import config_check, final_eval
  config = legal_summ_finetune.get_config("tiny")
  loaded = loading.LoadedModel(config, "summarize", None, None, _WordTok(), 0)
  train = [examples_lib.Example(str(i), " ".join(["w"] * n), " ".join(["s"] * k), "f")
           for i, (n, k) in enumerate([(10, 2), (20, 3), (40, 12), (8, 8)])]
  assert final_eval.decode_options(config, loaded, train) == (
      dict(final_eval.DECODE_DEFAULTS, no_repeat_ngram_size=4),
      {"decoding": "greedy: no_repeat_ngram_size=4"})
  config.eval.decode.update(length_ratio="train", beam=3, length_penalty=0.6, min_new=2)
  options, facts = final_eval.decode_options(config, loaded, train)
  assert options["length_ratio"] == pytest.approx(0.25)    # median of .2, .15, .3, 1
  assert facts["decoding"] == ("beam search (length_ratio learned on the train split): beam=3, "
                               "length_penalty=0.6, no_repeat_ngram_size=4, min_new=2, "
                               "length_ratio=0.25")
  config_check.validate(config, 1, 1)
  # A run recorded before eval.decode existed, opened (upgraded), decodes greedily as it did then.
  old = json.loads(config.to_json_best_effort())
  del old["eval"]["decode"]
  old = ml_collections.ConfigDict(configs_common.upgrade(old))
  assert final_eval.decode_options(old, loaded, train) == (final_eval.DECODE_DEFAULTS,
                                                          {"decoding": "greedy"})
  for key, value, message in [
      ("length_ratio", "median", "length_ratio='median': expected 0 (off), a positive number"),
      ("length_ratio", -0.5, "length_ratio=-0.5"),
      ("beam", 1, "config.eval.decode.beam=1: expected 0 (greedy) or >= 2"),
      ("no_repeat_ngram_size", 13, "no_repeat_ngram_size=13: expected 0 (off) .. "
                                   "eval.decode_len=12"),
      ("repetition_penalty", 0.0, "repetition_penalty=0.0 must be > 0"),
      ("min_new", -1, "min_new=-1: expected 0..eval.decode_len=12"),
      ("samples", -1, "samples=-1: expected >= 0 (0: off)"),
      ("top_p", 0.0, "top_p=0.0: expected (0, 1]"),
      ("temperature", 0.7, "temperature, top_p and source_weight apply to MBR sampling only"),
      ("source_weight", 1.0, "temperature, top_p and source_weight apply to MBR sampling only")]:
    bad = legal_summ_finetune.get_config("tiny")
    bad.eval.decode[key] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
      config_check.validate(bad, 1, 1)
  bad = legal_summ_finetune.get_config("tiny")
  bad.eval.decode.length_penalty = 0.5
  with pytest.raises(ConfigError, match="applies to beam search only"):
    config_check.validate(bad, 1, 1)


def test_select_by_names_a_validation_metric():
  from train import config_check, metrics
  config = legal_summ_finetune.get_config("tiny")
  for bad in ("rougeL", "classification/accuracy", "rouge/rougeL/x"):
    config.train.select_by = bad
    with pytest.raises(ConfigError, match=re.escape(f"config.train.select_by={bad!r}; expected "
                                                    "'loss' or '<evaluator>/<metric>'")):
      config_check.validate(config, 1, 1)
  scores = {"loss": 2.5, "rouge/rougeL": 0.3, "factual/repeats_4gram": 0.1}
  # Signed so that larger is better: ROUGE as is, a loss or a repeat rate negated.
  assert metrics.selection_score("rouge/rougeL", scores) == 0.3
  assert metrics.selection_score("loss", scores) == -2.5
  assert metrics.selection_score("factual/repeats_4gram", scores) == -0.1
  with pytest.raises(ConfigError, match="'rouge/rouge9' is not a validation metric of this run; "
                                        "it has: factual/repeats_4gram, loss, rouge/rougeL"):
    metrics.selection_score("rouge/rouge9", scores)


def test_summary_loss_scores_only_summary_tokens():
  tokens = np.array([[2, 10, 11, 3, 20, 21, 3, 0]], np.int32)
  mask = (tokens > 0).astype(np.int32)
  mask[0, 0] = 1
  targets, weights = summarize.summary_targets(tokens, mask, np.array([4], np.int32))
  # Position t predicts t+1: scored for the summary tokens 20, 21 and the final eos.
  np.testing.assert_array_equal(np.asarray(weights[0]), [0, 0, 0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(np.asarray(targets[0, 3:6]), [20, 21, 3])


class _Tok(tokenizer_lib.TokenizerBase):
  """Whitespace-separated integers are the ids; framing and truncation are the real ones."""
  bos_id, eos_id = 2, 3

  def encode(self, text):
    return [int(w) for w in text.split()]


def test_encode_truncates_head_tail_and_sets_prefix():
  cfg = sentiment_finetune.get_config("tiny").data
  cfg.update(seq_len=10, truncation="head_tail", target_len=4)
  ids = " ".join(str(i) for i in range(100, 120))
  row = examples_lib.encode(examples_lib.Example("a", ids, 1, "f"), _Tok(), "classify", cfg)
  # 8 text tokens: the first quarter (2) and the last 6.
  np.testing.assert_array_equal(row["tokens"], [2, 100, 101, 114, 115, 116, 117, 118, 119, 3])
  row = examples_lib.encode(examples_lib.Example("a", ids, "7 8 9 10 11", "f"), _Tok(),
                            "summarize", cfg)
  # Summary: target_len - 1 = 3 tokens + eos; the document gets the 4 left (1 head, 3 tail).
  np.testing.assert_array_equal(row["tokens"], [2, 100, 117, 118, 119, 3, 7, 8, 9, 3])
  assert row["prefix_len"] == 6
  row = examples_lib.encode(examples_lib.Example("a", "5", "7", "f"), _Tok(), "summarize", cfg)
  np.testing.assert_array_equal(row["tokens"], [2, 5, 3, 7, 3, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(row["mask"], [1] * 5 + [0] * 5)
  assert row["prefix_len"] == 3


def test_bad_lines_fail_with_line_number_or_skip(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b'{"text": "good", "label": 1}\n{"text": broken\n{"text": "x", "label": "1"}\n'
                   b'\xff\xfe\n{"text": "fine", "label": 0}\n')
  cfg = sentiment_finetune.get_config("tiny").data
  with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
    examples_lib.read_examples(str(path), "classify", cfg)
  cfg.bad_lines = "skip"
  kept = examples_lib.read_examples(str(path), "classify", cfg)
  assert [e.text for e in kept] == ["good", "fine"]


def test_label_out_of_range_is_a_clear_error(sentiment_files):
  cfg = _sentiment_config(sentiment_files, "/tmp").data
  with pytest.raises(DataError, match="label 1; expected 0..0"):
    examples_lib.load_splits(cfg, "classify", num_classes=1)


def test_missing_pretrained_run_is_a_config_error(tmp_path):
  config = sentiment_finetune.get_config("tiny")
  config.train.init_from = str(tmp_path)
  with pytest.raises(ConfigError, match="config.train.init_from=.*no finished checkpoint"):
    build.resolve(config)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedules(schedule):
  cfg = sentiment_finetune.get_config("tiny").optim
  cfg.update(schedule=schedule, lr=1.0, warmup_steps=10, min_lr_ratio=0.0)
  lr = optim.make_schedule(cfg, 110)
  values = np.array([float(lr(s)) for s in (0, 5, 10, 60, 110)])
  expected = {"constant": [0, 0.5, 1, 1, 1], "linear": [0, 0.5, 1, 0.5, 0],
              "cosine": [0, 0.5, 1, 0.5, 0]}[schedule]
  np.testing.assert_allclose(values, expected, atol=1e-6)


@pytest.mark.slow
def test_nonfinite_update_is_skipped_not_applied():
  from train import step as step_lib
  config = sentiment_finetune.get_config("tiny")
  model, task, tx, mesh = fine_tune_parts(config)
  state, _, _ = state_lib.create_state(model, tx, task.dummy_batch(1, 8), mesh, seed=0)
  params = jax.tree.map(np.array, state.params)   # writable host copies
  params["cls_head"]["kernel"][0, 0] = np.nan
  state = state.replace(params=params)
  step = jax.jit(step_lib.make_train_step(task, tx, optim.make_schedule(config.optim, 10), 1,
                                          mesh, skip_nonfinite=True))
  batch = task.dummy_batch(8, 16)
  new_state, metrics = step(state, batch)
  assert float(metrics["skipped"]) == 1.0
  assert int(new_state.step) == 1
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, new_state.params), params)
  chex.assert_trees_all_equal(new_state.opt_state, state.opt_state)


@pytest.mark.slow
def test_redecode_reruns_the_test_evaluation_with_other_decoding(tmp_path):
  from train import redecode
  _summary_file(tmp_path / "pairs.jsonl")
  config = legal_summ_finetune.get_config("tiny")
  config.data.update(train_file=str(tmp_path / "pairs.jsonl"), data_dir=str(tmp_path / "cache"))
  config.train.num_steps = 20
  first = run_lib.train(config, str(tmp_path / "run"))["test"]
  again = redecode.redecode(str(tmp_path / "run"), str(tmp_path / "beam"), beam=2, min_new=3)
  # The same test examples: the lead baselines do not depend on decoding.
  assert again["baseline: lead-3: rouge"] == first["baseline: lead-3: rouge"]
  assert "model: rouge" in again
  report = (tmp_path / "beam" / "report.md").read_text()
  assert "decoding: beam search: beam=2, no_repeat_ngram_size=4, min_new=3" in report
  assert "re-decoded from" in report
  ours = [json.loads(line) for line in open(tmp_path / "beam" / "test_predictions.jsonl")]
  theirs = [json.loads(line) for line in open(tmp_path / "run" / "test_predictions.jsonl")]
  assert [r["id"] for r in ours] == [r["id"] for r in theirs]
  assert all(r["prediction"].strip() for r in ours)     # min_new=3: never an empty summary
  with pytest.raises(ConfigError, match="min_new"):
    redecode.redecode(str(tmp_path / "run"), str(tmp_path / "bad"), min_new=-1)
  # The recorded config.json has length_ratio 0.0 as a plain float: "train" still replaces it.
  recorded = json.loads((tmp_path / "run" / "config.json").read_text())
  assert recorded["eval"]["decode"]["length_ratio"] == 0.0
  learned = redecode.overridden_config(recorded, length_ratio="train", beam=2)
  assert (learned.eval.decode.length_ratio, learned.eval.decode.beam) == ("train", 2)
  assert redecode.overridden_config(recorded, length_ratio="0.3").eval.decode.length_ratio == 0.3
  # MBR decoding: the report says how the summaries were chosen.
  redecode.redecode(str(tmp_path / "run"), str(tmp_path / "mbr"), samples=2, temperature=1.5,
                    num_examples=4)
  report = (tmp_path / "mbr" / "report.md").read_text()
  assert ("decoding: MBR over 2 samples (temperature 1.5, top_p 1.0) and the greedy summary: "
          "no_repeat_ngram_size=4\n" in report), report
  # Settings are chosen on validation: those examples are scored, and the report says so.
  redecode.redecode(str(tmp_path / "run"), str(tmp_path / "valid"), split="validation")
  report = (tmp_path / "valid" / "report.md").read_text()
  assert "scored split: validation (not test)" in report
  scored = {json.loads(line)["id"] for line in open(tmp_path / "valid" / "test_predictions.jsonl")}
  assert scored and not scored & {r["id"] for r in theirs}


def test_validation_hooks_decode_once_for_all_evaluators():
  """ROUGE and the factual proxies score one decode per validation (it decoded twice)."""
  from train import final_eval

  class CountingSummarizer:
    kind, calls = "summarize", 0

    def summarize(self, texts, params, batch_size, **options):
      self.calls += 1
      return [" ".join(t.split()[:3]) for t in texts]

  examples = [examples_lib.Example(f"d{i}", f"the court held that clause {i} applies here",
                                   f"the court held clause {i}", "f.jsonl") for i in range(5)]
  cfg = legal_summ_finetune.get_config("tiny")
  loaded = CountingSummarizer()
  hooks = final_eval.validation_hooks(cfg, loaded, {"validation": examples}, lambda p: p)
  assert sorted(hooks) == ["factual", "rouge"]
  params, newer = {"w": np.ones(2)}, {"w": np.ones(2)}
  first = {name: hook(params) for name, hook in hooks.items()}
  assert loaded.calls == 1 and 0 < first["rouge"]["rouge1"] <= 1
  hooks["rouge"](newer)                    # the next validation's params: decoded again
  assert loaded.calls == 2


def test_max_validation_examples_keeps_a_fixed_subset_and_leaves_train_alone(tmp_path):
  path = str(tmp_path / "pairs.jsonl")
  _summary_file(path, n=200)
  cfg = legal_summ_finetune.get_config("tiny")
  cfg.data.train_file = path
  every = examples_lib.load_splits(cfg.data, "summarize", 0)
  cfg.data.max_validation_examples = 10
  fewer = examples_lib.load_splits(cfg.data, "summarize", 0)
  again = examples_lib.load_splits(cfg.data, "summarize", 0)
  ids = lambda split: [e.id for e in split]
  assert len(every["validation"]) > 10 and len(fewer["validation"]) == 10
  assert set(ids(fewer["validation"])) < set(ids(every["validation"]))
  assert ids(fewer["validation"]) == ids(again["validation"])
  assert ids(fewer["train"]) == ids(every["train"]) and ids(fewer["test"]) == ids(every["test"])
