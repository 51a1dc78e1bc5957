"""eval/factual.py's repeated-4-gram check (summaries that repeat themselves), by
hand, through evaluate() and into the Markdown report."""
import pytest

from eval import common, factual, report


def _cfg():
  return common.eval_config(bootstrap=100)


def test_repeated_ngrams_by_hand():
  words = "the service may end the service may end now".split()
  assert factual.repeated_ngrams(words) == {("the", "service", "may", "end")}
  assert factual.repeated_ngrams(words, 5) == set()
  # Overlapping occurrences count: a run of one word repeats its 4-gram.
  assert factual.repeated_ngrams(["a"] * 5) == {("a",) * 4}
  assert factual.repeated_ngrams(["a"] * 3) == set()   # shorter than a 4-gram
  assert factual.repeated_ngrams([]) == set()


def test_repeats_4gram_per_example_ignores_case_punctuation_and_the_source():
  m = factual.example_metrics("You can delete it. you, can delete IT!", "source")
  assert m["repeats_4gram"] == 1.0     # "you can delete it" twice once case/punctuation go
  # A 4-gram copied from the source once is not a repeat; three repeated words are not either.
  source = "we may change these terms at any time"
  assert factual.example_metrics("we may change these terms", source)["repeats_4gram"] == 0.0
  assert factual.example_metrics("we may change and we may change", "x")["repeats_4gram"] == 0.0
  assert factual.example_metrics("", "x")["repeats_4gram"] == 0.0


def test_evaluate_counts_repeating_summaries_and_reports_them():
  records = [{"prediction": p, "reference": "", "source": "a source text"} for p in
             ("no repeat in this one at all", "a b c d a b c d", "x y z w x y z w x y z w",
              "short")]
  out = factual.evaluate(records, _cfg())
  assert out["repeats_4gram"] == pytest.approx(0.5)
  assert out["summaries_repeating_4gram"] == 2
  assert "repeats_4gram_count" not in out     # defined for every example, like summary_words
  assert out["novel_1gram_count"] == 4         # the other metrics keep their counts
  lo, hi = out["repeats_4gram" + report.CI_SUFFIX]
  assert 0.0 <= lo <= 0.5 <= hi <= 1.0
  md = report.render_section(out)
  assert "| summaries_repeating_4gram | 2 |" in md
