r"""Human evaluation of summaries: export a rating sheet, read the filled sheets back, report.

  python -m eval.rubric export --records=test_predictions.jsonl --out=sheet.csv [--n=20] [--seed=0]
  python -m eval.rubric report sheet_alice.csv sheet_bob.csv [--out=rubric.json]

Why: ROUGE and the factual proxies (eval/factual.py) are automatic stand-ins; whether a legal
summary is faithful and concise is finally a human judgment, and it is only worth reporting
with the raters' agreement beside it.

`export` samples `n` examples (seeded) into a CSV sheet, one row each: example_id,
source_excerpt (the first 1500 characters), reference, model_summary, and empty cells for
rater, factual_consistency (1-5), conciseness (1-5) and comments. The rubric (what each score
means) is written beside it as `<sheet>.rubric.md`, and summarised in the first row of a last
"rubric" column, so the sheet carries its instructions and still loads as a plain table.
Each rater fills a copy of the sheet (their name in "rater").

`report` reads the filled copies (one per rater), checks every score is an integer 1-5 (an
error names the file, row and column), and returns per criterion the mean and sample standard
deviation over all ratings, each rater's mean, Krippendorff's alpha (interval metric: the
scores are ordered and equally spaced) over all raters, and the mean quadratic-weighted Cohen's
kappa over pairs of raters, both on the examples rated by more than one rater. An agreement
statistic is None ("n/a") when undefined: fewer than two ratings of any example, or no
variation in the scores at all.
"""
import csv
import itertools
import os
import random

from absl import app, flags
import numpy as np

from eval import common
from model import errors

CRITERIA = ("factual_consistency", "conciseness")
COLUMNS = ("example_id", "source_excerpt", "reference", "model_summary", "rater") + CRITERIA + (
    "comments", "rubric")
EXCERPT_CHARS = 1500
SCORES = (1, 2, 3, 4, 5)

RUBRIC = {
    "factual_consistency": {
        5: "Every statement is supported by the source: parties, amounts, dates, obligations "
           "and outcomes are right.",
        4: "Supported, apart from a minor imprecision that does not change the meaning.",
        3: "One material error or unsupported claim; the rest is right.",
        2: "Several errors or unsupported claims, or one that reverses an obligation or the "
           "outcome.",
        1: "Mostly unsupported by or contradicting the source, or unrelated to it.",
    },
    "conciseness": {
        5: "No redundant or irrelevant content: every sentence carries needed information.",
        4: "A little repetition or a minor detail that could be cut.",
        3: "Noticeable padding, repetition or boilerplate copied from the source.",
        2: "Much of the summary is repetition or irrelevant detail.",
        1: "Mostly repetition or filler; the point is hard to find.",
    },
}


class RubricError(common.EvalError):
  """A rating sheet that cannot be read or holds an invalid score."""


def rubric_markdown() -> str:
  lines = ["# Human-evaluation rubric", "",
           "Rate each example's model_summary against its source (the reference summary is "
           "context, not the truth standard). Write your name in `rater` and an integer 1-5 in "
           "each criterion column; use `comments` for anything notable.", ""]
  for criterion, levels in RUBRIC.items():
    lines += [f"## {criterion}", ""] + [f"- **{s}**: {levels[s]}" for s in sorted(levels,
                                                                                 reverse=True)]
    lines.append("")
  return "\n".join(lines)


def export(records: list[dict], path: str, n: int, seed: int = 0) -> str:
  """Writes the sheet of `n` sampled examples (and its rubric beside it); returns `path`."""
  common.check_fields(records, {"prediction": str, "reference": str, "source": str}, "rubric")
  if n <= 0:
    raise RubricError(f"rubric export: n={n}; expected a positive number of examples")
  chosen = sorted(random.Random(seed).sample(range(len(records)), min(n, len(records))))
  rubric_path = path + ".rubric.md"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(rubric_path, "w", encoding="utf-8") as f:
    f.write(rubric_markdown())
  summary = (f"Integers 1-5 in {' and '.join(CRITERIA)}; full rubric in "
             f"{os.path.basename(rubric_path)}. " +
             " ".join(f"{c}: 5 = {RUBRIC[c][5]} 1 = {RUBRIC[c][1]}" for c in CRITERIA))
  with open(path, "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, COLUMNS)
    writer.writeheader()
    for k, i in enumerate(chosen):
      r = records[i]
      excerpt = r["source"][:EXCERPT_CHARS] + ("..." if len(r["source"]) > EXCERPT_CHARS else "")
      writer.writerow({"example_id": str(r.get("id", i)), "source_excerpt": excerpt,
                       "reference": r["reference"], "model_summary": r["prediction"],
                       "rubric": summary if k == 0 else ""})
  return path


def _read_sheet(path: str) -> tuple[str, dict[str, dict[str, int]]]:
  """(rater name, {criterion: {example_id: score}}) of one filled sheet."""
  if not os.path.isfile(path):
    raise RubricError(f"{path}: no such rating sheet")
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in ("example_id", "rater") + CRITERIA if c not in (reader.fieldnames or [])]
    if missing:
      raise RubricError(f"{path}: missing column(s) {missing}; expected the columns of an "
                        f"exported sheet {list(COLUMNS)}")
    scores = {c: {} for c in CRITERIA}
    raters = set()
    for row_no, row in enumerate(reader, 2):   # spreadsheet numbering: the header is row 1
      example = row["example_id"]
      if example in scores[CRITERIA[0]]:
        raise RubricError(f"{path}: row {row_no}: example_id {example!r} appears twice")
      for criterion in CRITERIA:
        text = (row[criterion] or "").strip()
        if text not in {str(s) for s in SCORES}:
          raise RubricError(f"{path}: row {row_no} (example_id {example}), column {criterion}: "
                            f"{text!r} is not an integer score 1-5")
        scores[criterion][example] = int(text)
      if (row["rater"] or "").strip():
        raters.add(row["rater"].strip())
  if not scores[CRITERIA[0]]:
    raise RubricError(f"{path}: no rated rows")
  if len(raters) > 1:
    raise RubricError(f"{path}: several raters {sorted(raters)}; expected one rater per sheet")
  rater = raters.pop() if raters else os.path.splitext(os.path.basename(path))[0]
  return rater, scores


