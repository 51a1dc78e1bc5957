"""Progress lines with a rate and an ETA, for the loops of training, the final evaluation and
batch inference (absl logging)."""
import time

from absl import logging


def format_eta(seconds: float | None) -> str:
  if seconds is None:
    return "--"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class CountProgress:
  """A progress line with rate and ETA every `every_s` seconds over `total` items (batch
  inference, the final evaluation's predictions); the rate leaves out the first update, which
  includes compilation."""

  every_s = 10.0

  def __init__(self, total: int, unit: str):
    self.total, self.unit = total, unit
    self.t0 = self.last_log = time.perf_counter()
    self.first = None     # (done, time) after the first batch

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def update(self, done: int):
    now = time.perf_counter()
    if self.first is None:
      self.first = (done, now)
      return
    if now - self.last_log < self.every_s or done == self.total:
      return
    self.last_log = now
    rate = (done - self.first[0]) / max(now - self.first[1], 1e-9)
    logging.info("%d/%d %s (%.0f%%)  %.1f %s/s  ETA %s", done, self.total, self.unit,
                 100 * done / self.total, rate, self.unit, format_eta((self.total - done) / rate))
