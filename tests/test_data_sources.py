"""Fine-tuning data sources: CSV/TSV files, TFDS datasets (a real ArrayRecord build, offline) and
the one-line errors for missing files and unprepared datasets."""
import gzip

from etils import epath
import pytest

from configs import legal_summ_finetune, sentiment_finetune
from model.errors import DataError
from train.data import examples as examples_lib
from train.data import sources

tfds = sources._import_tfds()   # pylint: disable=protected-access


class TinyReviewsForTests(tfds.core.GeneratorBasedBuilder):
  """imdb_reviews' features (text bytes, 2-class label) and splits, 40 + 12 reviews."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = epath.Path(__file__)     # TFDS would derive it from the (namespace) package
  RELEASE_NOTES = {"1.0.0": "Test data."}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                             "label": tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples("train", 40),
            "test": self._generate_examples("test", 12)}

  def _generate_examples(self, split, n):
    for i in range(n):
      word = "great" if i % 2 else "awful"
      yield f"{split}{i}", {"text": f"{split} review {i}: {word} film, café scenes", "label": i % 2}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = TinyReviewsForTests(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return str(data_dir)


def _classify_cfg(**kw):
  cfg = sentiment_finetune.get_config("tiny").data
  cfg.update(**kw)
  return cfg


def test_parse_tfds_spec():
  assert sources.parse_tfds("tfds:imdb_reviews:test") == ("imdb_reviews", "test")
  assert sources.parse_tfds("tfds:imdb_reviews") == ("imdb_reviews", "train")
  assert sources.parse_tfds("tfds:imdb_reviews/plain_text:train[:10%]") == (
      "imdb_reviews/plain_text", "train[:10%]")
  with pytest.raises(DataError, match="expected tfds:<name>"):
    sources.parse_tfds("tfds::train")


def test_tfds_dataset_reads_real_records(tfds_dir):
  name = "tiny_reviews_for_tests"
  cfg = _classify_cfg(train_file=f"tfds:{name}:train", test_file=f"tfds:{name}:test",
                      data_dir=tfds_dir, validation_fraction=0.25)
  splits = examples_lib.load_splits(cfg, "classify", num_classes=2)
  assert len(splits["train"]) + len(splits["validation"]) == 40 and len(splits["test"]) == 12
  assert splits["validation"] and splits["train"]
  every = splits["train"] + splits["validation"]
  assert all(isinstance(e.text, str) and isinstance(e.target, int) for e in every)
  assert all(e.target == (1 if "great" in e.text else 0) for e in every + splits["test"])
  assert "café" in every[0].text                      # bytes decoded as UTF-8
  assert {e.source for e in every} == {name}
  assert len({e.id for e in every}) == 40 and every[0].id.startswith(f"{name}:train:")
  # Same split on a second read; the fingerprint names the dataset, not a file.
  again = examples_lib.load_splits(cfg, "classify", num_classes=2)
  assert [e.id for e in again["validation"]] == [e.id for e in splits["validation"]]
  assert examples_lib.fingerprint(cfg) == examples_lib.fingerprint(cfg)
  # A slice of a split, and a named config-less dataset with an explicit wrong field.
  part = examples_lib.read_examples(f"tfds:{name}:test[:4]", "classify", cfg, "data.test_file")
  assert len(part) == 4
  cfg.text_field = "review"
  with pytest.raises(DataError, match="no feature 'review' \\(features: text, label\\)"):
    examples_lib.read_examples(f"tfds:{name}:train", "classify", cfg)


def test_tfds_not_prepared_is_one_line_with_the_prepare_command(tmp_path):
  cfg = _classify_cfg(train_file="tfds:imdb_reviews:train", data_dir=str(tmp_path))
  with pytest.raises(DataError) as error:
    examples_lib.load_splits(cfg, "classify", num_classes=2)
  message = str(error.value)
  assert "\n" not in message
  assert "tfds:imdb_reviews is not prepared in data.data_dir=" in message
  assert f"python -m train.data.sources tfds:imdb_reviews --data_dir={tmp_path}" in message
  with pytest.raises(DataError, match="no such TFDS dataset"):
    examples_lib.read_examples("tfds:no_such_dataset_xyz:train", "classify", cfg)


def test_tfds_bad_split_is_a_data_error(tfds_dir):
  cfg = _classify_cfg(data_dir=tfds_dir)
  with pytest.raises(DataError, match="bad split 'validation'"):
    examples_lib.read_examples("tfds:tiny_reviews_for_tests:validation", "classify", cfg)


CSV = ('id,text,label\n'
       'a1,"A fine, moving film",1\n'
       'a2,"Dull ""thriller""\nwith a second line",0\n'
       'a3,Not a number,positive\n'
       '\n'
       'a4,Fine again,1\n')


def test_csv_reads_quoted_multiline_rows_and_reports_bad_rows(tmp_path):
  path = tmp_path / "reviews.csv.gz"
  with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
    f.write(CSV)
  cfg = _classify_cfg()
  with pytest.raises(DataError, match=r"reviews.csv.gz:5: expected an integer in column 'label'"
                                      r", got 'positive' \(set config.data.bad_lines=skip"):
    examples_lib.read_examples(str(path), "classify", cfg)
  cfg.bad_lines = "skip"
  kept = examples_lib.read_examples(str(path), "classify", cfg)
  assert [(e.id, e.target) for e in kept] == [("a1", 1), ("a2", 0), ("a4", 1)]
  assert kept[1].text == 'Dull "thriller"\nwith a second line'
  assert kept[0].source == "reviews.csv.gz"


def test_tsv_summaries_with_bad_utf8_and_wrong_field_count(tmp_path):
  path = tmp_path / "pairs.tsv"
  path.write_bytes(b"text\tsummary\n"
                   b"the licensee shall pay\tyou pay\n"
                   b"caf\xe9 terms\tbad bytes\n"
                   b"only one field\n"
                   b"we may end this\tthey can stop\n")
  cfg = legal_summ_finetune.get_config("tiny").data
  with pytest.raises(DataError, match=r"pairs.tsv:3: not valid UTF-8 \(column 'text'\)"):
    examples_lib.read_examples(str(path), "summarize", cfg)
  cfg.bad_lines = "skip"
  kept = examples_lib.read_examples(str(path), "summarize", cfg)
  assert [(e.id, e.target) for e in kept] == [("pairs.tsv:2", "you pay"),
                                              ("pairs.tsv:5", "they can stop")]


def test_csv_header_without_the_field_names_the_columns(tmp_path):
  path = tmp_path / "r.csv"
  path.write_text("review,sentiment\ngood,1\n")
  with pytest.raises(DataError, match=r"r.csv: the header row has no column 'text' "
                                      r"\(columns: review, sentiment\)"):
    examples_lib.read_examples(str(path), "classify", _classify_cfg())
  cfg = _classify_cfg(text_field="review", label_field="sentiment")
  assert [e.target for e in examples_lib.read_examples(str(path), "classify", cfg)] == [1]


def test_missing_local_file_is_one_line_naming_key_path_and_where_to_get_it(tmp_path,
                                                                             monkeypatch):
  monkeypatch.setenv("LEGAL_LM_DATA", str(tmp_path / "nowhere"))
  config = sentiment_finetune.get_config("imdb")
  assert config.data.train_file == str(tmp_path / "nowhere" / "sentiment_imdb/train.jsonl.gz")
  with pytest.raises(DataError) as error:
    examples_lib.load_splits(config.data, "classify", num_classes=2)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"config.data.train_file={config.data.train_file}: no such file")
  assert f"$LEGAL_LM_DATA={tmp_path / 'nowhere'}" in message
  assert 'README.md, "Datasets: where they come from"' in message
  config.data.train_file = str(tmp_path)      # a folder is not a file either
  with pytest.raises(DataError, match="config.data.train_file=.*: no such file"):
    examples_lib.fingerprint(config.data)


def test_imdb_tfds_preset_reads_tfds_and_keeps_the_rest():
  local, hub = sentiment_finetune.get_config("imdb"), sentiment_finetune.get_config("imdb_tfds")
  assert (hub.data.train_file, hub.data.test_file) == ("tfds:imdb_reviews:train",
                                                       "tfds:imdb_reviews:test")
  for key in ("seq_len", "batch_size", "truncation", "validation_fraction", "max_examples"):
    assert hub.data[key] == local.data[key]
