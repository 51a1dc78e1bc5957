"""Where fine-tuning records come from: a local JSONL / CSV / TSV file or a prepared TFDS dataset.

`data.train_file` / `data.test_file` name a dataset the way users name it:
  path/to/x.jsonl, x.jsonl.gz           one JSON object per line
  path/to/x.csv, x.csv.gz, x.tsv(.gz)   a header row naming the columns, one record per row
  tfds:<name>[/<config>][:<split>]      a TFDS dataset, e.g. tfds:imdb_reviews:test
                                        (split defaults to train; slices like train[:10%] work)

TFDS datasets are read from `data.data_dir` (default ~/.cache/legal_lm, where the corpus builds
and tokenizers live), in the ArrayRecord format, with `builder.as_data_source(split)`:
TensorFlow is never imported. Reading never downloads (offline, a download only fails after
minutes of retries, and every process of a multi-host run would try it): a dataset that is not
prepared is one DataError line with the command that prepares it on a machine with internet:
  python -m train.data.sources tfds:imdb_reviews --data_dir=~/.cache/legal_lm
or `tfds build imdb_reviews --file_format=array_record --data_dir=...`. Preparing needs what the
dataset's TFDS builder needs, for imdb_reviews TensorFlow (TFDS unpacks its tar archive with
tf.io.gfile; `pip install tensorflow-cpu`), and so does the `tfds` command; reading does not.
Copy the prepared <data_dir>/imdb_reviews/ folder to machines without internet.

`records()` yields (location, record) pairs; a record is a dict of Python values, or a DataError
for a row that cannot be read (bad JSON, bad UTF-8, wrong field count, non-integer label), which
the caller fails on or skips (data.bad_lines). Problems with the whole file or dataset raise.
"""
import csv
import gzip
import importlib.resources
import io
import json
import os
import pathlib
import sys

import numpy as np

from model.errors import DataError

TFDS_PREFIX = "tfds:"
README_SECTION = 'README.md, "Datasets: where they come from"'
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}


def is_tfds(spec: str) -> bool:
  return spec.startswith(TFDS_PREFIX)


def parse_tfds(spec: str) -> tuple[str, str]:
  """'tfds:imdb_reviews:test' -> ('imdb_reviews', 'test'); the split defaults to 'train'."""
  name, _, split = spec[len(TFDS_PREFIX):].partition(":")
  if not name or name.startswith("/") or name.endswith("/"):
    raise DataError(f"{spec!r}: expected tfds:<name>[/<config>][:<split>], e.g. "
                    "tfds:imdb_reviews:train")
  return name, split or "train"


def _csv_delimiter(path: pathlib.Path) -> str | None:
  name = path.name[:-3] if path.name.endswith(".gz") else path.name
  return CSV_SUFFIXES.get(os.path.splitext(name)[1].lower())


def local_path(spec: str, key: str) -> pathlib.Path:
  """The file `spec` names; a missing one is one line naming the key, the path and where the
  data comes from."""
  p = pathlib.Path(os.path.expanduser(spec))
  if not p.is_file():
    root = os.environ.get("LEGAL_LM_DATA")
    where = (f"$LEGAL_LM_DATA={root}" if root is not None
             else "$LEGAL_LM_DATA is unset, so presets look under ../shared/data")
    raise DataError(f"config.{key}={spec}: no such file ({where}; see {README_SECTION} for "
                    "where each dataset comes from, or name a TFDS dataset, e.g. "
                    "tfds:imdb_reviews:train)")
  return p


def _open(path: pathlib.Path):
  return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def records(spec: str, key: str, data_cfg, fields: tuple[str, ...], int_fields=()):
  """(location, record or DataError) for every record of `spec`; `fields` must exist (CSV
  header, TFDS features); `int_fields` are parsed as integers (CSV holds strings)."""
  if is_tfds(spec):
    yield from _tfds_records(spec, data_cfg, fields)
    return
  p = local_path(spec, key)
  delimiter = _csv_delimiter(p)
  try:
    if delimiter:
      yield from _csv_records(p, delimiter, fields, int_fields)
    else:
      yield from _jsonl_records(p)
  except (gzip.BadGzipFile, EOFError, OSError) as e:
    kind = "CSV/TSV" if delimiter else "JSONL"
    raise DataError(f"{p}: not a readable {kind} file ({e})") from None


