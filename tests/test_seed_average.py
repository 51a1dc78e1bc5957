"""eval/seed_average.py: several runs of one summarization recipe against lead-3 and their own
lead-K, averaged per document, with a bootstrap over runs and documents together."""
import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest

from eval import common, rouge, seed_average

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "court contract party notice terms account data service fee law".split()


def _run(seed: int, n: int = 24) -> list[dict]:
  """Summaries of n fixed documents: each copies a seeded share of the reference's words."""
  rng = np.random.default_rng(seed)
  docs = np.random.default_rng(100)
  records = []
  for i in range(n):
    reference = " ".join(docs.choice(WORDS, 8))
    source = ". ".join(" ".join(docs.choice(WORDS, 6)).capitalize() for _ in range(5)) + "."
    kept = [w if rng.random() < 0.3 + 0.1 * seed else rng.choice(WORDS)
            for w in reference.split()[:6]]
    records.append({"id": f"d{i}", "prediction": " ".join(kept), "reference": reference,
                    "source": source})
  return records


def test_the_runs_are_averaged_per_document_against_lead3_and_their_own_lead_k():
  runs = [_run(s) for s in range(3)]
  cfg = common.eval_config(bootstrap=200)
  out = seed_average.evaluate(runs, ["a", "b", "c"], cfg)
  plain = common.eval_config(bootstrap=0)
  per_run = [rouge.evaluate(r, plain) for r in runs]
  bases = [rouge.lead_baselines(r) for r in runs]
  for m in rouge.METRICS:
    assert out["runs: rouge"][m] == pytest.approx(np.mean([p[m] for p in per_run]))
    assert out["runs: rouge"][f"{m}_between_run_sd"] == pytest.approx(
        np.std([p[m] for p in per_run], ddof=1))
    lead3 = rouge.paired_difference(runs[0], bases[0]["lead-3"], plain)[m]
    assert out["baseline: lead-3: rouge"][m] == pytest.approx(
        rouge.evaluate(bases[0]["lead-3"], plain)[m])
    assert out["paired: runs minus lead-3"][m] == pytest.approx(np.mean(
        [rouge.paired_difference(r, b["lead-3"], plain)[m] for r, b in zip(runs, bases)]))
    assert out["paired: runs minus their lead-K"][m] == pytest.approx(np.mean(
        [rouge.paired_difference(r, b["lead-K"], plain)[m] for r, b in zip(runs, bases)]))
    low, high = out["paired: runs minus lead-3"][m + "_ci"]
    assert low <= out["paired: runs minus lead-3"][m] <= high
  assert lead3 != out["paired: runs minus lead-3"]["rouge1"]  # not just run 0's difference


def test_the_interval_counts_the_runs_disagreement():
  # Two runs that agree on nothing: resampling only documents would see one value (0.5).
  values = np.array([[0.0] * 50, [1.0] * 50])
  assert common.bootstrap_ci(values.mean(axis=0), 1000) == [0.5, 0.5]
  chex.assert_trees_all_close(seed_average.two_level_ci(values, 1000), [0.0, 1.0])
  # Identical runs: only the documents vary, and the interval is the documents' own.
  docs = np.random.default_rng(0).normal(size=200)
  same = seed_average.two_level_ci(np.stack([docs, docs, docs]), 2000)
  chex.assert_trees_all_close(same, common.bootstrap_ci(docs, 2000), atol=0.03)
  assert seed_average.two_level_ci(values, 0) is None


def test_seed_average_names_what_is_wrong(tmp_path):
  a, b = _run(0), _run(1)
  with pytest.raises(common.EvalError, match="1 runs; expected >= 2"):
    seed_average.evaluate([a], ["a"], common.eval_config())
  with pytest.raises(common.EvalError, match="b's 24 records and a's 24 are not the same doc"):
    seed_average.evaluate([a, b[::-1]], ["a", "b"], common.eval_config())
  with pytest.raises(common.EvalError, match="b: record 0 has no 'source' field"):
    seed_average.evaluate([a, [{k: v for k, v in r.items() if k != "source"} for r in b]],
                          ["a", "b"], common.eval_config())
  # The command line: every section printed, and the JSON written.
  paths = []
  for name, records in (("a", a), ("b", b)):
    paths.append(str(tmp_path / f"{name}.jsonl"))
    with open(paths[-1], "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
  proc = subprocess.run([sys.executable, "-m", "eval.seed_average", f"--runs={','.join(paths)}",
                         "--bootstrap=50", f"--out={tmp_path / 'out.json'}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "## paired: runs minus their lead-K (2 runs)" in proc.stdout
  saved = json.loads((tmp_path / "out.json").read_text())
  assert saved["runs: rouge"]["runs"] == 2 and saved["runs: rouge"]["count"] == 24
