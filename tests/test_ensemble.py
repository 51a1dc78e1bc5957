"""Ensembles (train/ensemble.py): classifiers by the mean of the members' probabilities
(eval.classification.mean_probabilities), summarizers by the consensus of their summaries
(infer.ensemble.consensus), scored as a run's test evaluation is, on test or on validation, and
the checks that every member holds the same examples."""
import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest

from eval import classification, common
from configs import legal_summ_finetune
from helpers import _sentiment_config, _summary_file
from infer import ensemble as infer_ensemble
from train import ensemble
from train.config_check import ConfigError
from train.data import examples as examples_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _member(examples, seed):
  """Records of a classifier right on ~75% of `examples`, as final_eval writes them."""
  rng = np.random.default_rng(seed)
  p_true = rng.uniform(0.25, 1.0, len(examples))
  return [{"id": e.id, "label": int(e.target), "text": e.text, "dataset": e.source,
           "probs": [p, 1 - p] if int(e.target) == 0 else [1 - p, p]}
          for e, p in zip(examples, p_true)]


def _write(directory, records):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "test_predictions.jsonl"), "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return str(directory)


@pytest.fixture()
def run_and_splits(sentiment_files, tmp_path):
  """A run directory holding only config.json (what train.ensemble reads) and its splits."""
  config = _sentiment_config(sentiment_files, tmp_path / "cache")
  os.makedirs(tmp_path / "run")
  (tmp_path / "run" / "config.json").write_text(config.to_json_best_effort())
  splits = examples_lib.load_splits(config.data, "classify", config.model.num_classes)
  return str(tmp_path / "run"), splits


def test_mean_probabilities_averages_members_example_by_example():
  records = [{"id": "a", "label": 0, "probs": [0.9, 0.1]},
             {"id": "b", "label": 1, "probs": [0.6, 0.4]}]
  other = [{"id": "a", "label": 0, "probs": [0.3, 0.7]},
           {"id": "b", "label": 1, "probs": [0.2, 0.8]}]
  mean = classification.mean_probabilities([records, other], ["x", "y"])
  chex.assert_trees_all_close([m["probs"] for m in mean], [[0.6, 0.4], [0.4, 0.6]])
  assert [m["id"] for m in mean] == ["a", "b"] and records[0]["probs"] == [0.9, 0.1]
  # Each member was right once; together they are right on both.
  assert classification.evaluate(mean, common.eval_config(bootstrap=0))["accuracy"] == 1.0
  with pytest.raises(common.EvalError, match="y's 2 records and x's 2 are not the same"):
    classification.mean_probabilities([records, other[::-1]], ["x", "y"])
  three = [dict(r, probs=[0.5, 0.25, 0.25]) for r in other]
  with pytest.raises(common.EvalError, match="y has 3 classes; x has 2"):
    classification.mean_probabilities([records, three], ["x", "y"])
  with pytest.raises(common.EvalError, match="expected >= 2"):
    classification.mean_probabilities([records], ["x"])


def test_ensemble_of_runs_is_scored_like_a_run_on_test_and_validation(run_and_splits, tmp_path):
  run, splits = run_and_splits
  members = [_write(tmp_path / f"m{i}", _member(splits["test"], i)) for i in range(3)]
  sections = ensemble.ensemble(members, str(tmp_path / "ens"), config_from=run)

  per_member = [[r["probs"] for r in common.read_jsonl(os.path.join(m, "test_predictions.jsonl"))]
                for m in members]
  written = common.read_jsonl(str(tmp_path / "ens" / "test_predictions.jsonl"))
  mean = np.mean(per_member, axis=0)
  chex.assert_trees_all_close(np.asarray([r["probs"] for r in written]), mean, rtol=1e-12)
  labels = np.asarray([int(e.target) for e in splits["test"]])
  model = sections["model: classification"]
  assert model["count"] == len(splits["test"]) == 64
  assert model["accuracy"] == pytest.approx((mean.argmax(1) == labels).mean())
  # Three members right on ~75% each with independent errors: the mean is right more often.
  accuracies = [(np.asarray(p).argmax(1) == labels).mean() for p in per_member]
  assert model["accuracy"] > max(accuracies)
  tfidf = sections["baseline: tf-idf + logistic regression"]
  paired = sections["paired: model minus tf-idf + logistic regression: classification"]
  assert paired["accuracy"] == pytest.approx(model["accuracy"] - tfidf["accuracy"])
  assert tfidf["train_examples"] == len(splits["train"])
  report = (tmp_path / "ens" / "report.md").read_text()
  assert "members: " + ", ".join(members) in report and "scored split: test" in report
  assert os.path.isfile(tmp_path / "ens" / "metrics.jsonl")

  # Validation predictions (train.redecode --split=validation outputs) are scored as such.
  val = [_write(tmp_path / f"v{i}", _member(splits["validation"], i)) for i in range(2)]
  ensemble.ensemble(val, str(tmp_path / "ens_val"), config_from=run)
  assert "scored split: validation (not test)" in (tmp_path / "ens_val" / "report.md").read_text()


