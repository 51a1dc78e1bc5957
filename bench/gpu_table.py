"""The GPU suite's result table and the measuring helpers its sections share (bench/gpu_suite.py,
bench/gpu_inference.py): one Markdown row per case, errors as one line, timings as a median."""
import numpy as np

MiB = 2.0 ** 20


class Table:
  """The suite's one Markdown table: section | case | ms | throughput | memory | result."""
  HEADER = ("section", "case", "ms", "throughput", "memory MiB", "result")

  def __init__(self, echo=None):
    self.rows = []
    self.echo = echo   # called with each row's Markdown line as it is added

  def add(self, section, case, ms=None, throughput="", memory=None, result=""):
    self.rows.append((section, case, "" if ms is None else f"{ms:.2f}", throughput,
                      "" if memory is None else f"{memory / MiB:.0f}", result))
    if self.echo:
      self.echo(self._line(self.rows[-1]))

  @staticmethod
  def _line(row) -> str:
    return "| " + " | ".join(str(c).replace("|", "/") for c in row) + " |"

  def markdown(self) -> str:
    lines = ["| " + " | ".join(self.HEADER) + " |", "|" + " --- |" * len(self.HEADER)]
    lines += [self._line(row) for row in self.rows]
    return "\n".join(lines)


def one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:160]}"


def is_oom(e: BaseException) -> bool:
  return any(m in str(e) for m in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))


def compiled_bytes(compiled) -> float | None:
  from bench import latency
  mem = latency.xla_memory(compiled)
  return None if mem is None else float(mem["total"])


def device_limit(device) -> float | None:
  stats = device.memory_stats() if device.platform == "gpu" else None
  return float(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def time_ms(fn, args, iters=3) -> float:
  """Median milliseconds of `iters` calls of fn(*args), after one untimed call (compile)."""
  from bench import latency
  return 1e3 * float(np.median(latency.call_seconds(fn, args, iters=iters)))
