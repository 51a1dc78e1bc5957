"""Documents of the pre-training corpus: the embedded licensedcode data plus extra folders.

An entry of `data.extra_dirs` is a folder (every .txt/.jsonl/.jsonl.gz file under it) or one
such file. A document is `Document(id, text)`. Ids are stable across machines and runs, so the
split and the `max_docs` cap (both decided by hashing ids) never change for the same sources:
  licensedcode/licenses/mit.LICENSE        one document per license text
  licensedcode/rules/gpl-2.0_12.RULE       one document per rule (a license notice or snippet)
  <folder name>/sub/file.txt               one document per .txt file
  <folder name>/sub/file.jsonl.gz:17       one document per JSONL line (1-based line number)
where <folder name> is the last path component of a folder entry of `data.extra_dirs` (for a
file entry: of the folder holding it).

The embedded corpus (PyPI licensedcode-data) has 2,310 license texts and 34,859 rules. Rules are
short (median ~200 characters) but together about as large as the licenses; all are included
as separate documents, with their YAML front matter removed. Every text is stripped of leading
and trailing whitespace and whitespace-only documents are skipped.

A JSONL line that is not valid UTF-8, not JSON, or lacks the text field stops the build with its
file:line (`data.bad_lines="fail"`), or is skipped with a warning naming file:line and counted in
`Corpus.skipped_lines` (`"skip"`: one bad record in a scraped dump should not cost the run).
"""
from collections.abc import Callable, Iterator
import gzip
import hashlib
import heapq
import importlib.metadata
import importlib.util
import json
import pathlib
from typing import NamedTuple
import zlib

from absl import logging

from model.errors import DataError

# Bump when reading or cleaning changes, so builds made by older code are not reused.
CORPUS_FORMAT = 1
EXTENSIONS = (".txt", ".jsonl", ".jsonl.gz")
SPLITS = ("train", "validation")


class Document(NamedTuple):
  id: str
  text: str


def hash_unit(doc_id: str, salt: str) -> float:
  """A uniform number in [0, 1) derived from the id; `salt` makes independent draws."""
  digest = hashlib.blake2b(doc_id.encode(), digest_size=8, person=salt.encode()).digest()
  return int.from_bytes(digest, "big") / 2.0**64


def split_of(doc_id: str, validation_fraction: float) -> str:
  return "validation" if hash_unit(doc_id, "split") < validation_fraction else "train"


def licensedcode_dir() -> pathlib.Path:
  """The `data` folder of the installed licensedcode-data package."""
  spec = importlib.util.find_spec("licensedcode")
  # licensedcode is a namespace package (no __init__.py), so look through its search path.
  for location in (spec.submodule_search_locations or ()) if spec else ():
    candidate = pathlib.Path(location) / "data"
    if (candidate / "licenses").is_dir() and (candidate / "rules").is_dir():
      return candidate
  raise DataError("data.use_licensedcode=True but the package licensedcode-data (module "
                  "'licensedcode' with data/licenses and data/rules) is not installed")


def _strip_front_matter(path: pathlib.Path, text: str) -> str:
  lines = text.split("\n")
  if lines[0].rstrip() != "---":
    raise DataError(f"{path}: expected a YAML front matter block starting with a '---' line")
  for i, line in enumerate(lines[1:], 1):
    if line.rstrip() == "---":
      return "\n".join(lines[i + 1:])
  raise DataError(f"{path}: YAML front matter is not closed by a '---' line")


def _decode(path: pathlib.Path, data: bytes, where: str = "") -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}{where}: not valid UTF-8 (byte {e.start}); convert the file to "
                    "UTF-8") from None


def _extra_dirs(data_config) -> list[pathlib.Path]:
  dirs = data_config.extra_dirs
  # A command-line override may arrive as one comma-separated string.
  if isinstance(dirs, str):
    dirs = [d for d in dirs.split(",") if d.strip()]
  return [pathlib.Path(d.strip()).expanduser().resolve() for d in dirs]


