r"""Several fine-tuned runs as one, scored as a run's own test evaluation is (every evaluator,
per slice, the baselines beside it, paired): classifiers by the mean of their class
probabilities (TF-IDF + LR beside them), summarizers by the consensus of their summaries
(infer/ensemble.py: per document the member's summary that agrees most with the others; lead-3
and lead-K beside it).

  python -m train.ensemble --members=runs/a,runs/b,runs/c --out=runs/abc
  python -m train.ensemble --members=runs/a_val,runs/b_val --config_from=runs/a --out=runs/ab_val

A member is a directory holding test_predictions.jsonl: a finished run, or a
`train.redecode --out` (with `--split=validation`, so that whether to ensemble, and which runs,
is decided on validation before the test split is scored). Every member must hold the same
examples in the same order. The data - the train split the TF-IDF baseline is fitted on, and
the splits the records are checked against - come from --config_from's config.json, by default
the first member's. Which split was scored is read from the records' ids: all in the config's
test split, its validation split, or its train split (`train.redecode --split=train`: an
ensemble's probabilities on the train examples, to distil from offline -
`distill.offline_teacher`).

Why: fine-tunes from other seeds or other pre-training checkpoints disagree on a few percent of
examples (and small summarizers each fall back on their own generic summaries); combining them
is the cheap gain left once one recipe has plateaued, at the cost of one forward pass (or one
decode) per member at inference.
"""
import json
import os

from absl import app, flags
import ml_collections

from configs import common as configs_common
from eval import classification, common, rouge
from infer import ensemble as infer_ensemble
from infer import rerank
from model import errors
from model import log_setup
from model.task_kind import task_kind
from train import config_check, final_eval
from train.data import examples as examples_lib

PREDICTIONS = final_eval.PREDICTIONS


def _run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise config_check.ConfigError(
        f"{path}: no such file; --config_from must be a finished run's workdir (a "
        "train.redecode --out has no config.json)")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(configs_common.upgrade(json.load(f)))


def _scored_split(records: list[dict], splits: dict, config_dir: str) -> str:
  ids = {r["id"] for r in records}
  for name in ("test", "validation", "train"):
    if ids <= {e.id for e in splits.get(name, [])}:
      return name
  raise config_check.ConfigError(
      f"the members' {len(records)} records are not all in one of {config_dir}'s test, "
      "validation or train splits (config.data.test_file, train_file and "
      "validation_fraction): were they scored on other data?")


def ensemble(members: list[str], out: str, config_from: str | None = None,
             source_weight: float = 0.0) -> dict:
  """`members`' predictions combined (classifiers: the mean of their class probabilities;
  summarizers: their consensus summary, each summary's support in its document weighted by
  `source_weight`) -> out/test_predictions.jsonl, metrics.jsonl and report.md
  (train/final_eval.py's scoring); returns {section: metrics}."""
  if len(members) < 2:
    raise config_check.ConfigError(f"--members={','.join(members)}: expected at least two "
                                   "directories")
  paths = [os.path.join(m, PREDICTIONS) for m in members]
  for path in paths:
    if not os.path.isfile(path):
      raise config_check.ConfigError(
          f"{path}: no such file; each --members entry must be a directory holding "
          f"{PREDICTIONS} (a finished classification run or a train.redecode --out)")
  config_dir = config_from or members[0]
  config = _run_config(config_dir)
  kind = task_kind(config)
  if kind not in ("classify", "summarize"):
    raise config_check.ConfigError(f"{config_dir} is a {kind!r} run; an ensemble combines "
                                   "classifiers or summarizers")
  member_records = [common.read_jsonl(p) for p in paths]
  if kind == "classify":
    if source_weight:
      raise config_check.ConfigError(f"--source_weight={source_weight} applies to summarizers; "
                                     f"{config_dir} is a classifier")
    try:
      records = classification.mean_probabilities(member_records, paths)
    except common.EvalError as e:
      raise config_check.ConfigError(str(e)) from None
    facts = {"combination": "mean of the members' class probabilities"}
  else:
    records, facts = consensus_summaries(member_records, paths, source_weight)
  splits = examples_lib.load_splits(config.data, kind, config.model.num_classes)
  scored = _scored_split(records, splits, config_dir)
  os.makedirs(out, exist_ok=True)
  facts = {"members": ", ".join(members), **facts,
           "scored split": "test" if scored == "test" else f"{scored} (not test)",
           "train examples": len(splits["train"])}
  return final_eval.score(config, out, records, kind=kind, train_examples=splits["train"],
                          writer=None, step=0, facts=facts)


def consensus_summaries(members: list[list[dict]], paths: list[str],
                        source_weight: float = 0.0) -> tuple[list, dict]:
  """(records, facts): member 0's summary records with "prediction" replaced by the members'
  consensus (infer.ensemble.consensus, weighing support in the "source" by `source_weight`)
  and "member" the index of the member it came from; facts say how often each member was
  chosen."""
  try:
    rerank.Sampling(source_weight=source_weight)     # the check one model's MBR applies
  except ValueError as e:
    raise config_check.ConfigError(f"--{e}") from None
  if len(members) < 3:
    raise config_check.ConfigError(f"{len(members)} summarizers: a consensus needs at least "
                                   "three members (two agree with each other equally)")
  try:
    rouge.check_same_documents(members, paths)
  except common.EvalError as e:
    raise config_check.ConfigError(str(e)) from None
  picks = [infer_ensemble.consensus([m[i]["prediction"] for m in members],
                                    members[0][i]["source"], source_weight)
           for i in range(len(members[0]))]
  records = [dict(r, prediction=members[pick][i]["prediction"], member=pick)
             for i, (r, pick) in enumerate(zip(members[0], picks))]
  chosen = ", ".join(f"{picks.count(k)} from member {k}" for k in range(len(members)))
  weighted = (f" plus {source_weight} x its unigram/bigram precision against the document"
              if source_weight else "")
  return records, {"combination": "per document the summary with the highest mean ROUGE-1/2 "
                                  f"F1 against the other members'{weighted} ({chosen})"}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  log_setup.quiet_libraries()
  fl = flags.FLAGS
  sections = ensemble(fl.members, fl.out, fl.config_from, fl.source_weight)
  final_eval.log_sections(sections, fl.out)


if __name__ == "__main__":
  flags.DEFINE_list("members", None, "Directories holding test_predictions.jsonl: finished "
                    "classifier or summarizer runs (3 or more) or train.redecode outputs, same "
                    "examples and order.")
  flags.DEFINE_string("out", None, "Where the ensemble's report goes (created).")
  flags.DEFINE_string("config_from", None, "The run whose config.json names the data (default: "
                      "the first member).")
  flags.DEFINE_float("source_weight", 0.0, "Summarizers: the weight of a summary's support in "
                     "its document (unigram/bigram precision) beside its agreement with the "
                     "other members' (0: agreement alone).")
  flags.mark_flags_as_required(["members", "out"])
  app.run(errors.exit_on_user_error(main))
