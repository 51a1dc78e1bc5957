"""Tests of train/data on a small generated corpus (and a capped licensedcode one)."""
import gzip
import json
import os
import pathlib
import pickle
import random
import shutil

from grain import checkpoint as grain_checkpoint
import ml_collections
import numpy as np
import pytest

from configs import common
from train.data import corpus as corpus_lib
from train.data import examples as examples_lib
from train.data import pipeline
from train.data import tfds_builder
from model import tokenizer as tokenizer_lib
from train.data import tokenizer_training
from model.errors import DataError

_WORDS = ("the licensee shall not sublicense assign or transfer any rights under this agreement "
          "without prior written consent of licensor and all warranties are disclaimed to the "
          "maximum extent permitted by applicable law section clause party notice term").split()


def _text(rng: random.Random, n_words: int) -> str:
  lines = []
  while n_words > 0:
    k = min(n_words, rng.randint(5, 15))
    lines.append(" ".join(rng.choice(_WORDS) for _ in range(k)) + f" {rng.randint(1, 999)}.")
    n_words -= k
  return "\n".join(lines)


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory) -> pathlib.Path:
  """12 .txt files (3 in a subfolder), 15-line .jsonl and .jsonl.gz files, an ignored .md."""
  rng = random.Random(0)
  root = tmp_path_factory.mktemp("src") / "docs"
  (root / "sub").mkdir(parents=True)
  for i in range(12):
    (root / ("sub" if i < 3 else "") / f"doc{i}.txt").write_text(_text(rng, rng.randint(5, 200)))
  records = [json.dumps({"id": i, "text": _text(rng, rng.randint(5, 200))}) for i in range(30)]
  (root / "a.jsonl").write_text("\n".join(records[:8]) + "\n\n" + "\n".join(records[8:15]) + "\n")
  with gzip.open(root / "b.jsonl.gz", "wt") as f:
    f.write("\n".join(records[15:]) + "\n")
  (root / "README.md").write_text("not a document")
  return root


def _config(data_dir, *dirs, **overrides):
  c = common.base_config()
  c.data.update(data_dir=str(data_dir), use_licensedcode=False, extra_dirs=tuple(map(str, dirs)),
                validation_fraction=0.2, vocab_size=320, tokenizer_sentences=10_000, seq_len=32,
                batch_size=4, num_workers=0, prefetch=2)
  c.data.update(overrides)
  return c.data


@pytest.fixture(scope="module")
def prepared(docs_dir, tmp_path_factory):
  cfg = _config(tmp_path_factory.mktemp("data_dir"), docs_dir)
  tokenizer, dataset = pipeline.prepare(cfg)
  return cfg, tokenizer, dataset


def _expected_stream(tokenizer, source, indices):
  docs = [[tokenizer.bos_id, *tokenizer.encode(source[i]["text"].decode()), tokenizer.eos_id]
          for i in indices]
  return np.concatenate(docs).astype(np.int32), docs


def _check_rows_and_stream(batch_list, seq_len):
  """Checks segment/position invariants and returns the non-padding tokens in order."""
  stream = []
  for batch in batch_list:
    for key in ("tokens", "segment_ids", "positions"):
      assert batch[key].dtype == np.int32 and batch[key].shape[1] == seq_len
    for tokens, seg, pos in zip(batch["tokens"], batch["segment_ids"], batch["positions"]):
      n = int((seg > 0).sum())
      assert (seg[n:] == 0).all() and (tokens[n:] == 0).all()  # padding only at the end
      starts = np.flatnonzero(np.diff(seg[:n], prepend=0))
      np.testing.assert_array_equal(seg[starts], np.arange(1, len(starts) + 1))
      for start, stop in zip(starts, [*starts[1:], n]):
        np.testing.assert_array_equal(pos[start:stop], np.arange(stop - start))
        piece = tokens[start:stop]
        # A segment is a piece of one document: bos only first, eos only last.
        assert (piece[1:] != 2).all() and (piece[:-1] != 3).all()
      stream.append(tokens[:n])
  return np.concatenate(stream)