def _jsonl_records(p: pathlib.Path):
  with _open(p) as f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      yield f"{p}:{lineno}", _json_record(raw)


def _json_record(raw: bytes):
  try:
    record = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError as e:
    return DataError(f"not valid UTF-8 (byte {e.start})")
  except json.JSONDecodeError as e:
    return DataError(f"malformed JSON ({e.msg} at column {e.colno})")
  if not isinstance(record, dict):
    return DataError("expected a JSON object")
  return record


def _csv_records(p: pathlib.Path, delimiter: str, fields, int_fields):
  # Judgments run to hundreds of kB per field; csv's default cap is 128 kB.
  csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
  with _open(p) as raw:
    # surrogateescape keeps a row with bad UTF-8 readable so it fails (or is skipped) alone.
    text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
    reader = csv.reader(text, delimiter=delimiter)
    try:
      header = next(reader)
    except StopIteration:
      raise DataError(f"{p}: empty file (expected a header row naming the columns)") from None
    except csv.Error as e:
      raise DataError(f"{p}:1: malformed header row ({e})") from None
    header = [h.strip().lstrip("\ufeff") for h in header]
    missing = [f for f in fields if f not in header]
    if missing:
      raise DataError(f"{p}: the header row has no column {missing[0]!r} (columns: "
                      f"{', '.join(header)}); set data.text_field / data.label_field / "
                      "data.summary_field to the column names")
    while True:
      lineno = reader.line_num + 1          # where the next record starts
      try:
        row = next(reader)
      except StopIteration:
        return
      except csv.Error as e:
        yield f"{p}:{lineno}", DataError(f"malformed CSV row ({e})")
        continue
      if not any(cell.strip() for cell in row):
        continue
      yield f"{p}:{lineno}", _csv_record(row, header, int_fields)


def _csv_record(row: list[str], header: list[str], int_fields):
  if len(row) != len(header):
    return DataError(f"expected {len(header)} fields (the header's), got {len(row)}")
  record = dict(zip(header, row))
  for name, value in record.items():
    try:
      value.encode("utf-8")
    except UnicodeEncodeError:
      return DataError(f"not valid UTF-8 (column {name!r})")
  for name in int_fields:
    try:
      record[name] = int(record[name].strip())
    except ValueError:
      return DataError(f"expected an integer in column {name!r}, got {record[name]!r}")
  return record


# --- TFDS ---------------------------------------------------------------------------------


def _import_tfds():
  # TFDS 4.9.10 evaluates `importlib_resources.abc.Traversable` when it derives a registered
  # builder's code path (download_and_prepare), but declares the backport only for Python < 3.9;
  # the standard library's importlib.resources has the same API.
  if "importlib_resources" not in sys.modules:
    try:
      import importlib_resources  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      import importlib.resources.abc  # noqa: F401  pylint: disable=g-import-not-at-top
      sys.modules["importlib_resources"] = importlib.resources
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def prepare_command(name: str, data_dir: str) -> str:
  return f"python -m train.data.sources tfds:{name} --data_dir={data_dir}"


