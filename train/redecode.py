r"""Re-score a finished run with other inference settings - a summarizer's decoding, or how a
classifier reads long texts: same test examples, same evaluators and baselines as its own final
evaluation, a new report.

  python -m train.redecode --workdir=runs/summ_plain_english --out=runs/summ_pe_beam4 \
      --beam=4 --min_new=14 [--no_repeat_ngram_size=4 --repetition_penalty=1.2 \
      --length_penalty=1.0 --length_ratio=train --samples=16 --temperature=0.7 --top_p=0.95 \
      --num_examples=-1 --split=validation]
  python -m train.redecode --workdir=runs/imdb_ft --out=runs/imdb_ft_w128 --window_stride=128 \
      --split=validation
  python -m train.redecode --workdir=runs/imdb_ft --out=runs/imdb_ft_train --window_stride=0 \
      --split=train      # a teacher's probabilities on the rows a student trains on

Loads the run's best-validation state (else its newest checkpoint) through the inference API,
reads its config's data files again, applies the flags over its `eval.decode` (unset flags keep
the run's; --window_stride over a classifier's eval.window_stride), and writes report.md,
test_predictions.jsonl and metrics.jsonl to --out. Each decoding row of the summarization
tables (docs/results/summarization.md) is one such command. --split=train scores the train
examples (the TF-IDF baseline beside it is then fitted on what it scores): with the validation
split's, a classifier teacher's predictions to distil from offline (`distill.offline_teacher`,
README "Workflows").
"""
import os

from absl import app, flags
import ml_collections

from infer import classifier_rows, loading
from model import errors
from model import log_setup
from model.task_kind import task_kind
from train import config_check, final_eval
from train.data import examples as examples_lib

SPLITS = ("test", "validation", "train")


def _define_flags():
  # Only when run as a command: train.main (imported beside this module in tests) defines
  # --workdir too.
  global _WORKDIR, _OUT, _BEAM, _LENGTH_PENALTY, _NO_REPEAT, _REPETITION, _MIN_NEW
  global _LENGTH_RATIO, _NUM_EXAMPLES, _SAMPLES, _TEMPERATURE, _TOP_P, _SPLIT, _WINDOW_STRIDE
  global _SOURCE_WEIGHT
  _WORKDIR = flags.DEFINE_string("workdir", None, "The finished summarization or classification "
                                 "run.", required=True)
  _OUT = flags.DEFINE_string("out", None, "Where the new report goes (created).", required=True)
  _BEAM = flags.DEFINE_integer("beam", None, "eval.decode.beam: 0/1 greedy, > 1 beams.")
  _LENGTH_PENALTY = flags.DEFINE_float("length_penalty", None, "eval.decode.length_penalty.")
  _NO_REPEAT = flags.DEFINE_integer("no_repeat_ngram_size", None,
                                    "eval.decode.no_repeat_ngram_size (0: off).")
  _REPETITION = flags.DEFINE_float("repetition_penalty", None,
                                   "eval.decode.repetition_penalty.")
  _MIN_NEW = flags.DEFINE_integer("min_new", None, "eval.decode.min_new.")
  _LENGTH_RATIO = flags.DEFINE_string("length_ratio", None,
                                      "eval.decode.length_ratio: a number (0: off) or 'train'.")
  _SAMPLES = flags.DEFINE_integer("samples", None, "eval.decode.samples: MBR decoding over this "
                                  "many sampled summaries and the greedy/beam one (0: off).")
  _TEMPERATURE = flags.DEFINE_float("temperature", None, "eval.decode.temperature (MBR).")
  _TOP_P = flags.DEFINE_float("top_p", None, "eval.decode.top_p (MBR).")
  _SOURCE_WEIGHT = flags.DEFINE_float("source_weight", None, "eval.decode.source_weight (MBR): "
                                      "weight of a candidate's support in its document.")
  _WINDOW_STRIDE = flags.DEFINE_integer(
      "window_stride", None, "Classifiers: eval.window_stride, 0 = long texts truncated as in "
      "training; S > 0 = also read whole in windows S ids apart (infer/classifier_rows.py).")
  _SPLIT = flags.DEFINE_enum("split", "test", list(SPLITS),
                             "Which split to score: choose decoding settings on validation, "
                             "then report test once; train: a teacher's offline predictions.")
  _NUM_EXAMPLES = flags.DEFINE_integer("num_examples", None,
                                       "eval.num_examples: test examples (-1: all).")


