"""Training a classifier on the windows it is scored on (data.train_window_stride): each
example's views, the iterator that draws one per visit (deterministic, resumable, an epoch as
long as without views), and the wiring from a config to the train batches."""
import re

import chex
import ml_collections
import numpy as np
import pytest

from configs import legal_summ_finetune, sentiment_finetune
from helpers import CharTokenizer, _sentiment_config
from infer import classifier_rows
from train import build
from train import inputs as inputs_lib
from train.config_check import ConfigError
from train.data import examples as examples_lib

pytestmark = pytest.mark.usefixtures("one_device")

CFG = ml_collections.ConfigDict(dict(seq_len=6, truncation="head_tail", batch_size=2,
                                     prefetch=0))


def _example(i: int, text: str) -> examples_lib.Example:
  return examples_lib.Example(f"e{i}", text, i, "s")   # label = index: rows name their example


def test_views_are_the_training_row_then_the_windows_inference_reads():
  tok = CharTokenizer()
  long, short = _example(1, "abcdefghij"), _example(0, "xyz")
  views = examples_lib.encode_views(long, tok, CFG, stride=3)
  chex.assert_trees_all_equal(views[0], examples_lib.encode(long, tok, "classify", CFG))
  rows, _ = classifier_rows.rows_for(tok, [long.text], 6, "head_tail", 3)
  assert len(views) == len(rows) == 4
  for view, ids in zip(views, rows):
    np.testing.assert_array_equal(view["tokens"][:len(ids)], ids)
    np.testing.assert_array_equal(view["mask"], np.arange(6) < len(ids))
    assert view["label"] == 1
  only = examples_lib.encode_views(short, tok, CFG, stride=3)
  chex.assert_trees_all_equal(only, [examples_lib.encode(short, tok, "classify", CFG)])


def _draws(it, n: int) -> list[tuple[int, tuple]]:
  """(label, token row) of every row of the next n batches."""
  out = []
  for _ in range(n):
    batch = next(it)
    out += [(int(label), tuple(row)) for label, row in zip(batch["label"], batch["tokens"])]
  return out


def test_each_visit_draws_one_view_deterministically_and_resumes():
  tok = CharTokenizer()
  texts = ["abcdefghij", "xyz", "klmnopqrstuvw", "ab"]
  views = [examples_lib.encode_views(_example(i, t), tok, CFG, 3) for i, t in enumerate(texts)]
  make = lambda: examples_lib.make_iterator(views, CFG, split="train", shuffle=True,
                                            repeat=True, seed=3, views=True)
  draws = _draws(make(), 60)                    # 30 epochs of 4 examples
  options = [{tuple(v["tokens"]) for v in ex} for ex in views]
  for label, row in draws:
    assert row in options[label]                 # a row is a view of its own example
  for epoch in range(30):                        # an epoch visits every example once
    assert sorted(label for label, _ in draws[4 * epoch:4 * epoch + 4]) == [0, 1, 2, 3]
  for label in (0, 2):                           # over the epochs, every view is drawn
    assert {row for lab, row in draws if lab == label} == options[label]
  assert draws == _draws(make(), 60)             # the same seed, the same draws
  it = make()
  _draws(it, 7)
  state = it.get_state()
  resumed = make()
  resumed.set_state(state)
  assert _draws(resumed, 10) == _draws(it, 10)   # a restored iterator continues exactly


def test_train_batches_hold_windows_only_when_asked(sentiment_files, tmp_path):
  def train_rows(stride):
    config = _sentiment_config(sentiment_files, tmp_path / "cache")
    config.data.update(seq_len=16, train_window_stride=stride)
    config, sources = build.resolve(config)
    inputs = inputs_lib.make(config, sources, None)
    truncated = {tuple(r["tokens"]) for r in inputs.rows["train"]}
    return truncated, {row for _, row in _draws(inputs.train_iter, 30)}
  truncated, seen = train_rows(0)
  assert seen <= truncated
  truncated, seen = train_rows(8)
  assert len(seen - truncated) > len(seen) // 2    # most reviews are longer than 14 ids


def test_train_window_stride_is_checked():
  from train import config_check
  config = sentiment_finetune.get_config("tiny")
  config.data.train_window_stride = 63
  with pytest.raises(ConfigError, match=re.escape(
      "config.data.train_window_stride=63: expected 0 (off) .. data.seq_len - 2 = 62")):
    config_check.validate(config, 1, 1)
  config = legal_summ_finetune.get_config("tiny")
  config.data.train_window_stride = 8
  with pytest.raises(ConfigError, match="train_window_stride=8 applies to classifiers, not "
                                        "task 'summarize'"):
    config_check.validate(config, 1, 1)
