"""Pre-training data mixtures: several sources, each with a weight (`data.mixture`).

`data.mixture` is a tuple of strings, one per source, `name=source:weight`:
  legal=licensedcode:0.4                                      the embedded licensedcode-data
  cuad=../shared/data/legal_pretrain_corpus/cuad_contracts.jsonl.gz:0.2   a file or a folder
                                                              (what data.extra_dirs takes)
Strings (not a nested ConfigDict) so the whole mixture is one override on the command line,
`--config.data.mixture="('a=licensedcode:1','b=/data/b:0.5')"`, and a preset's sources can be
replaced, not merged. A set mixture replaces `data.use_licensedcode` / `data.extra_dirs`.

Each source is a corpus of its own (train/data/corpus.py: its own TFDS build, ids and hash-held-
out validation split; `data.max_docs` caps each source). Weights are shares of *tokens*: each
source is tokenized and packed into rows on its own, and grain's `IterDataset.mix` interleaves
the packed rows in the weights' proportions (deterministic; its state, every source's position
included, is part of the iterator state, so a resumed run continues bit for bit). Every row is
full and from one source, so the share of tokens from a source is its weight up to the last
rows. The tokenizer is trained on a weighted sample: `data.tokenizer_sentences` lines, each
source contributing in proportion to its weight (train/data/tokenizer_training.py).
"""
import dataclasses
import hashlib
import json
import re

import ml_collections

from model.errors import DataError

LICENSEDCODE = "licensedcode"
_ENTRY = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*=\s*(.+?)\s*:\s*([0-9.eE+-]+)\s*$")


@dataclasses.dataclass(frozen=True)
class Source:
  name: str       # a metric / log key: tokens/<name>
  spec: str       # "licensedcode" or a folder / .txt / .jsonl(.gz) path
  weight: float   # share of tokens, before normalisation


def parse(data_config) -> list[Source]:
  """The sources of `data.mixture` ([] when unset); DataError naming a malformed entry."""
  entries = data_config.mixture or ()
  if isinstance(entries, str):          # one command-line string: comma-separated entries
    entries = [e for e in entries.split(",") if e.strip()]
  sources = []
  for entry in entries:
    m = _ENTRY.match(str(entry))
    if not m:
      raise DataError(f"data.mixture entry {entry!r}: expected 'name=source:weight', e.g. "
                      "'legal=licensedcode:0.5' or 'cuad=/data/cuad.jsonl.gz:0.2'")
    name, spec, weight = m.group(1), m.group(2), m.group(3)
    try:
      weight = float(weight)
    except ValueError:
      weight = -1.0
    if not weight > 0:
      raise DataError(f"data.mixture entry {entry!r}: the weight must be a positive number")
    if any(s.name == name for s in sources):
      raise DataError(f"data.mixture: two sources are named {name!r}")
    sources.append(Source(name, spec, weight))
  if len(sources) == 1:
    raise DataError("data.mixture has one source; use data.use_licensedcode / data.extra_dirs "
                    "for a single corpus")
  return sources


def normalized_weights(sources: list[Source]) -> dict[str, float]:
  total = sum(s.weight for s in sources)
  return {s.name: s.weight / total for s in sources}


def source_config(data_config, source: Source):
  """The data config of one source alone: a plain corpus config (no mixture)."""
  c = ml_collections.ConfigDict(data_config.to_dict())
  c.mixture = ()
  if source.spec == LICENSEDCODE:
    c.use_licensedcode, c.extra_dirs = True, ()
  else:
    c.use_licensedcode, c.extra_dirs = False, (source.spec,)
  return c


def fingerprint(sources: list[Source], fingerprints: dict[str, str]) -> str:
  """Names the mixture: every source's name, build fingerprint and normalised weight."""
  weights = normalized_weights(sources)
  blob = json.dumps([[s.name, fingerprints[s.name], round(weights[s.name], 9)]
                     for s in sources]).encode()
  return "mix_" + hashlib.sha256(blob).hexdigest()[:12]
