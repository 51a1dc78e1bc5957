r"""Cheap factual-consistency proxies for generated summaries, checked against their source.

  python -m eval.factual --records=test_predictions.jsonl [--out=metrics.json]

Records as for eval/rouge.py: `{"prediction": str, "reference": str, "source": str, ...}`; the
summary is "prediction". Why: ROUGE rewards overlap with the reference, not truth; a summary can
score well and still invent a date, a sum or a party. These proxies flag such inventions
without a model. They are heuristics - a paraphrased fact counts as unsupported and a wrong
fact built from source words as supported - so read them next to ROUGE and a human rubric.

Per example (then averaged over the examples where the value is defined, with the number of
those examples in `<metric>_count` and a bootstrap 95% CI):
- number_precision: share of the distinct numbers in the summary also in the source. A number
  is a digit run with , or . groups ("1,000.5", "3rd"); commas and ordinal suffixes are
  dropped and leading zeros ignored, so "1,000" matches "1000". Undefined without numbers.
- date_precision: share of the distinct dates in the summary also in the source. Dates are
  "12 March 2001", "March 12, 2001", "2001-03-12" (normalised to year, month, day, so the
  forms match each other), "March 2001" (matched by any date in that month) and "12/03/2001"
  (day/month order is ambiguous, so matched only as written). Digits of a date also count
  as numbers.
- entity_precision: share of the distinct "entities" in the summary also in the source,
  compared case-insensitively as word sequences. An entity is a run of capitalised words
  (A-Z then letters, digits, ' & -) within a sentence: "Supreme Court", "New Delhi", "IMDB".
  At the start of a sentence a leading function word ("The", "In", ...) is dropped and a
  lone word is ignored (it is capitalised because it starts the sentence); single letters and
  function words never count alone.
- novel_{1,2,3}gram: share of the distinct lower-cased word n-grams of the summary that never
  occur in the source: how abstractive (or how hallucinating) the summary is.
- compression_ratio: source words / summary words (whitespace-separated).
- summary_words: summary length in words (every example).
- repeats_4gram: 1 if the summary says a lower-cased word 4-gram twice (overlapping
  occurrences count), else 0 (every example): the mean is the share of summaries that repeat
  themselves, and `summaries_repeating_4gram` their number. Words here are the \w+ runs
  (punctuation dropped). eval.decode.no_repeat_ngram_size bans n-grams of the same words, each
  assembled from its pieces (infer/word_ngrams.py), so a repeat counted here comes from where
  the two differ: a hash collision, or a piece like "n't" that holds two \w+ runs.
"""
import re

from eval import common

NAME = "factual"
_FIELDS = {"prediction": str, "reference": str, "source": str}
NGRAM_ORDERS = (1, 2, 3)
REPEAT_ORDER = 4   # the summarization presets' eval.decode.no_repeat_ngram_size

_NUMBER = re.compile(r"(?<!\w)(\d+(?:[.,]\d+)*)(?:st|nd|rd|th)?(?!\w)")

_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|"
          r"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)")
_MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}
_ORD = r"(?:st|nd|rd|th)?"
# Alternatives are tried in order at each position, so "March 12, 2001" is one full date
# (not the month-year form) and "2001-03-12" is ISO (not a day/month/year tail).
_DATE = re.compile(
    rf"\b(?:(?P<dmy_d>\d{{1,2}}){_ORD}\s+(?:of\s+)?(?P<dmy_m>{_MONTH})\.?,?\s+(?P<dmy_y>\d{{4}})"
    rf"|(?P<mdy_m>{_MONTH})\.?\s+(?P<mdy_d>\d{{1,2}}){_ORD},?\s+(?P<mdy_y>\d{{4}})"
    rf"|(?P<iso_y>\d{{4}})-(?P<iso_m>\d{{1,2}})-(?P<iso_d>\d{{1,2}})"
    rf"|(?P<num>\d{{1,2}}[/.-]\d{{1,2}}[/.-]\d{{2,4}})"
    rf"|(?P<my_m>{_MONTH})\.?,?\s+(?P<my_y>\d{{4}}))\b", re.IGNORECASE)

