r"""ROUGE-1/2/L/Lsum of generated summaries, with bootstrap 95% CIs, and lead-k baselines.

  python -m eval.rouge --records=test_predictions.jsonl [--out=metrics.json]

Records: `{"prediction": str, "reference": str, "source": str, ...}`. Scores are F-measures from
Google's `rouge_score` (the reference implementation behind most published numbers) with the
Porter stemmer; each is averaged over examples (macro), with a percentile bootstrap CI over
examples. ROUGE-Lsum scores the union LCS over sentences, so both texts are given to it with
one sentence per line (common.split_sentences); ROUGE-1/2/L ignore line breaks.

`lead_baselines(records)` returns the classic extractive baselines as records of the same
shape, so they are scored by this same `evaluate` (and sliced and reported the same way):
- lead-3: the first 3 sentences of the source.
- lead-N: the first N words of the source, N = the reference's length in words, so the
  baseline is as long as the reference (ROUGE F rewards the right length).
"""
import functools
import re

from eval import common

NAME = "rouge"
METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_FIELDS = {"prediction": str, "reference": str, "source": str}


@functools.lru_cache(maxsize=1)
def _scorer():
  from rouge_score import rouge_scorer
  return rouge_scorer.RougeScorer(list(METRICS), use_stemmer=True)


def _lines(text: str) -> str:
  return "\n".join(common.split_sentences(text))


# ROUGE-L is a pure-Python LCS (quadratic in the texts' lengths), and eval/slices.py scores each
# example again in every slice it belongs to: remember recent pairs instead.
@functools.lru_cache(maxsize=20_000)
def _fmeasures(prediction: str, reference: str) -> tuple[float, ...]:
  result = _scorer().score(target=_lines(reference), prediction=_lines(prediction))
  return tuple(float(result[m].fmeasure) for m in METRICS)


def scores(prediction: str, reference: str) -> dict[str, float]:
  """{metric: F-measure} for one pair."""
  return dict(zip(METRICS, _fmeasures(prediction, reference)))


def evaluate(records: list[dict], cfg) -> dict:
  common.check_fields(records, _FIELDS, NAME)
  per_example = [scores(r["prediction"], r["reference"]) for r in records]
  out = {"count": len(records)}
  for m in METRICS:
    common.add_mean(out, m, [s[m] for s in per_example], cfg)
  return out


def _first_words(text: str, n: int) -> str:
  """The source up to its n-th word, keeping its own spacing and line breaks."""
  ends = [m.end() for m in re.finditer(r"\S+", text)]
  return text[:ends[min(n, len(ends)) - 1]] if ends and n > 0 else ""


def lead_baselines(records: list[dict]) -> dict[str, list[dict]]:
  """Copies of `records` with "prediction" taken from the source: "lead-3" (sentences),
  "lead-N" (N = the reference's length in words, an oracle length) and "lead-K" (K = the
  model's own prediction length in words: extraction at equal length, the fair comparison)."""
  common.check_fields(records, _FIELDS, NAME)
  return {
      "lead-3": [dict(r, prediction="\n".join(common.split_sentences(r["source"])[:3]))
                 for r in records],
      "lead-N": [dict(r, prediction=_first_words(r["source"], len(r["reference"].split())))
                 for r in records],
      "lead-K": [dict(r, prediction=_first_words(r["source"], len(r["prediction"].split())))
                 for r in records],
  }


def check_same_documents(runs: list[list[dict]], names: list[str]) -> None:
  """Raises EvalError unless every run's records (named by `names`, e.g. their files) are
  summaries with an id and the fields the evaluator reads, of run 0's documents in run 0's order (same
  ids and references): several systems compared or combined document by document."""
  key = lambda records: [(r["id"], r["reference"]) for r in records]
  for name, records in zip(names, runs):
    common.check_fields(records, {"id": str, **_FIELDS}, name)
    if key(records) != key(runs[0]):
      raise common.EvalError(f"{name}'s {len(records)} records and {names[0]}'s "
                             f"{len(runs[0])} are not the same documents in the same order "
                             "(ids or references differ)")


def paired_difference(records: list[dict], baseline: list[dict], cfg) -> dict:
  """The model's score minus the baseline's on each document, averaged, with a bootstrap CI
  over documents: an interval above zero says the model beats the baseline on this test set
  (overlapping per-system CIs cannot say either way)."""
  if [r.get("id") for r in records] != [b.get("id") for b in baseline]:
    raise common.EvalError("rouge paired difference: the records and the baseline hold other "
                           "documents (ids differ)")
  ours = [_fmeasures(r["prediction"], r["reference"]) for r in records]
  theirs = [_fmeasures(b["prediction"], b["reference"]) for b in baseline]
  out = {"count": len(records)}
  for i, m in enumerate(METRICS):
    common.add_mean(out, m, [a[i] - b[i] for a, b in zip(ours, theirs)], cfg)
  return out


if __name__ == "__main__":
  common.run_cli(evaluate, "ROUGE")
