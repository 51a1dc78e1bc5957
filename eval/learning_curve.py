r"""Test accuracy against pre-training tokens: the learning curves of classifiers fine-tuned from
the kept steps of pre-training runs (and, at 0 tokens, from scratch), one curve per model shape.

  python -m eval.learning_curve --runs=runs/curve_scratch,runs/curve_500,runs/curve_2000 \
      --out=docs/imdb_self_curve.png

Each run is a finished fine-tuning workdir. Its x value is the pre-training its
`train.init_from` names: <pretrain workdir>/checkpoints/<step>, i.e. step x that run's
data.batch_size x data.seq_len tokens (no init_from: 0). A bare workdir is refused, since its
newest step moves while the pre-training goes on. Its y value is the test accuracy with a 95%
bootstrap CI, recomputed by eval.classification from the run's test_predictions.jsonl; the
TF-IDF + logistic regression baseline its report measured on the same test split is drawn
as a line. Points are grouped into curves by the fine-tuned model's shape (layers x d_model,
which a fine-tune adopts from its LM), so a wider LM's points draw a second curve beside the
first: the width comparison at equal tokens. Prints (and with --md writes) the Markdown table
docs/results/imdb.md shows.

Workdirs rarely outlive the machine they ran on, so a curve is kept as data: --save_points
writes every point as a line of JSON (docs/imdb_self_curve.jsonl), and --points reads such
files back, so a new run extends the curve without re-running the runs already saved:

  python -m eval.learning_curve --points=docs/imdb_self_curve.jsonl --runs=runs/curve_4500 \
      --save_points=docs/imdb_self_curve.jsonl --out=docs/imdb_self_curve.png
"""
import json
import os

from absl import app, flags

from configs import common as configs_common
from eval import classification, common, report
from model import checkpoint as checkpoint_lib
from model import errors

TFIDF_SPLIT = "test/baseline/tf-idf_+_logistic_regression"


def _read_json(path: str, what: str) -> dict:
  if not os.path.isfile(path):
    raise common.EvalError(f"{path}: no such file (expected {what})")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def pretraining(config: dict, run: str) -> tuple[int, int]:
  """(pre-training step, tokens) behind the fine-tune whose config.json is `config`."""
  init_from = config["train"]["init_from"]
  if not init_from:
    return 0, 0
  workdir, step = checkpoint_lib.split_step_path(init_from)
  if step is None:
    raise common.EvalError(
        f"{run}: train.init_from={init_from} is a workdir, whose newest step moves while it "
        "trains; fine-tune from <workdir>/checkpoints/<step> for a learning curve")
  data = _read_json(os.path.join(workdir, "config.json"), "the pre-training run's config")["data"]
  return step, step * data["batch_size"] * data["seq_len"]


def window_stride(config: dict) -> int:
  """The run's eval.window_stride: > 0 when its evaluation read long reviews whole."""
  return config["eval"]["window_stride"]


def model_shape(config: dict) -> str:
  """The curve a run belongs to: its model's depth and width, and whether its evaluation read
  long reviews whole (eval.window_stride > 0), which moves test accuracy as much as tokens do."""
  model = config["model"]
  stride = window_stride(config)
  return (f"{model['num_layers']} layers x d_model {model['d_model']}"
          + (f", windows at stride {stride}" if stride else ""))


def point(run: str, bootstrap: int) -> dict:
  """One fine-tuning run's row: pre-training it started from, test and validation results."""
  config = configs_common.upgrade(
      _read_json(os.path.join(run, "config.json"), "a fine-tuning run's config.json"))
  step, tokens = pretraining(config, run)
  test = classification.evaluate(
      common.read_jsonl(os.path.join(run, "test_predictions.jsonl")),
      common.eval_config(bootstrap=bootstrap))
  rows = common.read_jsonl(os.path.join(run, "metrics.jsonl"))
  # The state the test scored: the best validation loss (the loop keeps that one). Its loss
  # and accuracy as the test read them: on truncated rows, or with windows the evaluator's
  # validation/classification row (nll, accuracy) at that step.
  best = min((r for r in rows if r["split"] == "validation"), key=lambda r: r["loss"],
             default={})
  if window_stride(config) and best:
    windowed = [r for r in rows if r["split"] == "validation/classification"
                and r["step"] == best["step"]]
    best = {"loss": windowed[-1]["nll"], "accuracy": windowed[-1]["accuracy"]} if windowed else {}
  tfidf = [r["accuracy"] for r in rows if r["split"] == TFIDF_SPLIT]
  return {"run": run, "step": step, "tokens": tokens, "accuracy": test["accuracy"],
          "accuracy_ci": test["accuracy" + report.CI_SUFFIX], "macro_f1": test["macro_f1"],
          "count": test["count"], "tfidf": tfidf[-1] if tfidf else None,
          "validation_loss": best.get("loss"), "validation_accuracy": best.get("accuracy"),
          "model": model_shape(config)}


