"""Packed language-model batches from the TFDS build, with a checkpointable iterator.

Per process, the grain pipeline is:
  ArrayRecord source -> this process's documents (every process_count-th, from process_index)
  -> shuffle (a new order each epoch, seeded) -> repeat -> tokenize to [bos] + ids + [eos]
  -> concat-then-split packing into rows of seq_len -> batches of batch_size // process_count
  -> worker processes (num_workers > 0) or a prefetch thread.

Packing (grain's ConcatThenSplitIterDataset) fills every row completely: documents follow each
other, and a document longer than the room left in a row continues in the next row(s). Each
piece of a document is its own segment: `segment_ids` are 1, 2, 3... within a row, `positions`
restart at 0 for every segment, and 0 in `segment_ids` marks padding. Only the end of a
non-repeating split leaves padding: the last row is zero-padded and the last batch is filled
with all-padding rows, so every batch has the same shape.

With `data.mixture` (train/data/mixture.py) every source runs the per-process pipeline up to
packing on its own, and grain's `IterDataset.mix` interleaves the packed rows in the weights'
proportions before batching; LMIterator counts the tokens each source contributed
(`source_tokens`, part of its state, written to the metrics as `tokens/<name>`).
"""
import dataclasses
import functools
import os
import weakref

from absl import flags
import grain
import numpy as np

from train.data import corpus as corpus_lib
from train.data import mixture as mixture_lib
from train.data import tfds_builder
from model import tokenizer as tokenizer_lib
from train.data import tokenizer_training
from model.errors import DataError

# Bump when the pipeline's structure changes: states saved by another structure cannot resume.
STATE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class DatasetRef:
  """A finished dataset build: where it is and what it holds."""
  dir: str
  fingerprint: str
  num_examples: dict[str, int]


@dataclasses.dataclass(frozen=True)
class MixtureRef:
  """The builds of a mixture's sources (in config order) and their token weights."""
  sources: dict[str, DatasetRef]
  weights: dict[str, float]          # normalised to sum 1
  fingerprint: str

  @property
  def dir(self) -> str:              # what a run records as its dataset
    return ", ".join(f"{name}={ref.dir} ({self.weights[name]:.3f})"
                     for name, ref in self.sources.items())


def build_dataset(data_config) -> DatasetRef | MixtureRef:
  """Builds the TFDS dataset for `data_config` (each mixture source's) unless it exists."""
  sources = mixture_lib.parse(data_config)
  if sources:
    refs = {s.name: build_dataset(mixture_lib.source_config(data_config, s)) for s in sources}
    return MixtureRef(refs, mixture_lib.normalized_weights(sources), mixture_lib.fingerprint(
        sources, {name: ref.fingerprint for name, ref in refs.items()}))
  corpus = corpus_lib.Corpus(data_config)
  path = tfds_builder.build(data_config, corpus)
  return DatasetRef(dir=path, fingerprint=corpus.fingerprint,
                    num_examples=tfds_builder.num_examples(path))


def prepare(data_config) -> tuple[tokenizer_lib.Tokenizer, DatasetRef | MixtureRef]:
  """Builds the dataset and trains the tokenizer where needed; both are cached in data_dir.
  A mixture's tokenizer is trained on a sample of its sources' train splits in the weights'
  proportions."""
  dataset = build_dataset(data_config)
  if isinstance(dataset, MixtureRef):
    train_source = [(tfds_builder.data_source(ref.dir, "train"), dataset.weights[name])
                    for name, ref in dataset.sources.items()]
  else:
    train_source = tfds_builder.data_source(dataset.dir, "train")
  tokenizer = tokenizer_training.train_tokenizer(data_config, train_source, dataset.fingerprint)
  return tokenizer, dataset


@dataclasses.dataclass(frozen=True)
class _Tokenize(grain.transforms.Map):
  tokenizer: tokenizer_lib.Tokenizer

  def map(self, record):
    tok = self.tokenizer
    ids = tok.encode(record["text"].decode("utf-8"))
    return {"tokens": np.array([tok.bos_id, *ids, tok.eos_id], dtype=np.int32)}


def _rename(row):
  return {"tokens": row["tokens"], "segment_ids": row["tokens_segment_ids"],
          "positions": row["tokens_positions"]}


def _stack_and_pad(rows, batch_size: int):
  # Zero rows (segment id 0) fill the last batch of a finite split to the full batch shape.
  return {key: np.pad(np.stack([r[key] for r in rows]), ((0, batch_size - len(rows)), (0, 0)))
          for key in rows[0]}


