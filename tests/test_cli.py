"""The command line as a new user meets it: `python -m train.main` in subprocesses.

--print_config lists every key with its preset default and marks overrides, without training;
a mistyped key or a value of the wrong type is one line on stderr (exit code 2) naming the flag;
a training run's output is its own progress lines, without library INFO logs or TFDS progress
bars, and --verbosity=1 brings the library logs back. Plus model/log_setup.py's filter and
import hook in-process.
"""
import logging
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import legal_pretrain
from helpers import env
from model import log_setup

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "--config=configs/legal_pretrain.py:tiny"
_WORDS = ("agreement party licensor licensee shall hereby grant right license software term "
          "termination notice written consent breach damages liability warranty indemnify "
          "confidential information obligation payment fee royalty territory").split()


def run_main(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "train.main", *args], cwd=REPO, env=env(),
                        capture_output=True, text=True, timeout=timeout)


def _leaves(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "items") and len(value):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


# --print_config

def test_print_config_lists_every_key_with_default_and_marks_overrides():
  r = run_main(TINY, "--print_config", "--config.optim.lr=1e-3", "--config.train.num_steps=7",
               timeout=120)
  assert r.returncode == 0, r.stderr
  assert r.stderr == ""                                        # no training, no logs
  header = r.stdout.splitlines()[1]
  assert header.split()[:4] == ["key", "value", "preset", "default"]
  value_at, help_at = header.index("value"), header.index("help")
  rows, helps = {}, {}
  for line in r.stdout.splitlines()[2:]:
    fields = line[2:value_at].split() + line[value_at:help_at].split()
    rows[fields[0]] = (line[0], fields[1:])
    helps[fields[0]] = line[help_at:]
  expected = dict(_leaves(legal_pretrain.get_config("tiny")))
  assert set(rows) == set(expected)          # every key, nothing else
  assert rows["optim.lr"] == ("*", ["0.001", "0.003"])
  assert rows["train.num_steps"] == ("*", ["7", "300"])
  assert rows["optim.warmup_steps"] == (" ", ["30", "30"])     # the tiny preset's own value
  assert rows["model.attention.kind"] == (" ", ["'full'", "'full'"])
  # the model's keys carry their declared help and choices (configs/model_schema.py)
  assert helps["model.norm"] == "normalisation layer [rmsnorm | layernorm]"
  assert helps["model.attention.kind"].endswith("[full | local | blocked]")
  assert helps["optim.lr"] == ""
  marked = sorted(k for k, (mark, _) in rows.items() if mark == "*")
  assert marked == ["optim.lr", "train.num_steps"]
  assert "--config=configs/legal_pretrain.py:tiny" in r.stdout.splitlines()[0]


# one-line errors

@pytest.mark.parametrize("flag, expected", [
    ("--config.optim.lrr=1e-3", "error: --config.optim.lrr: unknown config key optim.lrr; did "
     "you mean optim.lr? (--print_config lists every key)"),
    ("--config.optimm.warmup_steps=3", "error: --config.optimm.warmup_steps: unknown config key "
     "optimm.warmup_steps; did you mean optim.warmup_steps? (--print_config lists every key)"),
    ("--config.model.attention.knd=local", "error: --config.model.attention.knd: unknown config "
     "key model.attention.knd; did you mean model.attention.kind? (--print_config lists every "
     "key)"),
])
def test_unknown_config_key_is_one_line_with_a_suggestion(flag, expected):
  r = run_main(TINY, "--workdir=/nonexistent/never", flag, timeout=120)
  assert r.returncode == 2
  assert r.stderr.splitlines() == [expected]
  assert r.stdout == ""


@pytest.mark.parametrize("flag, key, value, kind", [
    ("--config.train.num_steps=1.5", "train.num_steps", "'1.5'", "an int"),
    ("--config.optim.lr=fast", "optim.lr", "'fast'", "a float"),
    ("--config.data.use_licensedcode=maybe", "data.use_licensedcode", "'maybe'", "a bool"),
])
def test_value_of_the_wrong_type_is_one_line(flag, key, value, kind):
  r = run_main(TINY, "--workdir=/nonexistent/never", flag, timeout=120)
  assert r.returncode == 2
  lines = r.stderr.splitlines()
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith(f"error: {flag.split('=')[0]}: ")
  assert key in lines[0] and value in lines[0] and kind in lines[0]
  assert "\\" not in lines[0]          # no escaped repr of a repr


def test_missing_config_file_is_one_line():
  r = run_main("--config=configs/no_such_config.py:tiny", "--workdir=/nonexistent/never",
               timeout=120)
  assert r.returncode == 2
  assert r.stderr.splitlines() == [
      "error: --config=configs/no_such_config.py:tiny: cannot load the config: [Errno 2] No "
      "such file or directory: 'configs/no_such_config.py'"]


def test_every_commands_user_errors_end_in_one_line_with_their_exit_code(capsys):
  """model.errors.exit_on_user_error wraps every command's main: each layer's error type is a
  UserError (one line, exit 2; a diverged run 3); any other exception is a bug and propagates."""
  from eval.common import EvalError
  from infer.inputs import InputError
  from infer.loading import LoadError
  from launch.sweep import SweepError
  from model import errors
  from model.checkpoint import CheckpointError
  from train.config_check import ConfigError
  from train.hf.families import ConvertError
  from train.lora import LoraConfigError
  from train.loop import NonFiniteLossError
  from train.topologies import TopologyError
  kinds = (errors.DataError, CheckpointError, ConfigError, ConvertError, TopologyError,
           NonFiniteLossError, LoadError, InputError, LoraConfigError, EvalError, SweepError)
  for kind in kinds:
    def main(argv, kind=kind):
      raise kind(f"{argv[0]}: what {kind.__name__} names")
    with pytest.raises(SystemExit) as exit_info:
      errors.exit_on_user_error(main)(["prog"])
    assert exit_info.value.code == (3 if kind is NonFiniteLossError else 2), kind
    assert capsys.readouterr().err == f"error: prog: what {kind.__name__} names\n"
  with pytest.raises(KeyError):
    errors.exit_on_user_error(lambda argv: {}["x"])(["prog"])


