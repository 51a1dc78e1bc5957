"""Pre-training data mixtures (train/data/mixture.py, train/data/pipeline.py) on generated
sources: nothing here needs ../shared/data.

Why these checks: a mixture must (1) reject malformed `data.mixture` entries with a message
naming the entry, (2) deliver tokens in the configured shares, counted per source, (3) resume
bit for bit from a saved iterator state, counts included, in-process and through a real kill -9
of `python -m train.main`, and (4) train its tokenizer on every source in proportion.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import common
from helpers import env
from model.errors import DataError
from train.data import mixture as mixture_lib
from train.data import pipeline, tokenizer_training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Three sources with disjoint words, so a source's tokens are recognisable.
WORDS = {"alpha": "licensor licensee warranty indemnify royalty".split(),
         "beta": "plaintiff appellant judgment tribunal decree".split(),
         "gamma": "movie actor camera script popcorn".split()}


def _write_sources(root):
  rng = np.random.default_rng(0)
  paths = {}
  for name, words in WORDS.items():
    folder = root / name
    folder.mkdir()
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as f:
      for i in range(80):
        n = int(rng.integers(5, 60))   # lengths differ, so document shares != token shares
        f.write(json.dumps({"text": " ".join(rng.choice(words, n))}) + "\n")
    paths[name] = str(folder)
  return paths


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  return _write_sources(tmp_path_factory.mktemp("mixture_sources"))


WEIGHTS = {"alpha": 0.5, "beta": 0.3, "gamma": 0.2}


def _data_config(sources, data_dir, weights=WEIGHTS):
  c = common.base_config().data
  c.update(use_licensedcode=False, data_dir=str(data_dir), vocab_size=320, seq_len=32,
           batch_size=8, validation_fraction=0.1, prefetch=2, tokenizer_sentences=5000)
  c.mixture = tuple(f"{name}={sources[name]}:{w}" for name, w in weights.items())
  return c


@pytest.fixture(scope="module")
def prepared(sources, tmp_path_factory):
  config = _data_config(sources, tmp_path_factory.mktemp("mixture_cache"))
  tokenizer, dataset = pipeline.prepare(config)
  return config, tokenizer, dataset


@pytest.mark.parametrize("entry, message", [
    ("alpha", "name=source:weight"),
    ("alpha=/x:0", "positive"),
    ("alpha=/x:-1", "positive"),
    ("alpha=/x:abc", "name=source:weight"),
])
def test_malformed_entries_are_named(entry, message):
  c = common.base_config().data
  c.mixture = (entry, "beta=licensedcode:1")
  with pytest.raises(DataError, match=message):
    mixture_lib.parse(c)


def test_parse_and_duplicate_names():
  c = common.base_config().data
  c.mixture = ("a=licensedcode:2", "b=/data/x.jsonl.gz:1")
  assert mixture_lib.parse(c) == [mixture_lib.Source("a", "licensedcode", 2.0),
                                  mixture_lib.Source("b", "/data/x.jsonl.gz", 1.0)]
  assert mixture_lib.normalized_weights(mixture_lib.parse(c)) == pytest.approx(
      {"a": 2 / 3, "b": 1 / 3})
  c.mixture = ("a=licensedcode:1", "a=/x:1")
  with pytest.raises(DataError, match="two sources"):
    mixture_lib.parse(c)


def _source_of(tokenizer, batch) -> list[str]:
  """The source of each non-padding row, recognised by its words."""
  out = []
  for row, seg in zip(batch["tokens"], batch["segment_ids"]):
    text = tokenizer.decode([int(t) for t, s in zip(row, seg) if s > 0 and t > 3])
    found = {name for name, words in WORDS.items() if any(w in text for w in words)}
    assert len(found) == 1, text        # a packed row holds one source's documents
    out.append(found.pop())
  return out


def test_token_shares_follow_the_weights_and_are_counted(prepared):
  config, tokenizer, dataset = prepared
  assert isinstance(dataset, pipeline.MixtureRef) and list(dataset.sources) == list(WEIGHTS)
  it = pipeline.make_lm_iterator(config, tokenizer, "train", dataset=dataset, seed=1)
  counted = {name: 0 for name in WEIGHTS}
  for _ in range(50):
    batch = next(it)
    assert set(batch) == {"tokens", "segment_ids", "positions"}
    for name, row_seg in zip(_source_of(tokenizer, batch), batch["segment_ids"]):
      counted[name] += int((row_seg > 0).sum())
  it.close()
  assert counted == it.source_tokens          # the iterator's own counts agree
  total = sum(counted.values())
  assert total == 50 * 8 * 32                 # repeating: every row full
  for name, weight in WEIGHTS.items():
    assert counted[name] / total == pytest.approx(weight, abs=0.01), counted


def test_iterator_state_resumes_bit_identical(prepared):
  config, tokenizer, dataset = prepared
  make = lambda: pipeline.make_lm_iterator(config, tokenizer, "train", dataset=dataset, seed=3)
  it = make()
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))     # what the checkpoint stores
  expected = [next(it) for _ in range(9)]
  expected_counts = dict(it.source_tokens)
  it.close()
  resumed = make()
  resumed.set_state(state)
  got = [next(resumed) for _ in range(9)]
  resumed.close()
  for a, b in zip(expected, got):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert resumed.source_tokens == expected_counts
  # A state from other weights is refused.
  other = pipeline.build_dataset(_data_config_like(config, {"alpha": 0.2, "beta": 0.3,
                                                            "gamma": 0.5}))
  with pytest.raises(DataError, match="different pipeline"):
    pipeline.make_lm_iterator(config, tokenizer, "train", dataset=other, seed=3).set_state(state)


def _data_config_like(config, weights):
  c = config.copy_and_resolve_references()
  specs = {e.split("=")[0]: e.split("=", 1)[1].rsplit(":", 1)[0] for e in config.mixture}
  c.mixture = tuple(f"{n}={specs[n]}:{w}" for n, w in weights.items())
  return c


def test_tokenizer_sample_follows_the_weights(prepared):
  config, _, dataset = prepared
  from train.data import tfds_builder
  parts = [(tfds_builder.data_source(ref.dir, "train"), dataset.weights[name])
           for name, ref in dataset.sources.items()]
  lines = tokenizer_training._weighted_sentences(parts, 60)
  per_source = {name: sum(any(w in line for w in words) for line in lines)
                for name, words in WORDS.items()}
  assert per_source == {"alpha": 30, "beta": 18, "gamma": 12}


# --- a real run, killed and resumed ----------------------------------------------------------------

def _args(sources, data_dir, workdir):
  flags = {"data.use_licensedcode": False, "data.data_dir": str(data_dir),
           "data.mixture": "(" + ",".join(f"'{n}={sources[n]}:{w}'"
                                          for n, w in WEIGHTS.items()) + ",)",
           "data.vocab_size": 320, "data.seq_len": 32, "data.batch_size": 8,
           "data.validation_fraction": 0.1, "data.prefetch": 2, "data.tokenizer_sentences": 5000,
           "model.num_layers": 1, "model.d_model": 32, "model.num_heads": 2,
           "model.num_kv_heads": 1, "model.head_dim": 16, "model.mlp_dim": 64,
           "optim.warmup_steps": 5, "train.num_steps": 30, "train.log_every": 1,
           "train.eval_every": 15, "train.eval_batches": 2, "train.checkpoint_every": 10}
  return (["--config=configs/legal_pretrain.py:tiny", f"--workdir={workdir}"] +
          [f"--config.{k}={v}" for k, v in flags.items()])


def _train_rows(workdir):
  """{step: the train metrics row}; a resumed run re-logs steps: the last entry wins."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if row["split"] == "train":
        out[row["step"]] = {k: v for k, v in row.items()
                            if k == "loss" or k.startswith(("tokens/", "token_share/"))}
  return out


