r"""Several runs of one summarization recipe (other seeds, other starts) against the lead
baselines: the recipe's expected ROUGE, with CIs that count both documents and runs.

  python -m eval.seed_average --runs=runs/a/test_predictions.jsonl,runs/b/test_predictions.jsonl \
      [--bootstrap=1000] [--out=seed_average.json]

Why: on a small test set one run's paired difference to lead-3 moves with its seed as much as
with its recipe (on 64 plain-English pairs two seeds of one recipe scored 0.218 and 0.269
ROUGE-1), so neither run's CI says whether the recipe beats the baseline. Averaging the runs
per document removes part of the seed noise; the CI here resamples documents and runs together
(a two-level bootstrap: each resample draws the runs with replacement, then the documents),
so it widens when the runs disagree instead of treating the runs at hand as the recipe. It
answers "does a run of this recipe, on average, beat lead-k on documents like these" - not
whether any one run does, and not the consensus of the runs (train.ensemble).

Each file is one run's summaries (train.redecode's or a finished run's test_predictions.jsonl)
of the same documents in the same order. Lead-3 is the same text for every run; lead-K is each
run's own (K = that run's summary length), differenced per run before averaging.
"""
import json

from absl import app, flags
import numpy as np

from eval import common, report, rouge
from model import errors

NAME = "seed_average"




def _f(records: list[dict]) -> np.ndarray:
  """[documents, len(rouge.METRICS)] ROUGE F-measures."""
  return np.array([list(rouge.scores(r["prediction"], r["reference"]).values())
                   for r in records], np.float64)


def two_level_ci(values: np.ndarray, n_resamples: int, seed: int = 0) -> list[float] | None:
  """95% percentile interval of values.mean() ([runs, documents]) over resamples that draw
  runs, then documents, with replacement (None when n_resamples is 0)."""
  if n_resamples <= 0:
    return None
  rng = np.random.default_rng(seed)
  k, n = values.shape
  runs = rng.integers(0, k, size=(n_resamples, k))
  docs = rng.integers(0, n, size=(n_resamples, n))
  per_doc = values[runs].mean(axis=1)                        # [resamples, documents]
  means = np.take_along_axis(per_doc, docs, axis=1).mean(axis=1)
  low, high = np.percentile(means, [2.5, 97.5])
  return [float(low), float(high)]


def _section(values: np.ndarray, cfg) -> dict:
  """values: [runs, documents, metrics] -> each metric's mean, two-level CI, and the SD of
  the runs' own means (how far apart the seeds landed)."""
  out = {"runs": values.shape[0], "count": values.shape[1]}
  for i, metric in enumerate(rouge.METRICS):
    out[metric] = float(values[:, :, i].mean())
    ci = two_level_ci(values[:, :, i], int(cfg.bootstrap), seed=i)
    if ci is not None:
      out[metric + report.CI_SUFFIX] = ci
    if values.shape[0] > 1:
      out[f"{metric}_between_run_sd"] = float(values[:, :, i].mean(axis=1).std(ddof=1))
  return out


def evaluate(runs: list[list[dict]], names: list[str], cfg) -> dict[str, dict]:
  """{section: metrics}: the runs' mean ROUGE ("runs: rouge"), lead-3's, and the runs minus
  lead-3 and minus their own lead-K ("paired: runs minus lead-3", "... lead-K")."""
  if len(runs) < 2 or len(names) != len(runs):
    raise common.EvalError(f"{NAME}: {len(runs)} runs; expected >= 2, one name each")
  try:
    rouge.check_same_documents(runs, names)
  except common.EvalError as e:
    raise common.EvalError(f"{NAME}: {e}") from None
  ours = np.stack([_f(records) for records in runs])          # [runs, documents, metrics]
  lead3 = _f(rouge.lead_baselines(runs[0])["lead-3"])
  lead_k = np.stack([_f(rouge.lead_baselines(records)["lead-K"]) for records in runs])
  return {"runs: rouge": _section(ours, cfg),
          "baseline: lead-3: rouge": _section(lead3[None], cfg),
          "paired: runs minus lead-3": _section(ours - lead3[None], cfg),
          "paired: runs minus their lead-K": _section(ours - lead_k, cfg)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fl = flags.FLAGS
  cfg = common.eval_config()
  if fl.bootstrap is not None:
    cfg.bootstrap = fl.bootstrap
  sections = evaluate([common.read_jsonl(p) for p in fl.runs], fl.runs, cfg)
  for name, metrics in sections.items():
    common.print_and_save(metrics, f"{name} ({len(fl.runs)} runs)", None)
  if fl.out:
    with open(fl.out, "w", encoding="utf-8") as f:
      json.dump(sections, f, indent=2)
    print(f"wrote {fl.out}")


if __name__ == "__main__":
  flags.DEFINE_list("runs", None, "test_predictions.jsonl files of the runs (>= 2), comma-"
                    "separated: the same documents in the same order.")
  flags.DEFINE_integer("bootstrap", None, "Resamples for 95% CIs (default: config.eval's).")
  flags.DEFINE_string("out", None, "Also write every section's metrics here as JSON.")
  flags.mark_flag_as_required("runs")
  app.run(errors.exit_on_user_error(main))