def tfds_builder(name: str, data_dir: str):
  """The TFDS builder of `name` in `data_dir`, ArrayRecord; unknown names are a DataError."""
  tfds = _import_tfds()
  try:
    return tfds.builder(name, data_dir=os.path.expanduser(data_dir), file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else name
    raise DataError(f"tfds:{name}: no such TFDS dataset ({first})") from None
  except (ValueError, KeyError) as e:       # e.g. an unknown builder config
    raise DataError(f"tfds:{name}: {str(e).strip().splitlines()[0]}") from None


def _prepared_builder(name: str, data_dir: str):
  builder = tfds_builder(name, data_dir)
  if not builder.is_prepared():
    raise DataError(
        f"tfds:{name} is not prepared in data.data_dir={data_dir} (expected {builder.data_dir}; "
        f"reading never downloads): prepare it on a machine with internet (and TensorFlow, which "
        f"TFDS's download builders need) with `{prepare_command(name, data_dir)}` and copy "
        f"{os.path.join(data_dir, name.split('/')[0])} here (see {README_SECTION})")
  return builder


def _tfds_source(spec: str, data_cfg):
  name, split = parse_tfds(spec)
  builder = _prepared_builder(name, data_cfg.data_dir)
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError:
    raise DataError(f"{spec}: prepared as {builder.info.file_format.value}, which has no random "
                    f"access; delete {builder.data_dir} and prepare it again with "
                    f"`{prepare_command(name, data_cfg.data_dir)}` (ArrayRecord)") from None
  except (ValueError, KeyError, AssertionError) as e:
    raise DataError(f"{spec}: bad split {split!r} ({str(e).splitlines()[0]}; splits: "
                    f"{', '.join(builder.info.splits)})") from None
  return name, split, builder, source


def _plain(value):
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      return DataError(f"not valid UTF-8 (byte {e.start})")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, np.generic):
    value = value.item()
  return value


def _tfds_records(spec: str, data_cfg, fields):
  name, split, builder, source = _tfds_source(spec, data_cfg)
  features = list(builder.info.features)
  missing = [f for f in fields if f not in features]
  if missing:
    raise DataError(f"{spec} has no feature {missing[0]!r} (features: {', '.join(features)}); "
                    "set data.text_field / data.label_field / data.summary_field to them")
  chunk = 1024
  for start in range(0, len(source), chunk):
    indices = list(range(start, min(start + chunk, len(source))))
    rows = source.__getitems__(indices) if hasattr(source, "__getitems__") else \
        [source[i] for i in indices]
    for i, row in zip(indices, rows):
      record = {k: _plain(v) for k, v in row.items()}
      bad = next((v for v in record.values() if isinstance(v, DataError)), None)
      if bad is None:
        record.setdefault("id", f"{name}:{split}:{i}")
        record.setdefault("source", name.split("/")[0])
      yield f"{spec}[{i}]", bad or record


def fingerprint_update(h, spec: str, key: str, data_cfg) -> None:
  """Feeds what names `spec`'s contents into hash `h`: a file's bytes; a TFDS dataset's name,
  version, split and sizes (its prepared files are versioned by TFDS)."""
  if is_tfds(spec):
    name, split = parse_tfds(spec)
    builder = _prepared_builder(name, data_cfg.data_dir)
    info = builder.info
    sizes = {s: info.splits[s].num_examples for s in sorted(info.splits)}
    h.update(f"tfds|{info.full_name}|{split}|{sizes}".encode())
    return
  with _open(local_path(spec, key)) as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)


def prepare(spec: str, data_dir: str) -> str:
  """Downloads and prepares a TFDS dataset (every split, ArrayRecord) into data_dir."""
  name, _ = parse_tfds(spec if is_tfds(spec) else TFDS_PREFIX + spec)
  builder = tfds_builder(name, data_dir)
  builder.download_and_prepare()
  return str(builder.data_dir)


def _main(argv):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog="python -m train.data.sources",
      description="Download and prepare a TFDS dataset in the ArrayRecord format so that "
                  "data.train_file=tfds:<name>:<split> can read it (without TensorFlow).")
  parser.add_argument("dataset", help="tfds:<name>[/<config>] or <name>, e.g. imdb_reviews")
  parser.add_argument("--data_dir", default="~/.cache/legal_lm",
                      help="the runs' config.data.data_dir (default ~/.cache/legal_lm)")
  args = parser.parse_args(argv)
  try:
    print(prepare(args.dataset, args.data_dir))
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # pylint: disable=broad-except  (no internet, no TensorFlow, ...)
    line = (str(e).strip().splitlines() or [""])[0]
    print(f"error: preparing {args.dataset} in {args.data_dir} failed: {type(e).__name__}: "
          f"{line}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1:]))
