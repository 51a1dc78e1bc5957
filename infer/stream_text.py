"""Which part of a streamed generation is final: text is shown only once later tokens cannot
change it.

A row's text is re-decoded from all its ids after every chunk (a piece's bytes may complete a
character the previous chunk started), cut at the first stop string, and, while the row is still
going, held back by one character less than the longest stop string (it may be a stop string's
start) and by any incomplete UTF-8 character (decoded as U+FFFD). Joined, a row's pieces equal the
text `LoadedModel.generate` returns for it.
"""
from infer import decode


def cut_at_stop(text: str, stop) -> tuple[str, bool]:
  """(text before the first occurrence of any of the `stop` strings, whether one occurred)."""
  cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
  return (text[:min(cuts)], True) if cuts else (text, False)


class StreamedRows:
  """The rows of one streamed batch: feed each chunk of new ids to `add`, which returns the text
  each row settled since the last call."""

  def __init__(self, rows: int, tokenizer, max_new: int, stop: tuple = ()):
    self.tokenizer, self.max_new, self.stop = tokenizer, max_new, stop
    self.hold = max((len(s) for s in stop), default=1) - 1
    self.ids = [[] for _ in range(rows)]
    self.shown = [""] * rows
    self.finished = [False] * rows

  def add(self, block) -> list[str]:
    """One string per row: its newly final text after the ids in `block` ([rows, chunk])."""
    eos = self.tokenizer.eos_id
    pieces = []
    for i, row in enumerate(block):
      if self.finished[i]:
        pieces.append("")
        continue
      self.ids[i] += [int(t) for t in row]
      text, stopped = cut_at_stop(self.tokenizer.decode(decode.strip(self.ids[i], eos)),
                                  self.stop)
      self.finished[i] = stopped or eos in self.ids[i] or len(self.ids[i]) >= self.max_new
      if not self.finished[i]:
        text = text[:max(len(text) - self.hold, 0)]
        while text.endswith("\ufffd"):     # a character whose bytes are still coming
          text = text[:-1]
      shown = self.shown[i]
      pieces.append(text[len(shown):] if text.startswith(shown) else "")
      if text.startswith(shown) and len(text) > len(shown):
        self.shown[i] = text
    return pieces

  @property
  def all_finished(self) -> bool:
    return all(self.finished)