POINT_KEYS = ("run", "step", "tokens", "accuracy", "accuracy_ci", "macro_f1", "count", "tfidf",
              "validation_loss", "validation_accuracy", "model")


def read_points(path: str) -> list[dict]:
  """Points saved by --save_points; a line without one of POINT_KEYS is refused by name (other
  keys, e.g. a "note" on where a point was measured, are kept)."""
  points = common.read_jsonl(path)
  for i, p in enumerate(points, 1):
    missing = [k for k in POINT_KEYS if k not in p]
    if missing:
      raise common.EvalError(f"{path}:{i}: a curve point needs {', '.join(missing)} "
                             f"(expected the keys {', '.join(POINT_KEYS)})")
  return points


def run_name(p: dict) -> str:
  """A point's run by its last path component: how the table names it and how a run measured
  now is matched with its saved point."""
  return os.path.basename(p["run"].rstrip("/"))


def merge(saved: list[dict], measured: list[dict]) -> list[dict]:
  """All points by model shape, then pre-training tokens; a run measured now replaces a saved
  point of the same run name."""
  fresh = {run_name(p) for p in measured}
  return sorted([p for p in saved if run_name(p) not in fresh] + measured,
                key=lambda p: (p["model"], p["tokens"]))


def curve(runs: list[str], point_files: list[str], bootstrap: int,
          save_to: str | None = None) -> list[dict]:
  """The points of `runs` and of the saved `point_files`, merged; with `save_to`, all of them
  written there for the next extension of the curve."""
  if not (runs or point_files):
    raise common.EvalError("nothing to draw: give --runs (fine-tuning workdirs) and/or --points "
                           "(saved curve points)")
  saved = [p for path in point_files for p in read_points(path)]
  points = merge(saved, [point(r, bootstrap) for r in runs])
  if save_to:
    with open(save_to, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(p) + "\n" for p in points)   # with any note a saved point has
  return points


def table(points: list[dict]) -> str:
  lines = ["| model | pre-training tokens | step | test accuracy [95% CI] | macro F1 | validation "
           "loss / accuracy | TF-IDF + LR | run |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for p in points:
    low, high = p["accuracy_ci"]
    val = ("" if p["validation_loss"] is None else
           f"{p['validation_loss']:.4f} / {p['validation_accuracy']:.4f}")
    tfidf = "" if p["tfidf"] is None else f"{p['tfidf']:.4f}"
    lines.append(f"| {p['model']} | {p['tokens'] / 1e6:.1f}M | {p['step']} | {p['accuracy']:.4f} "
                 f"[{low:.4f}, {high:.4f}] | {p['macro_f1']:.4f} | {val} | {tfidf} | "
                 f"{run_name(p)} |")
  return "\n".join(lines)


def plot(points: list[dict], out: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for shape in sorted({p["model"] for p in points}):
    curve_points = sorted((p for p in points if p["model"] == shape), key=lambda p: p["tokens"])
    xs = [p["tokens"] / 1e6 for p in curve_points]
    ys = [p["accuracy"] for p in curve_points]
    errors = [[y - p["accuracy_ci"][0] for y, p in zip(ys, curve_points)],
              [p["accuracy_ci"][1] - y for y, p in zip(ys, curve_points)]]
    ax.errorbar(xs, ys, yerr=errors, fmt="o-", capsize=4, label=f"{shape} (95% CI)")
  baselines = [p["tfidf"] for p in points if p["tfidf"] is not None]
  if baselines:
    ax.axhline(baselines[-1], color="gray", ls="--", label=f"TF-IDF + LR ({baselines[-1]:.3f})")
  ax.set(xlabel="pre-training tokens (millions)", ylabel="test accuracy", title=title)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  fl = flags.FLAGS
  points = curve(fl.runs or [], fl.points or [], fl.bootstrap, fl.save_points)
  text = table(points)
  print(text)
  if fl.md:
    with open(fl.md, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  if fl.out:
    plot(points, fl.out, fl.title)
    print(f"wrote {fl.out}")


if __name__ == "__main__":
  flags.DEFINE_list("runs", None, "Finished fine-tuning workdirs, one per curve point.")
  flags.DEFINE_list("points", None, "JSONL files of points saved by --save_points (runs that "
                    "may no longer exist); a run in --runs replaces a saved point of its name.")
  flags.DEFINE_string("save_points", None, "Write every point (saved and measured) here, one "
                      "JSON line each, to extend the curve later.")
  flags.DEFINE_string("out", None, "Write the plot here (.png).")
  flags.DEFINE_string("md", None, "Also write the Markdown table here.")
  flags.DEFINE_string("title", "accuracy vs pre-training tokens", "The plot's title.")
  flags.DEFINE_integer("bootstrap", 1000, "Resamples for the accuracy CIs.")
  app.run(errors.exit_on_user_error(main))