def test_corpus_ids_split_and_cap(docs_dir, tmp_path):
  cfg = _config(tmp_path, docs_dir)
  index = corpus_lib.Corpus(cfg).index()
  assert len(index) == 12 + 15 + 15
  assert "docs/sub/doc0.txt" in index and "docs/a.jsonl:10" in index  # line 9 is blank
  assert "docs/b.jsonl.gz:15" in index
  assert index == corpus_lib.Corpus(cfg).index()  # deterministic
  train = {d.id for d in corpus_lib.Corpus(cfg).split("train")}
  valid = {d.id for d in corpus_lib.Corpus(cfg).split("validation")}
  assert train and valid and not train & valid and train | valid == set(index)
  # A document's split depends only on its id, so adding documents moves none.
  (more := tmp_path / "more" / "docs").mkdir(parents=True)
  (more / "x.txt").write_text("an extra document")
  index2 = corpus_lib.Corpus(_config(tmp_path, docs_dir, more.parent)).index()
  assert {i: s for i, s in index2.items() if i in index} == index
  capped = corpus_lib.Corpus(_config(tmp_path, docs_dir, max_docs=10)).index()
  assert len(capped) == 10 and set(capped) <= set(index)
  assert capped == corpus_lib.Corpus(_config(tmp_path, docs_dir, max_docs=10)).index()


def test_files_of_one_folder_are_one_source(docs_dir, tmp_path):
  # IMDB's unsup and train splits sit beside its test split: name the two files, not the folder.
  index = corpus_lib.Corpus(_config(tmp_path, docs_dir / "a.jsonl", docs_dir / "b.jsonl.gz")
                            ).index()
  whole = corpus_lib.Corpus(_config(tmp_path, docs_dir)).index()
  assert set(index) == {i for i in whole if ".jsonl" in i} and len(index) == 30
  assert {i: whole[i] for i in index} == index     # same ids, same splits as the whole folder


def test_fingerprint_tracks_sources(docs_dir, tmp_path):
  base = corpus_lib.Corpus(_config(tmp_path, docs_dir)).fingerprint
  assert base == corpus_lib.Corpus(_config(tmp_path, docs_dir)).fingerprint
  for change in ({"max_docs": 10}, {"validation_fraction": 0.1}, {"text_field": "body"}):
    assert corpus_lib.Corpus(_config(tmp_path, docs_dir, **change)).fingerprint != base
  copy = tmp_path / "copy" / "docs"
  shutil.copytree(docs_dir, copy)
  assert corpus_lib.Corpus(_config(tmp_path, copy)).fingerprint == base  # path-independent
  (copy / "doc5.txt").write_text("changed")
  assert corpus_lib.Corpus(_config(tmp_path, copy)).fingerprint != base


def test_tfds_build_reuse_and_read_back(prepared):
  cfg, _, dataset = prepared
  assert sum(dataset.num_examples.values()) == 42
  files = sorted(pathlib.Path(dataset.dir).glob("*.array_record-*"))
  assert {f.name.split("-")[1].split(".")[0] for f in files} == {"train", "validation"}
  mtimes = [f.stat().st_mtime_ns for f in files]
  assert pipeline.build_dataset(cfg) == dataset  # second build reuses the first
  assert [f.stat().st_mtime_ns for f in files] == mtimes
  corpus = corpus_lib.Corpus(cfg)
  for split in corpus_lib.SPLITS:
    source = tfds_builder.data_source(dataset.dir, split)
    read = {r["id"].decode(): r["text"].decode() for r in (source[i] for i in range(len(source)))}
    assert read == dict(corpus.split(split))
  other = pipeline.build_dataset(_config(cfg.data_dir, *cfg.extra_dirs, max_docs=20))
  assert other.dir != dataset.dir and sum(other.num_examples.values()) == 20


def test_tokenizer_cache_roundtrip_and_ids(prepared, tmp_path):
  cfg, tok, dataset = prepared
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  assert 260 < tok.vocab_size <= cfg.vocab_size
  mtime = os.stat(tok.path).st_mtime_ns
  tok2, _ = pipeline.prepare(cfg)
  assert tok2.path == tok.path and os.stat(tok.path).st_mtime_ns == mtime
  for text in ("the licensee shall", "  Unseen: 日本語 ß ✓ 🙂\n\ttabs  ", "x"):
    ids = tok.encode(text)
    assert tokenizer_lib.UNK_ID not in ids  # byte fallback, never <unk>
    assert tok.decode(ids) == text and tok.decode(np.array(ids)) == text
  restored = tokenizer_lib.load_tokenizer(tok.path)
  assert restored.encode("assign the rights") == tok.encode("assign the rights")
  assert pickle.loads(pickle.dumps(tok)).encode("notice") == tok.encode("notice")
  assert tokenizer_training.model_path(cfg, dataset.fingerprint) == pathlib.Path(tok.path)
  retrained = tokenizer_training.train_tokenizer(  # deterministic: same sample, same model
      _config(tmp_path, *cfg.extra_dirs), tfds_builder.data_source(dataset.dir, "train"),
      dataset.fingerprint)
  assert retrained.path != tok.path and retrained.fingerprint == tok.fingerprint


