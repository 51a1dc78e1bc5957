"""The corpus as a TFDS dataset in ArrayRecord files, built and read without TensorFlow.

TFDS 4.9.10 builds a `GeneratorBasedBuilder` with `file_format='array_record'` without
TensorFlow: examples are serialized by TFDS's own protobuf `example_serializer` and written by
`array_record`; reading goes through `as_data_source()` (random access, what grain needs). Two
TFDS defaults are avoided because they assume the builder lives in a TFDS dataset package:
`dataset_info_from_configs` (reads metadata files next to the module), so `_info` builds
`tfds.core.DatasetInfo` directly, and the derived `code_path`, which is set explicitly.

Layout: <data_dir>/legal_corpus/src_<fingerprint>/1.0.0/*.array_record-*. The BuilderConfig
name is the corpus fingerprint (a hash of the sources' contents, `max_docs`,
`validation_fraction` and `text_field`), so changed sources get a new build instead of a stale
one, and a finished build (`dataset_info.json` present) is reused: building is idempotent.
"""
import dataclasses
import os

from etils import epath
import tensorflow_datasets as tfds

from train.data import corpus as corpus_lib
from model.errors import DataError

NAME = "legal_corpus"


@dataclasses.dataclass(eq=False)
class LegalCorpusConfig(tfds.core.BuilderConfig):
  """One build: `name` is `src_<fingerprint>`; `corpus` generates its documents."""
  corpus: corpus_lib.Corpus | None = None


class LegalCorpus(tfds.core.GeneratorBasedBuilder):
  """Legal text documents with a stable `id`; splits `train` and `validation`."""

  VERSION = tfds.core.Version("1.0.0")
  # TFDS derives this from the top-level package, which fails for a namespace package (no
  # __init__.py) without the optional `importlib_resources` backport.
  code_path = epath.Path(__file__)
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Legal and license text for language-model pre-training.",
        features=tfds.features.FeaturesDict({"id": tfds.features.Text(),
                                             "text": tfds.features.Text()}),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # all sources are local
    corpus = self.builder_config.corpus
    counts = {split: 0 for split in corpus_lib.SPLITS}
    for split in corpus.index().values():
      counts[split] += 1
    # Catch empty splits before TFDS writes anything, with a message that says what to change.
    if not counts["train"]:
      raise DataError(f"the train split of {corpus.sources()} is empty "
                      f"(data.validation_fraction={corpus.validation_fraction})")
    if not counts["validation"]:
      raise DataError(f"the validation split of {corpus.sources()} is empty: "
                      f"{counts['train']} documents with data.validation_fraction="
                      f"{corpus.validation_fraction}; raise it or add documents")
    return {split: self._generate_examples(split) for split in corpus_lib.SPLITS}

  def _generate_examples(self, split):
    for doc in self.builder_config.corpus.split(split):
      yield doc.id, {"id": doc.id, "text": doc.text}


def build_dir(data_config, fingerprint: str) -> str:
  """Where the build of the corpus with this fingerprint lives (TFDS's own layout)."""
  return os.path.join(os.path.expanduser(data_config.data_dir), NAME, f"src_{fingerprint}",
                      str(LegalCorpus.VERSION))


def build(data_config, corpus: corpus_lib.Corpus | None = None) -> str:
  """Builds the dataset unless a build of the same sources exists; returns its folder."""
  corpus = corpus or corpus_lib.Corpus(data_config)
  path = build_dir(data_config, corpus.fingerprint)
  # TFDS would also skip a finished build, but checking first means a reused build constructs
  # no builder (which logs a warning for every config not declared in BUILDER_CONFIGS).
  if not os.path.exists(os.path.join(path, "dataset_info.json")):
    config = LegalCorpusConfig(name=f"src_{corpus.fingerprint}", corpus=corpus,
                               description=corpus.sources())
    builder = LegalCorpus(config=config, data_dir=os.path.expanduser(data_config.data_dir),
                          file_format=tfds.core.FileFormat.ARRAY_RECORD)
    builder.download_and_prepare()
  return path


def num_examples(dataset_dir: str) -> dict[str, int]:
  splits = tfds.builder_from_directory(dataset_dir).info.splits
  return {split: splits[split].num_examples for split in corpus_lib.SPLITS}


def data_source(dataset_dir: str, split: str):
  """Random-access source of {'id': bytes, 'text': bytes} records of a build's split.

  Reads through a read-only builder made from the build folder, so the source pickles small
  (for grain worker processes) and needs neither the sources nor this build's config.
  """
  if split not in corpus_lib.SPLITS:
    raise DataError(f"unknown split {split!r}; expected one of {corpus_lib.SPLITS}")
  if not os.path.exists(os.path.join(dataset_dir, "dataset_info.json")):
    raise DataError(f"{dataset_dir} is not a finished dataset build (no dataset_info.json)")
  return tfds.builder_from_directory(dataset_dir).as_data_source(split=split)
