"""Tests of the prediction evaluators in eval/ on tiny synthetic data, against sklearn, the
rouge_score reference and values computed by hand."""
import csv
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics as skm

from eval import classification, common, factual, report, rouge, rubric, slices, tfidf_baseline

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _cfg(**overrides):
  return common.eval_config(**{"bootstrap": 200, **overrides})


def _random_classification(n=60, num_classes=3, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n)
  probs = rng.dirichlet(np.ones(num_classes), n)
  probs[np.arange(n), labels] += rng.uniform(0, 1, n)   # better than chance, not perfect
  probs /= probs.sum(1, keepdims=True)
  return [{"label": int(y), "probs": p.tolist()} for y, p in zip(labels, probs)], labels, probs


# --- classification -----------------------------------------------------------------------

def test_classification_matches_sklearn():
  records, labels, probs = _random_classification()
  out = classification.evaluate(records, _cfg())
  predicted = probs.argmax(1)
  assert out["count"] == 60
  assert out["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted))
  assert out["macro_f1"] == pytest.approx(skm.f1_score(labels, predicted, average="macro"))
  assert out["nll"] == pytest.approx(skm.log_loss(labels, probs, labels=[0, 1, 2]))
  assert out["confusion_matrix"] == skm.confusion_matrix(labels, predicted).tolist()
  p, r, f, s = skm.precision_recall_fscore_support(labels, predicted, labels=[0, 1, 2],
                                                   zero_division=0)
  for c, row in enumerate(out["per_class"]):
    assert (row["class"], row["support"]) == (c, s[c])
    assert [row["precision"], row["recall"], row["f1"]] == pytest.approx([p[c], r[c], f[c]])
  low, high = out["accuracy_ci"]
  assert low <= out["accuracy"] <= high and high - low < 0.4
  assert classification.evaluate(records, _cfg()) == out   # seeded: same CI every time
  assert "accuracy_ci" not in classification.evaluate(records, _cfg(bootstrap=0))
  json.dumps(out)


def test_macro_f1_skips_a_class_never_seen():
  # Class 2 is neither a label nor a prediction: sklearn's default macro set leaves it out.
  records = [{"label": y, "probs": p} for y, p in [
      (0, [0.8, 0.1, 0.1]), (1, [0.7, 0.2, 0.1]), (1, [0.1, 0.8, 0.1]), (0, [0.6, 0.3, 0.1])]]
  out = classification.evaluate(records, _cfg())
  assert out["macro_f1"] == pytest.approx(skm.f1_score([0, 1, 1, 0], [0, 0, 1, 0],
                                                       average="macro"))
  assert out["per_class"][2] == {"class": 2, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                                 "support": 0}


def test_ece_by_hand():
  # Confidences 0.9 (right) and 0.92 (wrong) share the bin (13/15, 14/15]: |0.5 - 0.91|;
  # 0.75 wrong, 0.7 right and 0.62 right are alone in theirs.
  records = [{"label": 0, "probs": [0.9, 0.1]}, {"label": 1, "probs": [0.92, 0.08]},
             {"label": 0, "probs": [0.25, 0.75]}, {"label": 1, "probs": [0.3, 0.7]},
             {"label": 0, "probs": [0.62, 0.38]}]
  expected = (2 * 0.41 + 0.75 + 0.3 + 0.38) / 5
  assert classification.evaluate(records, _cfg())["ece"] == pytest.approx(expected)


@pytest.mark.parametrize("record, message", [
    ({"label": 3, "probs": [0.5, 0.5]}, "record 1 label 3 is outside [0, 2)"),
    ({"label": 0, "probs": [0.2, 0.3, 0.5]}, "record 1 has 3 probabilities; expected 2"),
    ({"label": 0, "probs": [2.0, -1.0]}, "not a probability distribution"),
    ({"label": 0, "probs": [3.1, 0.2]}, "logits?"),
    ({"label": "0", "probs": [0.5, 0.5]}, "record 1 field 'label'"),
    ({"probs": [0.5, 0.5]}, "record 1 has no 'label' field"),
])
def test_classification_bad_records(record, message):
  with pytest.raises(common.EvalError, match=re.escape(message)):
    classification.evaluate([{"label": 1, "probs": [0.4, 0.6]}, record], _cfg())


def test_bootstrap_ci():
  values = [0.0, 1.0] * 50
  ci = common.bootstrap_ci(values, 500, seed=3)
  assert ci[0] < 0.5 < ci[1] and ci[1] - ci[0] == pytest.approx(0.2, abs=0.05)   # ~4 sigma
  assert common.bootstrap_ci(values, 500, seed=3) == ci
  assert common.bootstrap_ci(values, 500, seed=4) != ci
  assert common.bootstrap_ci(values, 0) is None


# --- ROUGE --------------------------------------------------------------------------------

def test_rouge_known_values():
  text = "The licensee shall pay. Fees are due monthly."
  assert rouge.scores(text, text) == pytest.approx({m: 1.0 for m in rouge.METRICS})
  assert rouge.scores("alpha beta gamma", "delta epsilon") == {m: 0.0 for m in rouge.METRICS}
  # Clipped unigram overlap the, cat, on, mat = 4 of 6 on both sides; one shared bigram of 5;
  # LCS "the cat on mat" = 4.
  s = rouge.scores("the cat sat on the mat", "the cat lay on a mat")
  assert s["rouge1"] == pytest.approx(2 / 3)
  assert s["rouge2"] == pytest.approx(1 / 5)
  assert s["rougeL"] == pytest.approx(2 / 3)
  # Porter stemming: contracts/contract and terminated/terminates are the same words.
  assert rouge.scores("contracts terminated", "contract terminates")["rouge1"] == 1.0


def test_rouge_lsum_uses_sentences():
  # Swapped sentences: one LCS over the whole text finds half; the union LCS per sentence all.
  s = rouge.scores("Alpha beta gamma. Delta epsilon zeta.", "Delta epsilon zeta. Alpha beta gamma.")
  assert s["rougeL"] == pytest.approx(0.5)
  assert s["rougeLsum"] == pytest.approx(1.0)


def test_rouge_evaluate_means_and_cis():
  records = [{"prediction": "a contract term", "reference": "a contract term", "source": "x"},
             {"prediction": "alpha", "reference": "omega", "source": "y"}] * 5
  out = rouge.evaluate(records, _cfg())
  assert out["count"] == 10 and out["rouge1"] == pytest.approx(0.5)
  assert out["rouge1_ci"][0] < 0.5 < out["rouge1_ci"][1]
  assert rouge.evaluate(records, _cfg()) == out


def test_split_sentences():
  assert common.split_sentences("It costs 3.5 dollars. Then e.g. the end!\n  new line \n") == [
      "It costs 3.5 dollars.", "Then e.g. the end!", "new line"]


def test_lead_baselines():
  records = [{"id": 7, "source": "First one here. Second one is here! Third?\nFourth sentence.",
              "reference": "one two three four five", "prediction": "model output"}]
  base = rouge.lead_baselines(records)
  assert base["lead-3"] == [dict(records[0], prediction="First one here.\nSecond one is here!\n"
                                                         "Third?")]
  assert base["lead-N"][0]["prediction"] == "First one here. Second one"
  assert base["lead-K"][0]["prediction"] == "First one"   # as long as the model's 2 words
  assert records[0]["prediction"] == "model output"   # the input records are not changed
  assert rouge.evaluate(base["lead-N"], _cfg())["count"] == 1


def test_paired_difference_is_per_document():
  ref = "the company may end the contract"
  records = [{"id": i, "source": "s", "reference": ref,
              "prediction": ref if i % 2 else "the company may end"} for i in range(20)]
  worse = [dict(r, prediction="nothing alike here") for r in records]
  out = rouge.paired_difference(records, worse, _cfg())
  ours = rouge.evaluate(records, _cfg(bootstrap=0))
  assert out["count"] == 20
  # Every document's difference is positive (the baseline scores 0), so the interval is too.
  assert out["rouge1"] == pytest.approx(ours["rouge1"])
  assert 0 < out["rouge1_ci"][0] <= out["rouge1"] <= out["rouge1_ci"][1]
  # Against itself: exactly zero, with a zero-width interval.
  same = rouge.paired_difference(records, records, _cfg())
  assert same["rougeL"] == 0 and same["rougeL_ci"] == [0, 0]
  with pytest.raises(ValueError, match="other documents"):
    rouge.paired_difference(records, worse[::-1], _cfg())


# --- factual-consistency proxies ----------------------------------------------------------

SUMMARY = ("The Supreme Court fined Acme Corp 5,000 dollars on 12 March 2001. "
           "Judge Smith appealed in 2003.")
SOURCE = ("On March 12, 2001 the supreme court of India fined Acme Corp 5000 dollars. "
          "The appeal was dismissed.")


def test_factual_example_by_hand():
  m = factual.example_metrics(SUMMARY, SOURCE)
  assert m["number_precision"] == pytest.approx(3 / 4)   # 5000, 12, 2001 found; 2003 not
  assert m["date_precision"] == 1.0                      # 12 March 2001 == March 12, 2001
  # Entities: Supreme Court, Acme Corp, March found; Judge Smith not ("The" is dropped).
  assert factual._entities(SUMMARY) == {"Supreme Court", "Acme Corp", "March", "Judge Smith"}
  assert m["entity_precision"] == pytest.approx(3 / 4)
  # 18 distinct summary words; 5, 000, judge, smith, appealed, in, 2003 are not in the source.
  assert m["novel_1gram"] == pytest.approx(7 / 18)
  assert m["compression_ratio"] == pytest.approx(18 / 17)
  assert m["summary_words"] == 17


def test_factual_ngrams_and_undefined_shares():
  m = factual.example_metrics("a b c d e", "a b x c d y y y y y")
  assert [m["novel_1gram"], m["novel_2gram"], m["novel_3gram"]] == pytest.approx([0.2, 0.5, 1.0])
  assert m["compression_ratio"] == 2.0
  assert m["number_precision"] is m["date_precision"] is m["entity_precision"] is None


def test_factual_dates():
  assert factual._dates("2001-03-12, 12th of March, 2001 and Mar. 12 2001") == {(2001, 3, 12)}
  assert factual._dates("12/03/2001 or 12/3/2001") == {("numeric", 12, 3, 2001)}
  assert factual.example_metrics("In March 2001 it ended.",
                                 "signed on 2001-03-12")["date_precision"] == 1.0
  assert factual.example_metrics("On 2001-03-12 it ended.",
                                 "signed on 12/03/2001")["date_precision"] == 0.0


def test_factual_evaluate_skips_undefined():
  records = [{"prediction": SUMMARY, "reference": "", "source": SOURCE},
             {"prediction": "a b c d e", "reference": "", "source": "a b x c d y y y y y"}]
  out = factual.evaluate(records, _cfg())
  assert out["count"] == 2
  assert (out["number_precision"], out["number_precision_count"]) == (pytest.approx(0.75), 1)
  assert out["novel_1gram"] == pytest.approx((7 / 18 + 0.2) / 2)
  assert out["novel_1gram_count"] == 2 and out["summary_words"] == 11.0
  out = factual.evaluate(records[1:], _cfg())
  assert out["date_precision"] is None and out["date_precision_count"] == 0
  json.dumps(out)


# --- slices -------------------------------------------------------------------------------

def _score_mean(records, cfg):
  del cfg
  return {"count": len(records), "score": float(np.mean([r["score"] for r in records])),
          "loss": 1.0}


def test_slices_and_worst():
  records = [{"source": "w " * n, "dataset": d, "score": s}
             for n, d, s in [(1, "a", 0.9), (2, "b", 0.7), (4, "a", 0.5), (5, "b", 0.3),
                             (7, "a", 0.8)]]
  out = slices.evaluate_slices(_score_mean, records, _cfg(length_buckets=(3, 6, 10),
                                                          slice_fields=("dataset",)),
                               higher_is_better=["score", "missing"])
  assert list(out["slices"]) == ["words<3", "words 3-6", "words 6-10", "dataset=a", "dataset=b"]
  assert [m["count"] for m in out["slices"].values()] == [2, 2, 1, 3, 2]
  assert out["slices"]["words 3-6"]["score"] == pytest.approx(0.4)
  assert out["worst"] == {"score": {"slice": "words 3-6", "value": pytest.approx(0.4)}}
  assert slices.length_bucket(6, (3, 6, 10)) == "words 6-10"
  assert slices.length_bucket(10, (3, 6, 10)) == "words>=10"


def test_slices_for_classification_and_errors():
  records = [{"text": "good " * n, "label": y, "probs": p} for n, y, p in
             [(2, 1, [0.2, 0.8]), (3, 0, [0.6, 0.4]), (300, 1, [0.7, 0.3]), (400, 0, [0.9, 0.1])]]
  out = slices.evaluate_slices(classification.evaluate, records, _cfg(length_buckets=(256,)),
                               text_field="text")
  assert out["slices"]["words<256"]["accuracy"] == 1.0
  assert out["worst"]["accuracy"] == {"slice": "words>=256", "value": 0.5}
  with pytest.raises(common.EvalError, match="record 0 has no field 'dataset'"):
    slices.evaluate_slices(classification.evaluate, records, _cfg(slice_fields=("dataset",)),
                           text_field="text")


# --- human-evaluation rubric --------------------------------------------------------------

def _summ_records(n):
  return [{"id": f"doc{i}", "source": f"Source {i}. " + "x" * (2000 if i == 0 else 10),
           "reference": f"ref {i}", "prediction": f"summary {i}"} for i in range(n)]


def _rows(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _fill(sheet, out, rater, factual_scores, concise_scores):
  rows = _rows(sheet)
  for row, fc, co in zip(rows, factual_scores, concise_scores):
    row.update(rater=rater, factual_consistency=str(fc), conciseness=str(co))
  with open(out, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, rubric.COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  return str(out)


def test_rubric_export(tmp_path):
  rows = _rows(rubric.export(_summ_records(8), str(tmp_path / "sheet.csv"), n=5, seed=1))
  assert len(rows) == 5 and list(rows[0]) == list(rubric.COLUMNS)
  assert all(r["factual_consistency"] == r["conciseness"] == r["rater"] == "" for r in rows)
  assert "sheet.csv.rubric.md" in rows[0]["rubric"] and rows[1]["rubric"] == ""
  ids = [r["example_id"] for r in rows]
  assert ids == sorted(ids) and len(set(ids)) == 5
  again = rubric.export(_summ_records(8), str(tmp_path / "again.csv"), n=5, seed=1)
  assert ids == [r["example_id"] for r in _rows(again)]
  text = (tmp_path / "sheet.csv.rubric.md").read_text()
  assert "## factual_consistency" in text and "## conciseness" in text and "**1**" in text
  all_rows = _rows(rubric.export(_summ_records(3), str(tmp_path / "s3.csv"), n=10, seed=0))
  assert len(all_rows) == 3
  assert len(all_rows[0]["source_excerpt"]) == rubric.EXCERPT_CHARS + 3   # cut, "..." added


def test_rubric_report_perfect_and_hand_computed(tmp_path):
  sheet = rubric.export(_summ_records(3), str(tmp_path / "sheet.csv"), n=3, seed=0)
  perfect = [_fill(sheet, tmp_path / f"{r}.csv", r, [1, 3, 5], [2, 2, 4]) for r in "abc"]
  out = rubric.report(perfect)
  assert out["raters"] == ["a", "b", "c"] and out["examples"] == 3
  for criterion in rubric.CRITERIA:
    assert out["criteria"][criterion]["krippendorff_alpha"] == pytest.approx(1.0)
    assert out["criteria"][criterion]["mean_pairwise_kappa"] == pytest.approx(1.0)
    assert out["criteria"][criterion]["kappa_pairs"] == 3
  assert out["criteria"]["factual_consistency"]["mean"] == pytest.approx(3.0)

  # By hand, factual_consistency: pooled 1,2,3,1,2,4 (n=6); only the third example disagrees,
  # D_o = 2 (3-4)^2 / 6 = 1/3, D_e = 2 (6*35 - 13^2) / 30 = 82/30, alpha = 1 - 10/82 = 36/41.
  # Quadratic kappa: weighted observed disagreement 1, by chance 7 -> 1 - 1/7. Conciseness
  # never varies, so both statistics are undefined.
  a = _fill(sheet, tmp_path / "ann.csv", "ann", [1, 2, 3], [5, 5, 5])
  b = _fill(sheet, tmp_path / "bob.csv", "", [1, 2, 4], [5, 5, 5])   # no name: file name
  out = rubric.report([a, b])
  fc, co = out["criteria"]["factual_consistency"], out["criteria"]["conciseness"]
  assert fc["krippendorff_alpha"] == pytest.approx(36 / 41)
  assert fc["mean_pairwise_kappa"] == pytest.approx(6 / 7)
  assert fc["mean"] == pytest.approx(13 / 6) and fc["ratings"] == 6
  assert fc["std"] == pytest.approx(np.std([1, 2, 3, 1, 2, 4], ddof=1))
  assert out["per_rater"] == {"ann": {"factual_consistency": 2.0, "conciseness": 5.0},
                              "bob": {"factual_consistency": pytest.approx(7 / 3),
                                      "conciseness": 5.0}}
  assert co["krippendorff_alpha"] is None and co["mean_pairwise_kappa"] is None
  md = report.render_section(out)
  assert "| factual_consistency | 2.167 | 1.169 | 6 | 0.878 | 0.857 | 1 |" in md


def test_krippendorff_alpha_cases():
  assert rubric.krippendorff_alpha_interval([[1, 1], [2, 2], [3]]) == 1.0   # [3]: unpaired
  # Pooled 1,2,2,1: D_o = (2 + 2) / 4 = 1, D_e = 2 (4*10 - 36) / 12 = 2/3 -> 1 - 1.5.
  assert rubric.krippendorff_alpha_interval([[1, 2], [2, 1]]) == pytest.approx(-0.5)
  assert rubric.krippendorff_alpha_interval([[3], [4]]) is None


@pytest.mark.parametrize("bad", ["6", "", "3.5", "good"])
def test_rubric_bad_score_names_file_row_column(tmp_path, bad):
  sheet = rubric.export(_summ_records(3), str(tmp_path / "sheet.csv"), n=3, seed=0)
  path = _fill(sheet, tmp_path / "carol.csv", "carol", [1, 2, 3], [4, bad, 4])
  with pytest.raises(rubric.RubricError, match=r"carol\.csv: row 3 \(example_id doc1\), "
                                               r"column conciseness: .* not an integer score"):
    rubric.report([path])
  with pytest.raises(rubric.RubricError, match="also rated"):
    good = _fill(sheet, tmp_path / "c2.csv", "carol", [1, 2, 3], [4, 4, 4])
    rubric.report([good, _fill(sheet, tmp_path / "c3.csv", "carol", [1, 2, 3], [4, 4, 4])])


# --- Markdown report ----------------------------------------------------------------------

def test_report_markdown(tmp_path):
  model = {"count": 6, "accuracy": 0.9123, "accuracy_ci": [0.9051, 0.91949], "ece": None,
           "confusion_matrix": [[5, 1], [0, 7]],
           "per_class": [{"class": 0, "precision": 1.0, "recall": 0.8333, "support": 6}],
           "slices": {"slices": {"words<256": {"count": 4, "accuracy": 0.95},
                                 "words>=256": {"count": 2, "accuracy": 0.5}},
                      "worst": {"accuracy": {"slice": "words>=256", "value": 0.5}}}}
  path = report.write_report(str(tmp_path / "r" / "report.md"), "run x",
                             {"model": model, "baseline": {"accuracy": 0.8}}, notes=["steps: 3"])
  text = pathlib.Path(path).read_text()
  assert text == report.render_report("run x", {"model": model, "baseline": {"accuracy": 0.8}},
                                      ["steps: 3"])
  assert text.startswith("# run x\n\n- steps: 3\n")
  for expected in ["## model", "| accuracy | 0.912 [0.905, 0.919] |", "| ece | n/a |",
                   "| 0 | 5 | 1 |", "| 1 | 0 | 7 |", "| 0 | 1.000 | 0.833 | 6 |",
                   "| words<256 | 4 | 0.950 |", "| words>=256 | 2 | **0.500** |",
                   "accuracy: words>=256", "## baseline"]:
    assert expected in text, expected
  table = report.comparison_table({"model": model, "lead-3": {"accuracy": 0.8, "ece": 0.01}},
                                  ["accuracy", "ece", "rouge1"])
  assert table.splitlines() == ["|  | accuracy | ece | rouge1 |", "|---|---|---|---|",
                                "| model | 0.912 [0.905, 0.919] | n/a | - |",
                                "| lead-3 | 0.800 | 0.010 | - |"]


# --- TF-IDF baseline ----------------------------------------------------------------------

def _separable(n, seed):
  rng = np.random.default_rng(seed)
  vocab = [["refund", "late", "breach", "penalty", "terminate"],
           ["grant", "free", "permitted", "royalty", "perpetual"]]
  filler = ["the", "party", "shall", "this", "agreement", "under"]
  return [{"text": " ".join(rng.choice(vocab[i % 2] + filler, 12)), "label": i % 2}
          for i in range(n)]


def test_tfidf_baseline_separable():
  out = tfidf_baseline.run(_separable(80, 0), _separable(40, 1), cfg=_cfg())
  assert out["count"] == 40 and out["accuracy"] >= 0.95 and out["macro_f1"] >= 0.95
  assert 0 < out["num_features"] and out["train_examples"] == 80 and out["train_seconds"] >= 0
  with pytest.raises(common.EvalError, match="tfidf train: record 1 has no 'label' field"):
    tfidf_baseline.run([{"text": "a", "label": 0}, {"text": "b"}], _separable(4, 1))


# --- command lines ------------------------------------------------------------------------

def _cli(*args):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_classification_cli(tmp_path):
  records, labels, probs = _random_classification(20)
  good = tmp_path / "preds.jsonl"
  good.write_text("".join(json.dumps(r) + "\n" for r in records))
  result = _cli("eval.classification", f"--records={good}", f"--out={tmp_path / 'm.json'}",
                "--bootstrap=50")
  assert result.returncode == 0, result.stderr
  assert "| accuracy |" in result.stdout
  saved = json.loads((tmp_path / "m.json").read_text())
  assert saved["accuracy"] == pytest.approx(skm.accuracy_score(labels, probs.argmax(1)))
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(records[0]) + "\n{not json\n")
  result = _cli("eval.classification", f"--records={bad}")
  assert result.returncode == 2 and f"error: {bad}:2: not valid JSON" in result.stderr


@pytest.mark.slow
def test_rubric_cli(tmp_path):
  preds = tmp_path / "preds.jsonl"
  preds.write_text("".join(json.dumps(r) + "\n" for r in _summ_records(4)))
  sheet = tmp_path / "sheet.csv"
  result = _cli("eval.rubric", "export", f"--records={preds}", f"--out={sheet}", "--n=2")
  assert result.returncode == 0, result.stderr
  a = _fill(sheet, tmp_path / "a.csv", "a", [4, 5], [3, 3])
  b = _fill(sheet, tmp_path / "b.csv", "b", [4, 5], [3, 3])
  result = _cli("eval.rubric", "report", a, b)
  assert result.returncode == 0, result.stderr
  assert "| factual_consistency | 4.500 | 0.577 | 4 | 1.000 | 1.000 | 1 |" in result.stdout
