r"""Batch inference from a run's checkpoint: a JSONL file of texts in, one prediction per line out.

  python -m infer.main --workdir=runs/imdb_ft --input=reviews.jsonl.gz --output=preds.jsonl
  python -m infer.main --workdir=runs/ft_a,runs/ft_b ...   # classifiers averaged: ensemble.py

The run decides what is predicted: a classifier writes {"id", "probs", "label"} per line, a
summarizer {"id", "summary"} (greedy, at most --max_new tokens). Ids are the input's `id` field,
else `<file name>:<line>`. The whole input is read and checked before the model is loaded, so a
bad line fails in seconds, not after an hour of inference; predictions are then written (and
flushed) batch by batch, with a progress line and ETA for long inputs.

Shapes stay few, so jit compiles a handful of programs rather than one per batch: every batch is
padded to --batch_size rows, classifier rows to `data.seq_len` tokens and summarizer prompts to a
multiple of decode.pack_prompts' bucket. The model is infer/loading.py's LoadedModel (any run,
quantized ones too); input parsing and error handling are infer/inputs.py's, shared with the
HTTP server (infer/serve.py).
"""
import gzip
import json
import os
import pathlib

from absl import app, flags, logging

from infer import loading
from infer.inputs import (InputError, define_model_flags, json_object,
                          load_predictor)
from model import errors
from model import log_setup
from model.progress import CountProgress


# --- the files ------------------------------------------------------------------------------
def read_inputs(path: str, text_field: str) -> list[tuple[object, str]]:
  """(id, text) of every non-blank line; the first bad line fails as `file:line: problem`."""
  p = pathlib.Path(os.path.expanduser(path))
  if not p.is_file():
    raise InputError(f"--input={path}: no such file")
  out = []
  try:
    with (gzip.open(p, "rb") if p.name.endswith(".gz") else open(p, "rb")) as f:
      for lineno, raw in enumerate(f, 1):
        if raw.strip():
          out.append(_parse_line(raw, f"{p}:{lineno}", f"{p.name}:{lineno}", text_field))
  except (gzip.BadGzipFile, EOFError, OSError) as e:
    raise InputError(f"{p}: not a readable JSONL file ({e})") from None
  if not out:
    raise InputError(f"{p}: no lines to predict")
  return out


def _parse_line(raw: bytes, where: str, default_id: str, text_field: str):
  try:
    record = json_object(raw.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise InputError(f"{where}: not valid UTF-8 (byte {e.start})") from None
  except InputError as e:
    raise InputError(f"{where}: {e}") from None
  text = record.get(text_field)
  if not isinstance(text, str) or not text.strip():
    raise InputError(f"{where}: expected a non-empty string field {text_field!r} "
                     "(--text_field)")
  return record.get("id", default_id), text.strip()


def write_predictions(loaded: loading.LoadedModel, inputs: list[tuple[object, str]],
                      output: str, *, batch_size: int, max_new: int | None = None) -> None:
  """Predicts `inputs` in batches of `batch_size`, writing one JSON line per input in order."""
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  progress = CountProgress(len(inputs), "texts")
  with open(output, "w", encoding="utf-8") as f:
    for start in range(0, len(inputs), batch_size):
      chunk = inputs[start:start + batch_size]
      results = loaded.predict([text for _, text in chunk], max_new=max_new, pad_to=batch_size)
      for (doc_id, _), result in zip(chunk, results):
        f.write(json.dumps({"id": doc_id, **result}) + "\n")
      f.flush()
      progress.update(start + len(chunk))
  logging.info("wrote %d predictions to %s in %.1fs", len(inputs), output, progress.elapsed())


# --- the command line -----------------------------------------------------------------------
def main(argv):
  log_setup.quiet_libraries()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  inputs = read_inputs(f.input, f.text_field)
  loaded, max_new = load_predictor(f.workdir, f.max_new, window_stride=f.window_stride)
  logging.info("%s model (step %d) from %s: %d texts", loaded.kind, loaded.step, f.workdir,
               len(inputs))
  write_predictions(loaded, inputs, f.output, batch_size=f.batch_size, max_new=max_new)


if __name__ == "__main__":
  # Defined here, not at import: tests import this module.
  define_model_flags()
  flags.DEFINE_string("input", None, "JSONL (or .jsonl.gz) file, one JSON object a line.",
                      required=True)
  flags.DEFINE_string("output", None, "Where the predictions go (JSONL).", required=True)
  flags.DEFINE_string("text_field", "text", "Input field holding the text.")
  flags.DEFINE_integer("batch_size", 32, "Texts per model call.", lower_bound=1)
  app.run(errors.exit_on_user_error(main))
