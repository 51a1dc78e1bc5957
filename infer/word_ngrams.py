"""No-repeat n-gram bans over words as the evaluator counts them, with each word assembled from
however many sub-word pieces spelled it.

A ban over token ids misses "The court held" after "the court held" (other tokens, same
words); a ban over one word class per token misses a word the model spells with other pieces
("HELD" = " H" + "EL" + "D"), which is what a repetition penalty pushes it to do. Here a word is
what the evaluator's \\w+ sees (case-folded): the word characters of a run of pieces, each piece
after the first starting with a word character right after one. A word is known by a 32-bit
polynomial hash of its characters, which composes over pieces (hash(ab) = hash(a) * B**len(b) +
hash(b)), so every spelling of a word has the same hash; a collision (~1 in 4e9 per pair) could
only ban one more token.

A candidate token is banned when the word it would complete - the open last word extended by
it, or the new word it starts - ends an n-gram of words that the row has already generated. This
also bans the first piece of a longer word whose prefix is that banned word (" HELD" before
"ING"); the model then spells it otherwise. A token with a word character, a non-word character
and a word character again ("n't") counts as one piece here, where the evaluator sees two words.
"""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

_NON_WORD = re.compile(r"\W+")
_BASE = 1_000_003          # odd, so distinct short words rarely collide mod 2**32
_MOD = 2 ** 32
_NONE = np.uint32(_MOD - 1)   # sorts after every follower: marks "no follower" slots


def text_hash(word: str) -> int:
  """The polynomial hash (mod 2**32) of a word's characters, as `WordPieces` composes it."""
  h = 0
  for c in word:
    h = (h * _BASE + ord(c)) % _MOD
  return h


@dataclasses.dataclass(frozen=True, eq=False)
class WordPieces:
  """Per token id, what its text adds to the words around it. Hashable by content (hash
  computed once), so a decode Controls holding it stays a cheap static jit argument.

  hashes: `text_hash` of the token's word characters, case-folded.
  lengths: how many of those characters (composing: word * BASE**length + hash).
  joins: its text starts with a word character, so it continues an open word.
  ends: its text ends with a non-word character, so the next token starts a new word.
  skip: no word character at all (punctuation, spaces, control ids): no word, never banned.
  """
  hashes: tuple
  lengths: tuple
  joins: tuple
  ends: tuple
  skip: tuple

  def __post_init__(self):
    sizes = {len(getattr(self, f.name)) for f in dataclasses.fields(self)}
    if len(sizes) != 1:
      raise ValueError(f"WordPieces: fields of different lengths {sorted(sizes)}")
    object.__setattr__(self, "_key", tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
    object.__setattr__(self, "_hash", hash(self._key))

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return self is other or (isinstance(other, WordPieces) and self._hash == other._hash
                             and self._key == other._key)

  def __len__(self):
    return len(self.hashes)

  def words(self, ids) -> list[int]:
    """The word hashes of a token sequence, in order (ids past the tokenizer are no word)."""
    words, open_word = [], False
    for t in ids:
      t = int(t)
      if t >= len(self) or self.skip[t]:
        open_word = False
        continue
      if open_word and self.joins[t]:
        words[-1] = (words[-1] * pow(_BASE, self.lengths[t], _MOD) + self.hashes[t]) % _MOD
      else:
        words.append(self.hashes[t])
      open_word = not self.ends[t]
    return words

  def arrays(self, vocab: int):
    """(hashes, lengths, BASE**lengths, joins, ends, skip) as numpy arrays over a model's
    `vocab` logits: ids past the tokenizer (a model's padded embedding rows) are skip."""
    extra = max(vocab - len(self), 0)
    pad = lambda field, value, dtype: np.concatenate(
        [np.asarray(field[:vocab], dtype), np.full(extra, value, dtype)])
    scales = [pow(_BASE, n, _MOD) for n in self.lengths]
    return (pad(self.hashes, 0, np.uint32), pad(self.lengths, 0, np.uint32),
            pad(scales, 1, np.uint32), pad(self.joins, False, bool), pad(self.ends, True, bool),
            pad(self.skip, True, bool))


def word_pieces(tokenizer) -> WordPieces:
  """Each token's piece of a word, read from its text as decoded after a word-only token, so a
  word-start marker (sentencepiece's "▁", byte-level BPE's "Ġ") shows as the space it is."""
  texts = [tokenizer.decode([t]) for t in range(tokenizer.vocab_size)]
  anchor = next((t for t, s in enumerate(texts) if s and not _NON_WORD.search(s)), None)
  if anchor is None:
    raise ValueError("word_pieces: the tokenizer has no token made of word characters only")
  fields = {name: [] for name in ("hashes", "lengths", "joins", "ends", "skip")}
  for t in range(tokenizer.vocab_size):
    both = tokenizer.decode([anchor, t])
    text = both[len(texts[anchor]):] if both.startswith(texts[anchor]) else texts[t]
    word = _NON_WORD.sub("", text).casefold()
    fields["hashes"].append(text_hash(word))
    fields["lengths"].append(len(word))
    fields["joins"].append(bool(text) and not _NON_WORD.match(text[0]))
    fields["ends"].append(not text or bool(_NON_WORD.match(text[-1])))
    fields["skip"].append(not word)
  return WordPieces(**{name: tuple(values) for name, values in fields.items()})


def _followers(words, k, n: int):
  """The words that followed each earlier occurrence of the last n - 1 of each row's first k
  words (words [R, m] uint32, k [R]): sorted [R, w] with unused slots _NONE, and [R] counts."""
  rows, m = words.shape
  w = m - n + 1
  if w <= 0:
    return jnp.full((rows, 1), _NONE), jnp.zeros((rows,), jnp.int32)
  k = k[:, None]
  if n > 1:
    last = jnp.take_along_axis(words, jnp.clip(k - (n - 1) + jnp.arange(n - 1), 0, m - 1), axis=1)
    windows = words[:, jnp.arange(w)[:, None] + jnp.arange(n - 1)[None]]   # [R, w, n - 1]
    match = jnp.all(windows == last[:, None, :], axis=-1)
  else:
    match = jnp.ones((rows, w), bool)
  hit = match & (jnp.arange(w) <= k - n)       # the window's next word is among the k
  return jnp.sort(jnp.where(hit, words[:, n - 1:], _NONE), axis=1), hit.sum(1)


def _member(candidates, followers, count):
  """[R, V] bool: candidates [R, V] found among each row's first count[r] sorted followers."""
  at = jax.vmap(jnp.searchsorted)(followers, candidates)
  found = jnp.take_along_axis(followers, jnp.minimum(at, followers.shape[1] - 1), axis=1)
  return (found == candidates) & (at < count[:, None])


def _token_bans(history, count, n: int, vocab: int):
  """[R, vocab] bool: the tokens that would complete an n-gram of token ids already among each
  row's first `count` generated tokens (history [R, M]; count a scalar or [R])."""
  rows = history.shape[0]
  count = jnp.broadcast_to(jnp.asarray(count, jnp.int32), (rows,))
  ids = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.uint32), (rows, vocab))
  return _member(ids, *_followers(history.astype(jnp.uint32), count, n))


