"""What the inference entry points share about their input: one error type for bad input,
JSON parsing that says what is wrong, the model flags (bad input ends in one line under
model.errors.exit_on_user_error, like every command)."""
import json

from absl import flags

from infer import classifier_rows, loading
from model import errors


class InputError(errors.UserError):
  """Bad command-line or request input; the message names the flag, file or file:line."""


def json_type(value) -> str:
  """How JSON names the type of a parsed value, for error messages."""
  names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
           int: "a number", float: "a number", type(None): "null"}
  return names[type(value)]


def json_object(text: str) -> dict:
  """The JSON object `text` holds; InputError says what is wrong otherwise."""
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    where = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno} column {e.colno}"
    raise InputError(f"malformed JSON ({e.msg} at {where})") from None
  except RecursionError:
    raise InputError("malformed JSON (nested too deeply)") from None
  if not isinstance(value, dict):
    raise InputError(f"expected a JSON object, got {json_type(value)}")
  return value


def load_predictor(workdir: str, max_new: int | None, allow_lm: bool = False,
                   window_stride: int | None = None):
  """(LoadedModel, max_new) for --workdir / --max_new / --window_stride: a run that predicts (a
  classifier or a summarizer, float or quantized), with a summary length that fits it; with
  allow_lm also a pre-trained language model (max_new None: it only generates). Several
  comma-separated runs give an infer/ensemble.py ClassifierEnsemble (classifiers) or
  SummarizerEnsemble (summarizers, >= 3)."""
  workdirs = loading.split_workdirs(workdir)
  if len(workdirs) > 1:
    from infer import ensemble
    members = [load_predictor(w, max_new, window_stride=window_stride)[0] for w in workdirs]
    try:
      if members[0].kind == "summarize":
        combined = ensemble.SummarizerEnsemble(members, workdirs)
        return combined, combined.check_max_new(max_new)
      return ensemble.ClassifierEnsemble(members, workdirs), None
    except ValueError as e:
      raise InputError(f"--workdir: {e}") from None
  loaded = loading.LoadedModel.from_workdir(workdir)
  if window_stride is not None:
    _set_window_stride(loaded, workdir, window_stride)
  if allow_lm and loaded.kind == "pretrain":
    if max_new:
      raise InputError(f"--max_new={max_new} sets a summary length; a language model "
                       "generates up to --generate_max_new tokens per request")
    return loaded, None
  if loaded.kind not in ("classify", "summarize"):
    raise InputError(f"--workdir={workdir} holds a {loaded.kind!r} run; inference needs a "
                     "fine-tuned classifier or summarizer")
  try:
    return loaded, loaded.check_max_new(max_new)
  except ValueError as e:
    raise InputError(f"--{e}") from None


def _set_window_stride(loaded: loading.LoadedModel, workdir: str, stride: int):
  """A classifier's eval.window_stride for this process (infer/classifier_rows.py)."""
  if loaded.kind != "classify":
    raise InputError(f"--window_stride applies to classifiers; --workdir={workdir} holds a "
                     f"{loaded.kind!r} run")
  try:
    classifier_rows.check_stride(stride, loaded.config.data.seq_len, loaded.tokenizer)
  except ValueError as e:
    raise InputError(f"--{e}") from None
  with loaded.config.unlocked():
    loaded.config.eval.window_stride = stride


def define_model_flags():
  """--workdir, --max_new and --window_stride, shared by batch inference and the server."""
  flags.DEFINE_string("workdir", None, "A run's directory: a training run (its best state if "
                      "kept) or a quantized copy from infer.quantize; several runs, comma-separated: "
                      "classifiers' class probabilities averaged, or (3 or more) the "
                      "summarizers' consensus summary (infer/ensemble.py).",
                      required=True)
  flags.DEFINE_integer("max_new", None, "Summarizers: tokens to generate (default: the run's "
                       "eval.decode_len).", lower_bound=1)
  flags.DEFINE_integer("window_stride", None, "Classifiers: a text longer than a row is also "
                       "read whole, in row-long windows this many tokens apart, and its rows' "
                       "log-probabilities averaged (0: truncated as in training; default: the "
                       "run's eval.window_stride).", lower_bound=0)
