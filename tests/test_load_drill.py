"""A short drill of the load test (bench/load_test.py): a tiny classifier and a tiny LM served
by `python -m infer.serve` subprocesses, 4 closed-loop clients for 3 s each - the classifier,
then generation under in-flight and static batching. Every answer must be well-formed (no
errors), the clients' count must equal the server's own, the server's memory must be measured
and not run away, and the server must drain and exit 0 on SIGTERM."""
import json

import pytest

from bench import load_test
from helpers import _sentiment_config, train_tiny_lm
from train import run as run_lib

pytestmark = pytest.mark.usefixtures("one_device")   # in-process runs on 1 of the 8 fake devices

CLIENTS, SECONDS = 4, 3.0


@pytest.fixture(scope="module")
def classifier_dir(sentiment_files, tmp_path_factory):
  root = tmp_path_factory.mktemp("classifier")
  config = _sentiment_config(sentiment_files, root / "cache")
  config.data.test_file = ""
  config.model.num_layers = 1
  config.eval.evaluators = ()
  config.train.update(num_steps=2, eval_every=2, checkpoint_every=2)
  run_lib.train(config, str(root / "run"))
  return str(root / "run")


@pytest.fixture(scope="module")
def lm_dir(sentiment_files, tmp_path_factory):
  return train_tiny_lm(tmp_path_factory.mktemp("lm"), sentiment_files, 64, steps=2)


def test_the_load_tool_refuses_other_hosts():
  with pytest.raises(SystemExit):
    load_test.parse_args(["--host=192.168.0.10", "--lm_workdir=x"])
  with pytest.raises(SystemExit):
    load_test.parse_args(["--host=localhost", "--lm_workdir=x"])


@pytest.mark.slow
def test_a_short_load_on_the_classifier_and_both_batching_modes(classifier_dir, lm_dir,
                                                                sentiment_files, capsys):
  code = load_test.main([f"--classify_workdir={classifier_dir}", f"--lm_workdir={lm_dir}",
                         f"--clients={CLIENTS}", f"--gen_clients={CLIENTS}",
                         f"--duration_s={SECONDS}", "--max_tokens=8,12,16",
                         "--max_tokens_choices", "--max_batch=8",
                         f"--texts_file={sentiment_files / 'test.jsonl'}",
                         f"--output={sentiment_files / 'load.json'}"])
  report = capsys.readouterr().out
  rows = json.loads((sentiment_files / "load.json").read_text())
  assert code == 0, report
  assert [r["scenario"] for r in rows] == ["classify", "generate (inflight)",
                                           "generate (static)"]
  for r in rows:
    assert r["errors"] == 0 and r["exit_code"] == 0, r
    assert r["ok"] == r["requests"] == r["server_counted"] > 0, r    # nothing lost or doubled
    assert r["seconds"] >= SECONDS and r["rps"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
    assert r["rss_start_mb"] > 50 and abs(r["rss_growth"]) < 0.25, r   # measured, no runaway
  classify, inflight, static = rows
  assert classify["tokens_per_s"] == 0 and inflight["tokens_per_s"] > 0
  assert static["tokens_per_s"] > 0
  assert 0 < inflight["mean_slots"] <= 8 and static["mean_slots"] is None
  assert "CPU: " in report and report.count("| generate (") == 2