class Corpus:
  """The documents selected by a data config; cheap to construct (lists files, reads none)."""

  def __init__(self, data_config):
    self.text_field = data_config.text_field
    self.bad_lines = data_config.bad_lines
    if self.bad_lines not in ("fail", "skip"):
      raise DataError(f"data.bad_lines={self.bad_lines!r}: expected 'fail' or 'skip'")
    self.skipped_lines: list[str] = []   # "file:line: why" of every bad line skipped
    self.max_docs = int(data_config.max_docs)
    self.validation_fraction = float(data_config.validation_fraction)
    if not 0.0 <= self.validation_fraction < 1.0:
      raise DataError(f"data.validation_fraction={self.validation_fraction}: expected a "
                      "fraction in [0, 1)")
    if self.max_docs == 0 or self.max_docs < -1:
      raise DataError(f"data.max_docs={self.max_docs}: expected -1 (all) or a positive count")
    self._licensedcode = licensedcode_dir() if data_config.use_licensedcode else None
    self._folders: list[tuple[str, pathlib.Path, list[pathlib.Path]]] = []
    for entry in _extra_dirs(data_config):
      if entry.is_file() and entry.name.endswith(EXTENSIONS):
        # One file of a folder (e.g. a train split beside a test split that must stay unseen).
        folder, files = entry.parent, [entry]
      elif entry.is_dir():
        folder = entry
        files = sorted(p for p in folder.rglob("*")
                       if p.is_file() and p.name.endswith(EXTENSIONS))
      else:
        raise DataError(f"data.extra_dirs: {entry} is not an existing folder or "
                        f"{'/'.join(EXTENSIONS)} file")
      if not files:
        raise DataError(f"data.extra_dirs: {folder} has no {'/'.join(EXTENSIONS)} files")
      same = [files_ for _, root, files_ in self._folders if root == folder]
      if same and entry.is_file():
        # Several files of one folder (IMDB's unsup and train splits): one source, its files
        # in the order given; document ids (folder/file:line) stay unique.
        if entry not in same[0]:
          same[0].append(entry)
        continue
      if any(name == folder.name for name, _, _ in self._folders):
        raise DataError(f"data.extra_dirs: two folders are named {folder.name!r}; document ids "
                        "use the folder name, so it must be unique")
      self._folders.append((folder.name, folder, files))
    if not self._licensedcode and not self._folders:
      raise DataError("no sources: data.use_licensedcode is False and data.extra_dirs is empty")
    self._index: dict[str, str] | None = None
    self._fingerprint: str | None = None

  def description(self) -> dict:
    """Everything the documents depend on, with content hashes of the extra files."""
    folders = []
    for name, root, files in self._folders:
      hashes = []
      for path in files:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
          while chunk := f.read(1 << 20):
            h.update(chunk)
        hashes.append([path.relative_to(root).as_posix(), h.hexdigest()])
      folders.append({"name": name, "path": str(root), "files": hashes})
    return {
        "corpus_format": CORPUS_FORMAT,
        "licensedcode": (importlib.metadata.version("licensedcode-data")
                         if self._licensedcode else None),
        "extra_dirs": folders,
        "text_field": self.text_field,
        "max_docs": self.max_docs,
        "validation_fraction": self.validation_fraction,
        # Only "skip" can change the documents (a "fail" build has no bad lines), and leaving
        # the key out for "fail" keeps the fingerprints of existing builds.
        **({"bad_lines": "skip"} if self.bad_lines == "skip" else {}),
    }

  @property
  def fingerprint(self) -> str:
    """A short hash of `description()` minus local paths: names a build of these documents."""
    if self._fingerprint is None:
      desc = self.description()
      for folder in desc["extra_dirs"]:
        del folder["path"]  # the same files mounted elsewhere are the same dataset
      blob = json.dumps(desc, sort_keys=True).encode()
      self._fingerprint = hashlib.sha256(blob).hexdigest()[:12]
    return self._fingerprint

  def _iter(self, keep: Callable[[str], bool]) -> Iterator[Document]:
    """All non-empty documents whose id passes `keep`; skipped ones are not read or parsed."""
    if self._licensedcode:
      for sub, suffix in (("licenses", ".LICENSE"), ("rules", ".RULE")):
        for path in sorted((self._licensedcode / sub).glob("*" + suffix)):
          doc_id = f"licensedcode/{sub}/{path.name}"
          if keep(doc_id):
            text = _strip_front_matter(path, _decode(path, path.read_bytes())).strip()
            if text:
              yield Document(doc_id, text)
    for name, root, files in self._folders:
      for path in files:
        doc_id = f"{name}/{path.relative_to(root).as_posix()}"
        if path.name.endswith(".txt"):
          if keep(doc_id):
            text = _decode(path, path.read_bytes()).strip()
            if text:
              yield Document(doc_id, text)
        else:
          yield from self._read_jsonl(path, doc_id, keep)

  def _read_jsonl(self, path: pathlib.Path, file_id: str,
                  keep: Callable[[str], bool]) -> Iterator[Document]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
      with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
          doc_id = f"{file_id}:{lineno}"
          if not raw.strip() or not keep(doc_id):
            continue
          try:
            text = self._parse_line(path, lineno, raw)
          except DataError as e:
            if self.bad_lines != "skip":
              raise DataError(f"{e} (or set config.data.bad_lines=skip to skip such "
                              "lines)") from None
            # A skipped line is in no split, so later passes never parse it again.
            logging.warning("skipping %s (data.bad_lines=skip)", e)
            self.skipped_lines.append(str(e))
            continue
          if text:
            yield Document(doc_id, text)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
      raise DataError(f"{path}: not a readable gzip file ({e})") from None

  def _parse_line(self, path: pathlib.Path, lineno: int, raw: bytes) -> str:
    """The stripped text of one JSONL line; DataError naming path:line if the line is bad."""
    where = f":{lineno}"
    try:
      record = json.loads(_decode(path, raw, where))
    except json.JSONDecodeError as e:
      raise DataError(f"{path}{where}: malformed JSON line ({e.msg} at column "
                      f"{e.colno})") from None
    text = record.get(self.text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
      raise DataError(f"{path}{where}: expected a JSON object with a string field "
                      f"{self.text_field!r} (data.text_field)")
    return text.strip()

  def index(self) -> dict[str, str]:
    """Maps the id of every kept document (after the `max_docs` cap) to its split.

    Reads the whole corpus once. The cap keeps the `max_docs` ids with the smallest hash: a
    seeded shuffle that needs no document order and is stable as sources grow.
    """
    if self._index is None:
      ids = (doc.id for doc in self._iter(lambda _: True))
      if self.max_docs > 0:
        ids = heapq.nsmallest(self.max_docs, ids, key=lambda i: hash_unit(i, "max_docs"))
      self._index = {i: split_of(i, self.validation_fraction) for i in ids}
      if self.skipped_lines:
        logging.warning("data.bad_lines=skip: skipped %d bad JSONL lines in %s",
                        len(self.skipped_lines), self.sources())
      if not self._index:
        raise DataError(f"empty corpus: no non-empty documents in {self.sources()}")
    return self._index

  def split(self, name: str) -> Iterator[Document]:
    """The documents of split `name` ('train' or 'validation'), in corpus order."""
    if name not in SPLITS:
      raise DataError(f"unknown split {name!r}; expected one of {SPLITS}")
    index = self.index()
    return self._iter(lambda i: index.get(i) == name)

  def sources(self) -> str:
    parts = ["licensedcode-data"] if self._licensedcode else []
    return ", ".join(parts + [str(root) for _, root, _ in self._folders])