_CAPITALISED_RUN = re.compile(r"\b[A-Z][\w'&-]*(?:[ \t]+[A-Z][\w'&-]*)*")
_FUNCTION_WORDS = frozenset(
    "A An And As At But By For From He Her His However If In It Its No Not Of On Or She So "
    "That The Their There These They This Those To Under We When Where While With".split())


def _numbers(text: str) -> set[str]:
  out = set()
  for m in _NUMBER.finditer(text):
    number = m.group(1).replace(",", "")
    out.add(number if "." in number else str(int(number)))
  return out


def _dates(text: str) -> set[tuple]:
  out = set()
  for m in _DATE.finditer(text):
    g = m.groupdict()
    if g["num"]:
      out.add(("numeric",) + tuple(int(x) for x in re.split(r"[/.-]", g["num"])))
      continue
    for form in ("dmy", "mdy", "iso", "my"):
      if g[f"{form}_y"]:
        month = g[f"{form}_m"]
        month = int(month) if month.isdigit() else _MONTHS[month[:3].lower()]
        day = int(g[f"{form}_d"]) if form != "my" else None
        out.add((int(g[f"{form}_y"]), month, day))
  return out


def _entities(text: str) -> set[str]:
  out = set()
  for sentence in common.split_sentences(text):
    for m in _CAPITALISED_RUN.finditer(sentence):
      words = m.group().split()
      if not re.search(r"\w", sentence[:m.start()]):   # the run starts the sentence
        if len(words) == 1:
          continue
        if words[0] in _FUNCTION_WORDS:
          words = words[1:]
      if len(words) == 1 and (len(words[0]) < 2 or words[0] in _FUNCTION_WORDS):
        continue
      out.add(" ".join(words))
  return out


def _tokens(text: str) -> list[str]:
  return re.findall(r"\w+", text.lower())


def _ngrams(tokens: list[str], n: int) -> set[tuple]:
  return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def repeated_ngrams(tokens: list[str], n: int = REPEAT_ORDER) -> set[tuple]:
  """The n-grams that occur more than once in `tokens`."""
  seen, repeated = set(), set()
  for i in range(len(tokens) - n + 1):
    gram = tuple(tokens[i:i + n])
    (repeated if gram in seen else seen).add(gram)
  return repeated


def _share_found(items: set, found) -> float | None:
  return sum(1 for x in items if found(x)) / len(items) if items else None


def example_metrics(summary: str, source: str) -> dict[str, float | None]:
  """The per-example values (None where undefined) that `evaluate` averages."""
  source_tokens = _tokens(source)
  source_numbers, source_dates = _numbers(source), _dates(source)
  source_dates |= {(d[0], d[1], None) for d in source_dates if d[0] != "numeric"}
  padded_source = f" {' '.join(source_tokens)} "
  summary_tokens = _tokens(summary)
  summary_words = len(summary.split())
  out = {
      "number_precision": _share_found(_numbers(summary), source_numbers.__contains__),
      "date_precision": _share_found(_dates(summary), source_dates.__contains__),
      "entity_precision": _share_found(
          _entities(summary), lambda e: f" {' '.join(_tokens(e))} " in padded_source),
  }
  for n in NGRAM_ORDERS:
    source_ngrams = _ngrams(source_tokens, n)
    out[f"novel_{n}gram"] = _share_found(_ngrams(summary_tokens, n),
                                         lambda g: g not in source_ngrams)
  out["compression_ratio"] = len(source.split()) / summary_words if summary_words else None
  out["summary_words"] = float(summary_words)
  out["repeats_4gram"] = float(bool(repeated_ngrams(summary_tokens)))
  return out


# Defined for every example, so no "<metric>_count" of examples where they are.
_ALWAYS_DEFINED = ("summary_words", "repeats_4gram")


def evaluate(records: list[dict], cfg) -> dict:
  common.check_fields(records, _FIELDS, NAME)
  per_example = [example_metrics(r["prediction"], r["source"]) for r in records]
  out = {"count": len(records)}
  for metric in per_example[0]:
    values = [e[metric] for e in per_example if e[metric] is not None]
    common.add_mean(out, metric, values, cfg)
    if metric not in _ALWAYS_DEFINED:
      out[f"{metric}_count"] = len(values)
  out["summaries_repeating_4gram"] = sum(int(e["repeats_4gram"]) for e in per_example)
  return out


if __name__ == "__main__":
  common.run_cli(evaluate, "factual-consistency proxies")