@pytest.mark.slow
def test_killed_mixture_run_resumes_bit_identical(sources, tmp_path):
  cache = tmp_path / "cache"
  reference = tmp_path / "reference"
  done = subprocess.run([sys.executable, "-m", "train.main",
                         *_args(sources, cache, reference)], cwd=REPO, env=env(),
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  workdir = tmp_path / "killed"
  args = _args(sources, cache, workdir)
  with open(tmp_path / "killed.log", "w") as log:
    proc = subprocess.Popen([sys.executable, "-m", "train.main", *args], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 600
    # Killed as soon as checkpoint 10 is there (Orbax renames a finished save into place, so
    # the folder is whole): on a fast CPU the 20 steps to the end take well under a second.
    while not os.path.isdir(workdir / "checkpoints" / "10" / "data"):
      assert proc.poll() is None and time.time() < deadline, open(tmp_path / "killed.log").read()
      time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  steps = sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
  assert steps and steps[-1] < 30, steps
  resumed = subprocess.run([sys.executable, "-m", "train.main", *args], cwd=REPO, env=env(),
                           capture_output=True, text=True, timeout=900)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step" in resumed.stderr
  want, got = _train_rows(reference), _train_rows(workdir)
  assert got == want
  last = want[30]
  assert sum(v for k, v in last.items() if k.startswith("tokens/")) == 30 * 8 * 32
  for name, weight in WEIGHTS.items():
    assert last[f"token_share/{name}"] == pytest.approx(weight, abs=0.02)