# quiet logs

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli_corpus")
  rng = np.random.default_rng(0)
  for i in range(40):
    sentences = [" ".join(rng.choice(_WORDS, rng.integers(6, 16))).capitalize() + "."
                 for _ in range(rng.integers(3, 12))]
    (root / f"doc_{i:03d}.txt").write_text(" ".join(sentences), encoding="utf-8")
  return root


def _train_args(corpus, data_dir, workdir):
  return [TINY, f"--workdir={workdir}", "--config.train.num_steps=2",
          "--config.train.eval_every=2", "--config.train.log_every=1",
          "--config.data.use_licensedcode=False", f"--config.data.extra_dirs=('{corpus}',)",
          f"--config.data.data_dir={data_dir}", "--config.data.vocab_size=384",
          "--config.train.eval_batches=1"]


_LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ ([\w.]+\.py):\d+\] ", re.M)


def _project_files():
  return {p.name for d in ("train", "model", "infer", "eval", "bench", "launch", "configs")
          for p in (REPO / d).rglob("*.py")}


@pytest.fixture(scope="module")
def quiet_run(corpus, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("cli_data")    # empty: the run prepares the TFDS dataset
  r = run_main(*_train_args(corpus, data_dir, tmp_path_factory.mktemp("quiet") / "run"))
  return r, data_dir


@pytest.mark.slow
def test_training_output_is_the_runs_own_progress_lines(quiet_run):
  r, _ = quiet_run
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout + r.stderr
  assert re.search(r"step 1/2 +loss \d", out) and re.search(r"step 2/2 +loss \d.*ETA", out)
  assert "validation: loss" in out
  sources = set(_LOG_LINE.findall(out))
  assert sources, out                                   # the progress lines are absl log lines
  assert sources <= _project_files(), f"library log lines from {sources - _project_files()}"
  for noise in ("Generating splits", "examples/s", "Shuffling", "%|", "\x1b[A",
                "Downloading and preparing dataset", "downloaded and prepared",
                "Using custom data configuration", "Unable to initialize backend",
                "CheckpointManager", "etils.epath"):
    assert noise not in out, noise
  # Nothing but log lines: no banners on stdout, no progress bar residue on stderr.
  assert r.stdout == ""
  assert all(_LOG_LINE.match(line) for line in r.stderr.splitlines()), r.stderr[-2000:]


@pytest.mark.slow
def test_verbosity_1_brings_library_logs_back(quiet_run, corpus, tmp_path):
  _, data_dir = quiet_run                                  # already prepared: a quick run
  r = run_main(*_train_args(corpus, data_dir, tmp_path / "run"), "--verbosity=1")
  assert r.returncode == 0, r.stderr[-3000:]
  sources = set(_LOG_LINE.findall(r.stderr))
  assert re.search(r"step 2/2 +loss \d", r.stderr)
  assert "checkpoint_manager.py" in sources               # Orbax's INFO
  assert "dataset_info.py" in sources                     # TFDS's
  assert "xla_bridge.py" in sources                       # JAX's
  assert len(sources - _project_files()) >= 5


def test_quiet_filter_keeps_warnings_and_the_projects_own_lines():
  quiet = log_setup.QuietLibraries()
  site = "/venv/lib/python3.11/site-packages"

  def record(path, level, msg="something"):
    return logging.LogRecord("absl", level, path, 1, msg, (), None)
  assert not quiet.filter(record(f"{site}/orbax/checkpoint/checkpoint_manager.py", logging.INFO))
  assert not quiet.filter(record(f"{site}/jax/_src/xla_bridge.py", logging.INFO,
                                 "Unable to initialize backend 'tpu'"))
  assert not quiet.filter(record(f"{site}/tensorflow_datasets/core/dataset_builder.py",
                                 logging.WARNING, "Using custom data configuration: x"))
  assert quiet.filter(record(f"{site}/orbax/checkpoint/checkpoint_manager.py", logging.WARNING))
  assert quiet.filter(record(f"{site}/grain/_src/x.py", logging.ERROR))
  assert quiet.filter(record(str(REPO / "train" / "metrics.py"), logging.INFO, "step 1/2"))
  assert quiet.filter(record(f"{site}/matplotlib/x.py", logging.INFO))   # not on the list


def test_after_import_runs_the_callback_once_the_package_is_imported(tmp_path, monkeypatch):
  package = tmp_path / "cli_fake_pkg"
  package.mkdir()
  (package / "__init__.py").write_text("VALUE = 41\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  seen = []
  log_setup.after_import("cli_fake_pkg", lambda m: seen.append(m.VALUE + 1))
  assert seen == []                                        # not imported by after_import
  import cli_fake_pkg  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  assert seen == [42]
  log_setup.after_import("cli_fake_pkg", lambda m: seen.append(m.VALUE))   # already imported
  assert seen == [42, 41]
  monkeypatch.delitem(sys.modules, "cli_fake_pkg")