def overridden_config(run_config: dict, num_examples: int | None = None,
                      window_stride: int | None = None, **decode) -> ml_collections.ConfigDict:
  """The run's config with the given eval.decode keys, eval.num_examples and
  eval.window_stride (None: keep)."""
  config = ml_collections.ConfigDict(run_config)
  if num_examples is not None:
    config.eval.num_examples = num_examples
  if window_stride is not None:
    config.eval.window_stride = window_stride
  # The recorded JSON keeps no field types (length_ratio 0.0 reads back a float that "train"
  # cannot replace), so the section is rebuilt rather than assigned key by key.
  options = dict(config.eval.decode)
  for key, value in decode.items():
    if value is None:
      continue
    if key == "length_ratio" and value != "train":
      value = float(value)
    options[key] = value
  config.eval.decode = ml_collections.ConfigDict(options)
  return config


def redecode(workdir: str, out: str, num_examples: int | None = None, split: str = "test",
             window_stride: int | None = None, **decode) -> dict:
  """The test evaluation of the run at `workdir` with `decode` over its eval.decode (a
  summarizer) or `window_stride` over its eval.window_stride (a classifier), and
  `num_examples` test examples (None: the run's) -> `out`. split="validation" scores the
  run's validation examples instead (the report and test_predictions.jsonl say so), so that
  decoding settings are chosen without looking at the test split; split="train" its train
  examples."""
  if split not in SPLITS:
    raise config_check.ConfigError(f"--split={split!r}: expected one of {SPLITS}")
  run = loading.open_run(workdir, prefer_best=True)
  if run.kind not in ("summarize", "classify"):
    raise config_check.ConfigError(f"--workdir={workdir} is a {run.kind!r} run; re-scoring "
                                   "needs a summarization or classification run")
  given = sorted(k for k, v in decode.items() if v is not None)
  if run.kind == "classify" and given:
    raise config_check.ConfigError(f"--workdir={workdir} is a classifier: decoding flags "
                                   f"{given} apply to summarizers")
  if run.kind == "summarize" and window_stride is not None:
    raise config_check.ConfigError(f"--window_stride applies to classifiers; --workdir="
                                   f"{workdir} is a summarizer")
  config = overridden_config(run.config.to_dict(), num_examples, window_stride, **decode)
  config_check.check_decode(config)
  loaded = loading.LoadedModel.from_run(run)
  if window_stride is not None:
    try:
      classifier_rows.check_stride(window_stride, config.data.seq_len, loaded.tokenizer)
    except ValueError as e:
      raise config_check.ConfigError(f"--{e}") from None
  splits = examples_lib.load_splits(config.data, task_kind(config),
                                    config.model.num_classes)
  decoding, facts = ({}, {}) if run.kind == "classify" else final_eval.decode_options(
      config, loaded, splits.get("train", []))
  if split != "test":
    if not splits.get(split):
      raise config_check.ConfigError(f"--split={split}: the run at {workdir} has no {split} "
                                     "examples (config.data.validation_fraction)")
    splits = {**splits, "test": splits[split]}
    facts["scored split"] = f"{split} (not test)"
  os.makedirs(out, exist_ok=True)
  return final_eval.run(config, out, loaded=loaded, params=loaded.params, splits=splits,
                        writer=None, step=run.step, decoding=decoding,
                        facts={**facts, "re-decoded from": f"{run.workdir} (step {run.step})"})


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  log_setup.quiet_libraries()
  sections = redecode(
      _WORKDIR.value, _OUT.value, beam=_BEAM.value, length_penalty=_LENGTH_PENALTY.value,
      no_repeat_ngram_size=_NO_REPEAT.value, repetition_penalty=_REPETITION.value,
      min_new=_MIN_NEW.value, length_ratio=_LENGTH_RATIO.value, samples=_SAMPLES.value,
      temperature=_TEMPERATURE.value, top_p=_TOP_P.value, source_weight=_SOURCE_WEIGHT.value,
      num_examples=_NUM_EXAMPLES.value,
      split=_SPLIT.value, window_stride=_WINDOW_STRIDE.value)
  final_eval.log_sections(sections, _OUT.value)


if __name__ == "__main__":
  _define_flags()
  app.run(errors.exit_on_user_error(main))
