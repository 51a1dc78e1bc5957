"""Gap-sentence pseudo-summaries (train/data/gap_sentences.py): passages, the centrality score
against a by-hand ROUGE-1, the pairs' shape, the split by document, config errors, and a tiny
run trained on them that a real summarizer then starts from."""
import json

import ml_collections
import numpy as np
import pytest

from configs import legal_summ_finetune
from helpers import FILLER, POS, _summary_file, losses
from train import build, config_check
from train import run as run_lib
from train.config_check import ConfigError
from train.data import examples as examples_lib
from train.data import gap_sentences

pytestmark = pytest.mark.usefixtures("one_device")


def _cfg(**overrides):
  return ml_collections.ConfigDict(dict(dict(ratio=0.2, passage_words=150, mask="<mask>",
                                             lowercase=False), **overrides))


def test_passages_group_whole_sentences_up_to_the_word_budget():
  text = "One two three. Four five. Six seven eight nine ten eleven. Twelve."
  assert gap_sentences.passages(text, 5) == [["One two three.", "Four five."],
                                             ["Six seven eight nine ten eleven."], ["Twelve."]]
  assert gap_sentences.passages(text, 100) == [gap_sentences.passages(text, 5)[0] + [
      "Six seven eight nine ten eleven.", "Twelve."]]


def test_centrality_is_rouge1_f1_against_the_rest():
  scores = gap_sentences.centrality(["A b c.", "a B d, a.", "x y z."])
  # "a b c" against "a b d a x y z": overlap a, b = 2; P 2/3, R 2/7.
  # "a b d a" against "a b c x y z": overlap a (once: clipped), b = 2; P 2/4, R 2/6.
  np.testing.assert_allclose(scores, [2 * (2 / 3) * (2 / 7) / (2 / 3 + 2 / 7),
                                      2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3), 0.0])


def test_pairs_mask_the_most_central_sentences_in_document_order():
  sentences = ["Alpha beta gamma.", "Zeta eta.", "Alpha beta delta.", "Theta.", "Alpha gamma."]
  document, summary = gap_sentences.make_pair(sentences, _cfg(ratio=0.4))
  # round(0.4 * 5) = 2 gaps: the two sentences sharing the most words with the rest.
  assert summary == "Alpha beta gamma. Alpha beta delta."
  assert document == "<mask> Zeta eta. <mask> Theta. Alpha gamma."
  document, summary = gap_sentences.make_pair(sentences, _cfg(ratio=0.1, mask="",
                                                              lowercase=True))
  assert (document, summary) == ("zeta eta. alpha beta delta. theta. alpha gamma.",
                                 "alpha beta gamma.")   # at least one gap; ties: the earlier
  # Never every sentence: one is left to read; a one-sentence passage makes no pair.
  assert gap_sentences.make_pair(sentences[:2], _cfg(ratio=0.9))[0].count("<mask>") == 1
  assert gap_sentences.make_pair(sentences[:1], _cfg()) is None


def _documents(path, n=60, seed=0):
  """Unlabelled multi-sentence documents (capitalised sentences, so the splitter sees them)."""
  rng = np.random.default_rng(seed)
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      topic = " ".join(rng.choice(POS, 3))
      sentences = [" ".join([*rng.choice(FILLER, 4), topic]).capitalize() + "."
                   for _ in range(rng.integers(3, 8))]
      f.write(json.dumps({"id": f"doc{i}", "text": " ".join(sentences)}) + "\n")


def test_splits_are_made_by_document_and_need_no_summary_field(tmp_path):
  _documents(tmp_path / "docs.jsonl")
  cfg = legal_summ_finetune.get_config("tiny").data
  cfg.update(train_file=str(tmp_path / "docs.jsonl"), test_fraction=0.2)
  cfg.gap_sentences.update(ratio=0.3, passage_words=20)
  splits = examples_lib.load_splits(cfg, "summarize")
  docs = {}
  for name, pairs in splits.items():
    assert pairs
    for pair in pairs:
      doc_id = pair.id.split("#")[0]
      assert docs.setdefault(doc_id, name) == name   # a document's passages share a split
      assert pair.target and "<mask>" in pair.text and "<mask>" not in pair.target
  assert len(docs) == 60
  # The pseudo-pairs are part of the data's identity (resuming checks it).
  assert examples_lib.fingerprint(cfg) != examples_lib.fingerprint(
      ml_collections.ConfigDict(dict(cfg.to_dict(), gap_sentences=dict(
          cfg.gap_sentences.to_dict(), ratio=0.5))))


def test_bad_gap_settings_are_config_errors():
  config = legal_summ_finetune.get_config("tiny")
  config.data.gap_sentences.ratio = 1.0
  with pytest.raises(ConfigError, match="gap_sentences: ratio=1.0 must be in"):
    config_check.validate(config, num_devices=1, process_count=1)
  from configs import sentiment_finetune
  config = sentiment_finetune.get_config("tiny")
  config.data.gap_sentences.ratio = 0.2
  with pytest.raises(ConfigError, match="pseudo-summaries for a summarizer .*not task 'classify'"):
    config_check.validate(config, num_devices=1, process_count=1)


@pytest.mark.slow
def test_a_summarizer_starts_from_a_gap_sentence_run(tmp_path):
  _documents(tmp_path / "docs.jsonl", n=120)
  gsg = legal_summ_finetune.get_config("tiny")
  gsg.data.update(train_file=str(tmp_path / "docs.jsonl"), data_dir=str(tmp_path / "cache"),
                  test_fraction=0.0)
  gsg.data.gap_sentences.update(ratio=0.3, passage_words=30)
  result = run_lib.train(gsg, str(tmp_path / "gsg"))
  assert "test" not in result or not result["test"]   # no test split: nothing to score
  val = losses(tmp_path / "gsg", "validation")
  assert val[max(val)] < val[0] - 1.0, val           # it learns to fill the gaps

  _summary_file(tmp_path / "pairs.jsonl")
  config = legal_summ_finetune.get_config("tiny")
  config.data.update(train_file=str(tmp_path / "pairs.jsonl"), data_dir=str(tmp_path / "cache"))
  config.train.init_from = str(tmp_path / "gsg")
  finished, sources = build.resolve(config)
  assert sources.pretrained.step == gsg.train.num_steps
  assert not finished.data.gap_sentences.ratio         # the real pairs, not pseudo ones
  run_lib.train(config, str(tmp_path / "pe"))
  start = losses(tmp_path / "pe", "validation")[0]
  assert start < val[0] - 1.0, (start, val)          # it starts from the trained weights
