"""Paired comparisons of two systems on one test set (eval.classification.paired_difference,
eval/paired.py): per-example differences against values computed by hand and by the per-system
evaluators, the checks that both files hold the same examples, and the command line."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from eval import classification, common, paired

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _cfg(**overrides):
  return common.eval_config(**{"bootstrap": 200, **overrides})


def _records(labels, p_true, ids=True):
  """Binary records where p_true is each example's probability of its own label."""
  out = []
  for i, (y, p) in enumerate(zip(labels, p_true)):
    probs = [p, 1 - p] if y == 0 else [1 - p, p]
    out.append({"label": int(y), "probs": probs, **({"id": f"r{i}"} if ids else {})})
  return out


def _pair(n=400, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  model = rng.uniform(0.3, 1.0, n)        # right where p_true > 0.5: ~71%
  baseline = rng.uniform(0.2, 0.9, n)     # ~57%
  return labels, model, baseline


def test_classification_paired_difference_matches_the_two_evaluations():
  labels, model_p, base_p = _pair()
  model, base = _records(labels, model_p), _records(labels, base_p)
  out = classification.paired_difference(model, base, _cfg())
  ours, theirs = classification.evaluate(model, _cfg()), classification.evaluate(base, _cfg())
  assert out["count"] == 400
  assert out["accuracy"] == pytest.approx(ours["accuracy"] - theirs["accuracy"])
  assert out["nll"] == pytest.approx(ours["nll"] - theirs["nll"])
  # Discordant pairs by hand; their difference over n is the accuracy difference.
  model_right, base_right = model_p > 0.5, base_p > 0.5
  assert out["model_only_correct"] == int((model_right & ~base_right).sum())
  assert out["baseline_only_correct"] == int((base_right & ~model_right).sum())
  assert (out["model_only_correct"] - out["baseline_only_correct"]) / 400 == pytest.approx(
      out["accuracy"])
  # ~14 points better on 400 examples: the paired interval is above zero...
  low, high = out["accuracy_ci"]
  assert 0 < low <= out["accuracy"] <= high
  # ... and narrower than the per-system intervals it replaces.
  assert high - low < ours["accuracy_ci"][1] - ours["accuracy_ci"][0] + (
      theirs["accuracy_ci"][1] - theirs["accuracy_ci"][0])
  # Against itself: exactly zero, a zero-width interval, no discordant pair.
  same = classification.paired_difference(model, model, _cfg())
  assert (same["accuracy"], same["accuracy_ci"], same["nll"]) == (0, [0, 0], 0)
  assert same["model_only_correct"] == same["baseline_only_correct"] == 0


def test_classification_paired_difference_needs_the_same_examples():
  labels, model_p, base_p = _pair(20)
  model, base = _records(labels, model_p), _records(labels, base_p)
  with pytest.raises(common.EvalError, match="not the same examples"):
    classification.paired_difference(model, base[:19], _cfg())
  with pytest.raises(common.EvalError, match="not the same examples"):   # ids reordered
    classification.paired_difference(model, base[1:] + base[:1], _cfg())
  flipped = [dict(b, label=1 - b["label"]) for b in base]
  with pytest.raises(common.EvalError, match="not the same examples"):
    classification.paired_difference(model, flipped, _cfg())
  # A baseline without ids (e.g. scored elsewhere) is matched by label and order alone.
  no_ids = _records(labels, base_p, ids=False)
  assert classification.paired_difference(model, no_ids, _cfg())["count"] == 20


def test_paired_dispatches_on_the_records_fields():
  labels, model_p, base_p = _pair(30)
  model, base = _records(labels, model_p), _records(labels, base_p)
  assert paired.paired_difference(model, base, _cfg()) == classification.paired_difference(
      model, base, _cfg())
  ref = "the company may end the contract"
  summaries = [{"id": i, "reference": ref, "prediction": ref} for i in range(3)]
  rouge_out = paired.paired_difference(summaries, summaries, _cfg())
  assert rouge_out["rouge1"] == 0 and rouge_out["count"] == 3
  with pytest.raises(common.EvalError, match="neither 'probs'.*has \\['label'\\]"):
    paired.paired_difference([{"label": 0}], [{"label": 0}], _cfg())


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "eval.paired", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_paired_cli(tmp_path):
  labels, model_p, base_p = _pair(50)
  files = {}
  for name, p in (("model", model_p), ("base", base_p)):
    files[name] = tmp_path / f"{name}.jsonl"
    files[name].write_text("".join(json.dumps(r) + "\n" for r in _records(labels, p)))
  result = _cli(f"--records={files['model']}", f"--baseline={files['base']}",
                f"--out={tmp_path / 'd.json'}", "--bootstrap=50")
  assert result.returncode == 0, result.stderr
  assert "| model_only_correct |" in result.stdout
  saved = json.loads((tmp_path / "d.json").read_text())
  assert saved == classification.paired_difference(
      _records(labels, model_p), _records(labels, base_p), _cfg(bootstrap=50))
  files["base"].write_text(files["base"].read_text().splitlines()[0] + "\n")
  result = _cli(f"--records={files['model']}", f"--baseline={files['base']}")
  assert result.returncode == 2 and "not the same examples" in result.stderr
