"""No-repeat bans over words assembled from pieces (infer/word_ngrams.py), against a reference
that assembles the words on the host and looks for the repeated n-gram."""
import jax
import numpy as np
import pytest

from infer import rerank, word_ngrams
from tests import helpers

PIECES = ["", "", "x", " the", "The", " THE", " court", " held", " H", "EL", "D", "held", ",",
          " .", "court,", " ", "s", "'s", " co", "urt"]
TOKENIZER = helpers.PieceTokenizer(PIECES)
WORDS = word_ngrams.word_pieces(TOKENIZER)
ID = {p: i for i, p in enumerate(PIECES) if i > 1}
H = word_ngrams.text_hash


def test_pieces_read_word_starts_case_and_punctuation():
  same = {WORDS.hashes[ID[p]] for p in (" the", "The", " THE")}
  assert same == {H("the")}
  assert not WORDS.joins[ID[" the"]] and WORDS.joins[ID["EL"]] and WORDS.joins[ID["The"]]
  assert WORDS.ends[ID["court,"]] and not WORDS.ends[ID[" court"]]
  assert [i for i, s in enumerate(WORDS.skip) if s] == [0, 1, ID[","], ID[" ."], ID[" "]]
  # Every spelling of a word is one word; punctuation (attached or not) ends one.
  spell = lambda *ps: WORDS.words([ID[p] for p in ps])
  assert spell(" H", "EL", "D") == spell(" held") == spell("held") == [H("held")]
  assert spell(" co", "urt", ",", " held") == spell("court,", " held") == [H("court"), H("held")]
  assert spell("court,", "s") == [H("court"), H("s")] and spell(" court", "s") == [H("courts")]
  assert WORDS.words([ID[" held"], len(PIECES) + 3]) == [H("held")]   # past the tokenizer
  again = word_ngrams.word_pieces(TOKENIZER)
  assert again == WORDS and hash(again) == hash(WORDS) and again is not WORDS


def _reference(history, t, n):
  """Whether token t completes a word n-gram the history already holds: the word t ends up in
  (extending the open last word, or a new one) taken as complete."""
  if t >= len(WORDS) or WORDS.skip[t]:
    return False
  words = WORDS.words(list(history) + [t])
  return len(words) >= n and any(words[j:j + n] == words[-n:] for j in range(len(words) - n))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_bans_equal_the_reference_at_every_step(n):
  rng = np.random.default_rng(n)
  rows, max_new, vocab = 5, 14, len(PIECES) + 4     # 4 padded ids past the tokenizer
  # Few distinct pieces, so that words and n-grams recur under different spellings.
  pool = np.array([ID[p] for p in (" the", "The", " court", " held", " H", "EL", "D", ",",
                                   " co", "urt", "s")])
  history = pool[rng.integers(0, len(pool), (rows, max_new))].astype(np.int32)
  bans = jax.jit(word_ngrams.bans, static_argnums=(2, 3, 4))
  for count in range(max_new + 1):
    got = np.asarray(bans(history, count, n, vocab, WORDS))
    want = [[_reference(history[r, :count], t, n) for t in range(vocab)] for r in range(rows)]
    np.testing.assert_array_equal(got, want, err_msg=f"count={count}")


def test_a_word_spelled_from_other_pieces_is_still_a_repeat():
  """ "the court held" then "the court H EL": "D" would complete "held" and is banned, as is
  " held" after "the court" (the comma between is no word)."""
  row = [ID[p] for p in (" the", " court", " held", ",", " the", " court", " H", "EL")]
  bans = np.asarray(word_ngrams.bans(np.array([row + [0, 0]], np.int32), len(row), 3,
                                     len(PIECES), WORDS))[0]
  assert sorted(np.flatnonzero(bans)) == [ID["D"]]
  bans = np.asarray(word_ngrams.bans(np.array([row], np.int32), 6, 3, len(PIECES), WORDS))[0]
  # Only " held": "held" would continue " court" into "courtheld", another word.
  assert sorted(np.flatnonzero(bans)) == [ID[" held"]]


def test_mbr_agreement_compares_words_not_pieces():
  """Two spellings of "the court held" agree fully under WordPieces, so the consensus is one
  of them; as ids they share nothing, and "the court ," (the deterministic one) ties first."""
  a = [ID[p] for p in (" the", " court", " held")]
  b = [ID[p] for p in ("The", " co", "urt", " H", "EL", "D")]
  c = [ID[p] for p in (" the", " court", ",")]
  _, by_words = rerank.choose([c], [[a, b]], eos_id=1, words=WORDS)
  _, by_ids = rerank.choose([c], [[a, b]], eos_id=1)
  assert by_words == [1] and by_ids == [0]