def _pair_sum(v: np.ndarray) -> float:
  """sum over ordered pairs i != j of (v_i - v_j)^2, which is 2 (m sum v^2 - (sum v)^2)."""
  return 2.0 * (v.size * np.sum(v ** 2) - np.sum(v) ** 2)


def krippendorff_alpha_interval(units: list[list[float]]) -> float | None:
  """Krippendorff's alpha, interval metric, for units (examples) holding their ratings.

  alpha = 1 - D_o / D_e over the pairable values (units with >= 2 ratings), n of them:
  D_o = (1/n) sum_u 1/(m_u - 1) sum_{i != j in u} (v_i - v_j)^2   (within-unit disagreement)
  D_e = 1/(n (n - 1)) sum_{i != j over all n} (v_i - v_j)^2       (disagreement by chance).
  """
  units = [np.asarray(u, np.float64) for u in units if len(u) >= 2]
  if not units:
    return None
  pooled = np.concatenate(units)
  n = pooled.size
  observed = sum(_pair_sum(u) / (u.size - 1) for u in units) / n
  expected = _pair_sum(pooled) / (n * (n - 1))
  return None if expected == 0 else float(1.0 - observed / expected)


def _mean_pairwise_kappa(by_rater: dict[str, dict[str, int]]) -> tuple[float | None, int]:
  """(mean quadratic-weighted Cohen's kappa over rater pairs, number of pairs it averages)."""
  from sklearn.metrics import cohen_kappa_score
  kappas = []
  for a, b in itertools.combinations(sorted(by_rater), 2):
    shared = sorted(set(by_rater[a]) & set(by_rater[b]))
    if len(shared) < 2:
      continue
    scores_a, scores_b = [by_rater[a][e] for e in shared], [by_rater[b][e] for e in shared]
    if len(set(scores_a) | set(scores_b)) < 2:   # one score throughout: kappa is 0/0
      continue
    kappas.append(float(cohen_kappa_score(scores_a, scores_b, labels=list(SCORES),
                                          weights="quadratic")))
  return (float(np.mean(kappas)) if kappas else None), len(kappas)


def report(paths: list[str]) -> dict:
  """Per-criterion means, spreads and agreement of the filled sheets at `paths`."""
  if not paths:
    raise RubricError("rubric report: no sheets given")
  sheets = {}
  for path in paths:
    rater, scores = _read_sheet(path)
    if rater in sheets:
      raise RubricError(f"{path}: rater {rater!r} also rated {sheets[rater][0]}; expected one "
                        f"sheet per rater")
    sheets[rater] = (path, scores)
  raters = sorted(sheets)
  examples = sorted({e for _, scores in sheets.values() for e in scores[CRITERIA[0]]})
  criteria, per_rater = {}, {r: {} for r in raters}
  for criterion in CRITERIA:
    by_rater = {r: sheets[r][1][criterion] for r in raters}
    everything = np.asarray([s for scores in by_rater.values() for s in scores.values()],
                            np.float64)
    units = [[by_rater[r][e] for r in raters if e in by_rater[r]] for e in examples]
    kappa, pairs = _mean_pairwise_kappa(by_rater)
    criteria[criterion] = {
        "mean": float(everything.mean()),
        "std": float(everything.std(ddof=1)) if everything.size > 1 else 0.0,
        "ratings": int(everything.size),
        "krippendorff_alpha": krippendorff_alpha_interval(units),
        "mean_pairwise_kappa": kappa,
        "kappa_pairs": pairs,
    }
    for r in raters:
      per_rater[r][criterion] = float(np.mean(list(by_rater[r].values())))
  return {"raters": raters, "examples": len(examples), "criteria": criteria,
          "per_rater": per_rater}


def main(argv):
  fl = flags.FLAGS
  command, args = (argv[1], argv[2:]) if len(argv) > 1 else (None, [])
  if command == "export":
    if args or not fl.records or not fl.out:
      raise app.UsageError("usage: export --records=preds.jsonl --out=sheet.csv [--n=20]")
    records = common.read_jsonl(fl.records)
    path = export(records, fl.out, fl.n, fl.seed)
    print(f"wrote {path} ({min(fl.n, len(records))} examples) and {path}.rubric.md; give each "
          f"rater a copy")
  elif command == "report":
    if not args:
      raise app.UsageError("usage: report sheet_a.csv sheet_b.csv ... [--out=rubric.json]")
    common.print_and_save(report(args), "human evaluation", fl.out)
  else:
    raise app.UsageError(f"expected a command, export or report; got {argv[1:]}")


if __name__ == "__main__":
  flags.DEFINE_string("records", None, "export: predictions, one JSON record per line.")
  flags.DEFINE_string("out", None, "export: the sheet to write; report: also write JSON here.")
  flags.DEFINE_integer("n", 20, "export: examples to sample.")
  flags.DEFINE_integer("seed", 0, "export: sampling seed.")
  app.run(errors.exit_on_user_error(main))
