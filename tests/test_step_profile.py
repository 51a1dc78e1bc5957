"""bench/step_profile.py's bookkeeping: derived rows (attention rest, other) and the table."""
import pytest

from bench import step_profile


def _row(ms, times=1, flops=1e9):
  return {"ms": ms, "per_step_ms": ms * times, "times": times, "flops": flops,
          "gflops_per_s": flops / ms / 1e6}


def test_summarise_derives_attention_rest_and_other():
  out = step_profile.summarise({
      "attention kernel": _row(10.0, 2, 1e9), "attention sublayer": _row(25.0, 2, 4e9),
      "mlp": _row(30.0, 2), "head + loss": _row(20.0), "embedding": _row(1.0),
      "optimizer": _row(4.0), "step": _row(200.0)})
  rest = out["attention rest"]
  assert rest["ms"] == pytest.approx(15.0) and rest["per_step_ms"] == pytest.approx(30.0)
  assert rest["gflops_per_s"] == pytest.approx(3e9 / 15.0 / 1e6)
  # step - (2 * 10 + 2 * 15 + 2 * 30 + 20 + 1 + 4)
  assert out["other"]["per_step_ms"] == pytest.approx(200.0 - 135.0)
  table = step_profile.format_table(out)
  assert "attention rest" in table and "other" in table and "100.0%" in table


def test_summarise_without_the_step_has_no_other():
  out = step_profile.summarise({"attention kernel": _row(10.0), "attention sublayer": _row(12.0)})
  assert "other" not in out and out["attention rest"]["ms"] == pytest.approx(2.0)