class LMIterator(grain.DatasetIterator):
  """Yields {'tokens', 'segment_ids', 'positions'}: int32 [batch_size // process_count, seq_len].

  A grain DatasetIterator on top of the pipeline's, so grain's Orbax handler
  (grain.checkpoint.CheckpointHandler) saves it as JSON. `get_state()` returns a
  JSON-serializable dict; `set_state()` on an iterator made with the same arguments resumes with
  bit-identical batches, and refuses (DataError) a state saved by a different pipeline.
  """

  def __init__(self, dataset: grain.IterDataset, identity: dict,
               source_names: tuple[str, ...] = ()):
    super().__init__()
    self._iterator = iter(dataset)
    self._identity = identity
    self._source_names = source_names
    # Tokens (non-padding positions) each mixture source contributed to the batches yielded.
    self.source_tokens = {name: 0 for name in source_names}
    # Close and drop the grain iterator (its threads / worker processes) when this object
    # goes, and at the latest at interpreter exit: grain's own __del__ fails noisily once
    # module teardown has begun. The callback holds __dict__, not self, so self can be freed.
    self._finalizer = weakref.finalize(self, _close_iterator, self.__dict__)

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    if self._source_names:
      source = batch.pop("source")[:, 0]
      real = (batch["segment_ids"] > 0).sum(axis=1)
      for i, name in enumerate(self._source_names):
        self.source_tokens[name] += int(real[source == i].sum())
    return batch

  def start_prefetch(self) -> None:
    """Starts reading ahead (grain's handler calls it after restoring); idempotent."""
    self._iterator.start_prefetch()

  def close(self) -> None:
    self._finalizer()
    super().close()

  def get_state(self) -> dict:
    state = {"format": STATE_FORMAT, "pipeline": self._identity,
             "grain": _to_json(self._iterator.get_state())}
    if self._source_names:
      state["source_tokens"] = dict(self.source_tokens)
    return state

  def set_state(self, state: dict) -> None:
    if state.get("format") != STATE_FORMAT or state.get("pipeline") != self._identity:
      raise DataError("data iterator state was saved by a different pipeline: saved "
                      f"{state.get('pipeline')} (format {state.get('format')}), this one "
                      f"{self._identity} (format {STATE_FORMAT})")
    self._iterator.set_state(_from_json(state["grain"]))
    if self._source_names:
      self.source_tokens = {name: int(state["source_tokens"][name])
                            for name in self._source_names}


def _close_iterator(attributes: dict) -> None:
  attributes.pop("_iterator").close()


# grain states hold tuples (the packer's slices) that JSON would turn into lists, and numpy
# scalars that JSON rejects; tag tuples so a restored state equals the saved one.
def _to_json(value):
  if isinstance(value, dict):
    return {str(k): _to_json(v) for k, v in value.items()}
  if isinstance(value, tuple):
    return {"__tuple__": [_to_json(v) for v in value]}
  if isinstance(value, list):
    return [_to_json(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f"unexpected {type(value).__name__} in grain iterator state: {value!r}")


def _from_json(value):
  if isinstance(value, dict):
    if set(value) == {"__tuple__"}:
      return tuple(_from_json(v) for v in value["__tuple__"])
    return {k: _from_json(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_from_json(v) for v in value]
  return value


def _packed_rows(source, data_config, tokenizer, split: str, *, process_index: int,
                 process_count: int, shuffle: bool, repeat: bool, seed: int, where: str
                 ) -> grain.IterDataset:
  """One build's documents for this process -> shuffle -> repeat -> tokenize -> packed rows."""
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if not len(ds):
    raise DataError(f"process {process_index} of {process_count} gets no documents of the "
                    f"{split} split ({len(source)} documents) in {where}")
  if shuffle:
    ds = ds.shuffle(seed=seed)  # followed by repeat: reshuffled with seed + epoch
  if repeat:
    ds = ds.repeat()
  # Reading and tokenizing run in threads; more threads than cores only adds contention.
  read_options = grain.ReadOptions(num_threads=min(16, os.cpu_count() or 1))
  ds = ds.map(_Tokenize(tokenizer)).to_iter_dataset(read_options)
  ds = grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={"tokens": data_config.seq_len})
  return ds.map(_rename)


@dataclasses.dataclass(frozen=True)
class _Tag(grain.transforms.Map):
  index: int

  def map(self, row):
    return {**row, "source": np.array([self.index], np.int32)}


def make_lm_iterator(data_config, tokenizer: tokenizer_lib.Tokenizer, split: str, *,
                     process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                     repeat: bool = True, seed: int = 0,
                     dataset: DatasetRef | MixtureRef | None = None) -> LMIterator:
  """Packed batches of `split` for one process; see the module docstring.

  `dataset` defaults to the build for `data_config` (built here if missing). Validation
  should use shuffle=False, repeat=False: a deterministic single pass (with a mixture, the pass
  ends when the first source's split does).
  """
  if data_config.batch_size % process_count:
    raise DataError(f"data.batch_size={data_config.batch_size} is not divisible by the "
                    f"process count {process_count}")
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} is not in [0, {process_count})")
  dataset = dataset or build_dataset(data_config)
  batch_size = data_config.batch_size // process_count
  rows = functools.partial(_packed_rows, data_config=data_config, tokenizer=tokenizer,
                           split=split, process_index=process_index,
                           process_count=process_count, shuffle=shuffle, repeat=repeat,
                           seed=seed)
  names: tuple[str, ...] = ()
  if isinstance(dataset, MixtureRef):
    names = tuple(dataset.sources)
    parts = {name: rows(tfds_builder.data_source(ref.dir, split), where=ref.dir).map(_Tag(i))
             for i, (name, ref) in enumerate(dataset.sources.items())}
    ds = grain.IterDataset.mix(parts, dataset.weights)
  else:
    ds = rows(tfds_builder.data_source(dataset.dir, split), where=dataset.dir)
  ds = ds.batch(batch_size, batch_fn=functools.partial(_stack_and_pad, batch_size=batch_size))
  if data_config.num_workers > 0:
    # grain's worker start-up reads an absl flag, which fails outside an absl app (tests,
    # notebooks) unless flags count as parsed; under absl.app.run this changes nothing.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_config.num_workers,
        per_worker_buffer_size=max(1, -(-data_config.prefetch // data_config.num_workers))))
  elif data_config.prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=data_config.prefetch)
  identity = {"dataset": dataset.fingerprint, "split": split, "seq_len": data_config.seq_len,
              "batch_size": batch_size, "process_index": process_index,
              "process_count": process_count, "shuffle": shuffle, "repeat": repeat,
              "seed": seed, "num_workers": data_config.num_workers,
              "tokenizer": tokenizer.fingerprint}
  if names:
    identity["mixture"] = {name: round(w, 9) for name, w in dataset.weights.items()}
  return LMIterator(ds, identity, names)