def test_packing_keeps_every_token(prepared):
  cfg, tok, dataset = prepared
  it = pipeline.make_lm_iterator(cfg, tok, "train", shuffle=False, repeat=False, dataset=dataset)
  batches = list(it)
  assert all(b["tokens"].shape == (cfg.batch_size, cfg.seq_len) for b in batches)
  source = tfds_builder.data_source(dataset.dir, "train")
  expected, _ = _expected_stream(tok, source, range(len(source)))
  np.testing.assert_array_equal(_check_rows_and_stream(batches, cfg.seq_len), expected)
  assert (batches[-1]["segment_ids"][-1] == 0).any()  # the end of a finite split is padded


def test_process_shards_are_disjoint_and_cover(prepared):
  cfg, tok, dataset = prepared
  source = tfds_builder.data_source(dataset.dir, "train")
  seen = []
  for p in range(2):
    it = pipeline.make_lm_iterator(cfg, tok, "train", process_index=p, process_count=2,
                                   shuffle=False, repeat=False, dataset=dataset)
    batches = list(it)
    assert batches[0]["tokens"].shape == (cfg.batch_size // 2, cfg.seq_len)
    expected, docs = _expected_stream(tok, source, range(p, len(source), 2))
    np.testing.assert_array_equal(_check_rows_and_stream(batches, cfg.seq_len), expected)
    seen.append({tuple(d) for d in docs})
  assert not seen[0] & seen[1]
  _, all_docs = _expected_stream(tok, source, range(len(source)))
  assert seen[0] | seen[1] == {tuple(d) for d in all_docs}


def _assert_resumes(cfg, tok, dataset, skip, directory):
  # Through grain's Orbax handler, as model/checkpoint.py saves and restores it.
  handler = grain_checkpoint.CheckpointHandler()
  it = pipeline.make_lm_iterator(cfg, tok, "train", seed=3, dataset=dataset)
  for _ in range(skip):
    next(it)
  directory.mkdir()
  handler.save(directory, args=grain_checkpoint.CheckpointSave(it))
  expected = [next(it) for _ in range(5)]
  it.close()
  resumed = pipeline.make_lm_iterator(cfg, tok, "train", seed=3, dataset=dataset)
  handler.restore(directory, args=grain_checkpoint.CheckpointRestore(resumed))
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  resumed.close()


def test_state_restore_is_exact(prepared, tmp_path):
  cfg, tok, dataset = prepared
  for skip in (0, 7, 45):  # 45 batches cross an epoch boundary of this corpus
    _assert_resumes(cfg, tok, dataset, skip, tmp_path / str(skip))
  it = pipeline.make_lm_iterator(cfg, tok, "train", seed=3, dataset=dataset)
  other = pipeline.make_lm_iterator(cfg, tok, "train", seed=4, dataset=dataset)
  with pytest.raises(DataError, match="different pipeline"):
    other.set_state(it.get_state())


@pytest.mark.slow
def test_state_restore_with_worker_processes(prepared, tmp_path):
  cfg, tok, dataset = prepared
  _assert_resumes(_config(cfg.data_dir, *cfg.extra_dirs, num_workers=2), tok, dataset, 9,
                  tmp_path / "9")


def test_licensedcode_corpus_strips_front_matter(tmp_path):
  cfg = _config(tmp_path, use_licensedcode=True, max_docs=300, validation_fraction=0.05)
  docs = list(corpus_lib.Corpus(cfg).split("train"))
  assert 250 < len(docs) < 300
  assert {d.id.split("/")[1] for d in docs} == {"licenses", "rules"}
  assert not any(d.text.startswith("---\n") or "license_expression:" in d.text[:300]
                 for d in docs)


@pytest.mark.parametrize("name, files, message", [
    ("missing", None, "is not an existing folder"),
    ("empty", {"notes.md": b"x"}, "has no .txt/.jsonl/.jsonl.gz files"),
    ("bad_json", {"d.jsonl": b'{"text": "a"}\n{"text": "b"}\n{"text": oops}\n'},
     r"d.jsonl:3: malformed JSON line"),
    ("no_field", {"d.jsonl": b'{"body": "a"}\n'}, r"d.jsonl:1: expected a JSON object"),
    ("latin1_txt", {"d.txt": "caf\u00e9".encode("latin-1")}, r"d.txt: not valid UTF-8"),
    ("latin1_jsonl", {"d.jsonl": b'{"text": "ok"}\n{"text": "caf\xe9"}\n'},
     r"d.jsonl:2: not valid UTF-8"),
    ("bad_gzip", {"d.jsonl.gz": b"not gzip"}, r"d.jsonl.gz: not a readable gzip file"),
    ("blank", {"d.txt": b"  \n", "e.jsonl": b'{"text": " "}\n'}, "empty corpus"),
])
def test_bad_input_raises_clear_error(tmp_path, name, files, message):
  folder = tmp_path / name
  if files is not None:
    folder.mkdir()
    for file_name, data in files.items():
      (folder / file_name).write_bytes(data)
  with pytest.raises(DataError, match=message) as error:
    corpus_lib.Corpus(_config(tmp_path, folder)).index()
  assert str(folder) in str(error.value)


def test_bad_config_raises_clear_error(prepared, tmp_path):
  cfg, tok, dataset = prepared
  with pytest.raises(DataError, match="data.batch_size=4 is not divisible"):
    pipeline.make_lm_iterator(cfg, tok, "train", process_count=3, dataset=dataset)
  with pytest.raises(DataError, match="data.vocab_size=100"):
    pipeline.prepare(_config(tmp_path, *cfg.extra_dirs, vocab_size=100))
  with pytest.raises(DataError, match="data.validation_fraction"):
    corpus_lib.Corpus(_config(tmp_path, *cfg.extra_dirs, validation_fraction=1.0))
  with pytest.raises(DataError, match="no sources"):
    corpus_lib.Corpus(_config(tmp_path))


def test_bad_lines_skip_policy_counts_and_names_each_line(tmp_path, caplog):
  folder = tmp_path / "dump"
  folder.mkdir()
  (folder / "d.jsonl").write_bytes(b'{"text": "first good"}\n{"text": oops}\n{"body": "x"}\n'
                                   b'{"text": "caf\xe9"}\n\n{"text": "second good"}\n')
  with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSON line.*bad_lines=skip"):
    corpus_lib.Corpus(_config(tmp_path, folder, validation_fraction=0.0)).index()

  corpus = corpus_lib.Corpus(_config(tmp_path, folder, validation_fraction=0.0,
                                     bad_lines="skip"))
  assert sorted(corpus.index()) == ["dump/d.jsonl:1", "dump/d.jsonl:6"]
  assert [d.text for d in corpus.split("train")] == ["first good", "second good"]
  assert [line.split(": ")[0] for line in corpus.skipped_lines] == [
      f"{folder}/d.jsonl:{n}" for n in (2, 3, 4)]   # counted once, though read twice
  warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any("d.jsonl:4: not valid UTF-8" in w for w in warned)
  assert any("skipped 3 bad JSONL lines" in w for w in warned)
  # A "skip" build never stands in for a "fail" one, which must still report the bad lines.
  fail = corpus_lib.Corpus(_config(tmp_path, folder, validation_fraction=0.0))
  assert corpus.fingerprint != fail.fingerprint


def test_example_iterator_visits_each_row_once_an_epoch_and_resumes_exactly():
  """The fine-tuning train iterator (examples.make_iterator): seeded, an epoch a permutation of
  the rows, and a restored state continues where it was saved."""
  cfg = ml_collections.ConfigDict(dict(seq_len=4, batch_size=2, prefetch=0))
  rows = [{"tokens": np.full(4, i, np.int32), "label": np.int32(i)} for i in range(6)]
  make = lambda: examples_lib.make_iterator(rows, cfg, split="train", shuffle=True,
                                            repeat=True, seed=3)

  def draws(it, n):
    return [int(label) for _ in range(n) for label in next(it)["label"]]
  seen = draws(make(), 30)                       # 10 epochs of 6 rows
  epochs = [seen[6 * e:6 * e + 6] for e in range(10)]
  assert all(sorted(epoch) == list(range(6)) for epoch in epochs)
  assert len({tuple(epoch) for epoch in epochs}) > 1   # reshuffled between epochs
  assert seen == draws(make(), 30)               # the same seed, the same order
  it = make()
  draws(it, 7)
  resumed = make()
  resumed.set_state(it.get_state())
  assert draws(resumed, 10) == draws(it, 10)