def bans(history, count, n: int, vocab: int, pieces: WordPieces | None = None):
  """[R, vocab] bool: the tokens that would complete an n-gram already among each row's first
  `count` generated tokens (history [R, M]; count a scalar or [R]): n-grams of the words
  `pieces` assembles, or of token ids without it."""
  if pieces is None:
    return _token_bans(history, count, n, vocab)
  rows, m = history.shape
  hashes, lengths, scales, joins, ends, skip = (jnp.asarray(a) for a in pieces.arrays(vocab))
  count = jnp.broadcast_to(jnp.asarray(count, jnp.int32), (rows,))
  tok = jnp.clip(history, 0, vocab - 1)
  in_word = ~skip[tok] & (jnp.arange(m) < count[:, None])
  open_after = in_word & ~ends[tok]                        # the word goes on into the next piece
  open_before = jnp.pad(open_after[:, :-1], ((0, 0), (1, 0)))
  starts = in_word & ~(joins[tok] & open_before)
  word = jnp.where(in_word, jnp.cumsum(starts, axis=1) - 1, m)   # each piece's word (m: none)
  num_words = starts.sum(1)
  # A word's hash: the sum over its pieces of hash * BASE**(characters after the piece).
  chars = jnp.cumsum(jnp.where(in_word, lengths[tok], 0), axis=1)
  row = jnp.arange(rows)[:, None]
  word_end = jnp.zeros((rows, m), chars.dtype).at[row, word].max(chars, mode="drop")
  after = jnp.take_along_axis(word_end, jnp.minimum(word, m - 1), axis=1) - chars
  part = hashes[tok] * jnp.power(jnp.uint32(_BASE), after.astype(jnp.uint32))
  words = jnp.zeros((rows, m), jnp.uint32).at[row, word].add(part, mode="drop")
  # A candidate extends the open last word, or starts a word after all the row's words.
  last_open = jnp.take_along_axis(open_after, jnp.clip(count - 1, 0, m - 1)[:, None], axis=1)[:, 0]
  last_open &= count > 0
  current = jnp.take_along_axis(words, jnp.clip(num_words - 1, 0, m - 1)[:, None], axis=1)
  extended = current * scales[None] + hashes[None]
  banned_extension = _member(extended, *_followers(words, num_words - 1, n))
  banned_start = _member(jnp.broadcast_to(hashes, (rows, vocab)), *_followers(words, num_words, n))
  extends = joins[None] & last_open[:, None]
  return ~skip[None] & jnp.where(extends, banned_extension, banned_start)