@pytest.mark.slow
def test_ensemble_names_what_is_wrong(run_and_splits, tmp_path):
  run, splits = run_and_splits
  good = _write(tmp_path / "good", _member(splits["test"], 0))
  with pytest.raises(ConfigError, match="expected at least two"):
    ensemble.ensemble([good], str(tmp_path / "out"), config_from=run)
  with pytest.raises(ConfigError, match="nowhere/test_predictions.jsonl: no such file"):
    ensemble.ensemble([good, str(tmp_path / "nowhere")], str(tmp_path / "out"), config_from=run)
  with pytest.raises(ConfigError, match="good/config.json: no such file; --config_from"):
    ensemble.ensemble([good, good], str(tmp_path / "out"))
  shuffled = _write(tmp_path / "shuffled", _member(splits["test"], 1)[::-1])
  with pytest.raises(ConfigError, match="not the same examples in the same order"):
    ensemble.ensemble([good, shuffled], str(tmp_path / "out"), config_from=run)
  foreign = [dict(r, id="other:" + r["id"]) for r in _member(splits["test"], 2)]
  a, b = _write(tmp_path / "fa", foreign), _write(tmp_path / "fb", foreign)
  with pytest.raises(ConfigError, match="not all in one of .* test, validation or train splits"):
    ensemble.ensemble([a, b], str(tmp_path / "out"), config_from=run)
  # On the command line: one line naming the problem, exit code 2.
  proc = subprocess.run([sys.executable, "-m", "train.ensemble", f"--members={good}",
                         f"--out={tmp_path / 'out'}", f"--config_from={run}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --members=")


def test_redecode_ends_a_missing_run_in_one_line(tmp_path):
  """train.redecode shares train.ensemble's wrapper: a missing --workdir is one error line."""
  proc = subprocess.run([sys.executable, "-m", "train.redecode", f"--workdir={tmp_path / 'nope'}",
                         f"--out={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: --workdir={tmp_path / 'nope'}: no such directory ({tmp_path / 'nope'})")


# --- summarizers ---------------------------------------------------------------------------------
def test_consensus_keeps_the_summary_the_others_agree_with():
  same = "The company may end your account."
  # Case and punctuation are no words (ROUGE's tokenizer): the second and third agree fully.
  assert infer_ensemble.consensus(["we sell your data", same, "the company MAY end your "
                                   "account!"]) == 1
  # Partial agreement: b shares words with both a and c, which share nothing with each other.
  assert infer_ensemble.consensus(["alpha beta", "alpha beta gamma delta", "gamma delta"]) == 1
  # Ties go to the first member; empty summaries agree with nothing.
  assert infer_ensemble.consensus(["x y", "p q", "m n"]) == 0
  assert infer_ensemble.consensus(["", "a b c", "a b c d"]) == 1
  # Weighing support in the document: the summary the document says wins over the two that
  # agree with each other (rerank.mbr_index's utility, over the same words).
  three = ["you are responsible for your account", "you are responsible for the account",
           "Fees are refunded within 30 days."]
  document = "All fees are refunded within 30 days of cancellation."
  assert infer_ensemble.consensus(three, document) == 0
  assert infer_ensemble.consensus(three, document, source_weight=1.0) == 2


@pytest.fixture()
def summary_run(tmp_path):
  """A summarizer run directory holding only config.json, and its test split."""
  _summary_file(tmp_path / "pairs.jsonl", n=80)
  config = legal_summ_finetune.get_config("tiny")
  config.data.update(train_file=str(tmp_path / "pairs.jsonl"), data_dir=str(tmp_path / "cache"))
  os.makedirs(tmp_path / "run")
  (tmp_path / "run" / "config.json").write_text(config.to_json_best_effort())
  splits = examples_lib.load_splits(config.data, "summarize", 0)
  assert splits["test"], "the tiny preset holds out a test split"
  return str(tmp_path / "run"), splits["test"]


def _summaries(examples, make):
  return [{"id": e.id, "prediction": make(i, e), "reference": e.target, "source": e.text}
          for i, e in enumerate(examples)]


def test_ensemble_of_summarizers_scores_their_consensus(summary_run, tmp_path):
  run, test = summary_run
  # Each member writes the reference except on every third document, where it writes its own
  # wrong summary; no two are wrong on the same document, so the other two always outvote it.
  members = [_summaries(test, lambda i, e, k=k: f"wrong{k} zz{k} qq{k}" if i % 3 == k
                        else e.target) for k in range(3)]
  dirs = [_write(tmp_path / f"s{k}", m) for k, m in enumerate(members)]
  sections = ensemble.ensemble(dirs, str(tmp_path / "ens"), config_from=run)

  written = common.read_jsonl(str(tmp_path / "ens" / "test_predictions.jsonl"))
  # Member 0 wins every tie; where it is wrong, member 1 (the first of the two that agree).
  expected = [1 if i % 3 == 0 else 0 for i in range(len(test))]
  assert [r["member"] for r in written] == expected
  assert [r["prediction"] for r in written] == [e.target for e in test]
  assert [r["reference"] for r in written] == [e.target for e in test]
  from eval import rouge
  member_r1 = [rouge.evaluate(m, common.eval_config(bootstrap=0))["rouge1"] for m in members]
  assert sections["model: rouge"]["rouge1"] == pytest.approx(1.0) and max(member_r1) < 0.75
  for base in ("lead-3", "lead-K"):
    assert f"paired: model minus {base}: rouge" in sections
  report = (tmp_path / "ens" / "report.md").read_text()
  assert "scored split: test" in report and "highest mean ROUGE-1/2 F1" in report
  assert f"{expected.count(2)} from member 2" in report

  # Weighing support: members 1 and 2 agree on a summary the documents do not say; member 0
  # copies each document's first sentence (the reference here) and wins once support counts.
  generic = [_summaries(test, lambda i, e: "you may not sue the company")] * 2
  copied = _write(tmp_path / "copied", _summaries(test, lambda i, e: e.target))
  dirs2 = [copied] + [_write(tmp_path / f"g{k}", m) for k, m in enumerate(generic)]
  ensemble.ensemble(dirs2, str(tmp_path / "plain"), config_from=run)
  ensemble.ensemble(dirs2, str(tmp_path / "weighted"), config_from=run, source_weight=1.0)
  read = lambda d: [r["member"] for r in common.read_jsonl(str(tmp_path / d /
                                                              "test_predictions.jsonl"))]
  assert set(read("plain")) == {1} and set(read("weighted")) == {0}
  assert "plus 1.0 x its unigram/bigram precision" in (tmp_path / "weighted" /
                                                       "report.md").read_text()

  # Two summarizers cannot outvote each other; members must hold the same documents.
  with pytest.raises(ConfigError, match="2 summarizers: a consensus needs at least three"):
    ensemble.ensemble(dirs[:2], str(tmp_path / "out"), config_from=run)
  other = _write(tmp_path / "other", [dict(r, reference="x") for r in members[2]])
  with pytest.raises(ConfigError, match="other/test_predictions.jsonl's .* not the same docu"):
    ensemble.ensemble(dirs[:2] + [other], str(tmp_path / "out"), config_from=run)
  bare = _write(tmp_path / "bare", [{"id": r["id"]} for r in members[2]])
  with pytest.raises(ConfigError, match="record 0 has no 'prediction' field"):
    ensemble.ensemble(dirs[:2] + [bare], str(tmp_path / "out"), config_from=run)
