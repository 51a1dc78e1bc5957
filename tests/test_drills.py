"""The reliability drills no other test covers: a tiny training run broken on purpose in the ways
docs/launch.md lists, each checked to fail or recover as promised.

Every test marked `drill` (here and in tests/test_train_e2e.py, which covers bad flags, the mesh,
a missing folder, non-finite losses and SIGTERM) is one drill; `python -m launch.drill` runs
them through pytest and prints the table. Each drill records what it observed (the `observed`
user property), which the table shows.

The drills' corpus is the shared one (helpers.write_corpus) with one malformed JSONL line, so
the reference run (data.bad_lines=skip) is itself the skip drill. Bad-input drills run against a
copy of the finished reference run and also check that its checkpoints are byte-for-byte
unchanged afterwards.
"""
import hashlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest

from helpers import (CKPT_EVERY, REPO, base_args, checkpoint_steps, env, losses, run_main,
                     start_and_interrupt, write_corpus)

drill = pytest.mark.drill
pytestmark = pytest.mark.slow   # every drill trains or starts train.main
NUM_STEPS = 30        # the drill runs' train.num_steps: 3 checkpoints, CKPT_EVERY apart
BAD_LINE = 7          # the malformed line of the drill corpus' more.jsonl
DRILL_FLAGS = {"train.num_steps": NUM_STEPS, "train.eval_every": NUM_STEPS,
               "data.bad_lines": "skip"}


def drill_args(corpus, data_dir, workdir, **overrides):
  return base_args(corpus, data_dir, workdir, **{**DRILL_FLAGS, **overrides})


def error_line(text: str) -> str:
  """The last `error: ...` line train.main printed, else the last non-empty line."""
  lines = [line for line in text.strip().splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error: ")]
  return (errors or lines or ["(no output)"])[-1][:240]


def digest(folder) -> str:
  """A hash of every file's path and bytes under `folder`."""
  h = hashlib.sha256()
  for path in sorted(pathlib.Path(folder).rglob("*")):
    if path.is_file():
      h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
  return h.hexdigest()[:16]


def assert_one_error_line(result, code, needles, record_property, extra=""):
  line = error_line(result.stderr)
  record_property("observed", f"exit {result.returncode}: {line}{extra}")
  assert result.returncode == code, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  for needle in needles:
    assert needle in line, line


@pytest.fixture(scope="module")
def drill_corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("drill_corpus"), bad_line=BAD_LINE)


@pytest.fixture(scope="module")
def reference(drill_corpus, data_dir, tmp_path_factory):
  """(workdir, stderr) of an uninterrupted run; every comparison of losses is against it."""
  workdir = tmp_path_factory.mktemp("reference")
  result = run_main(drill_args(drill_corpus, data_dir, workdir))
  assert result.returncode == 0, f"the reference run failed: {error_line(result.stderr)}"
  return workdir, result.stderr


@pytest.fixture(scope="module")
def victim(reference, tmp_path_factory):
  """A finished run the bad-input drills point at; their errors must leave it intact."""
  workdir = tmp_path_factory.mktemp("victim") / "run"
  shutil.copytree(reference[0], workdir)
  return workdir


@drill("malformed_jsonl_skip", f"data.bad_lines=skip: warning names more.jsonl:{BAD_LINE}, "
       "counts 1 skipped line, run finishes")
def test_malformed_jsonl_line_is_skipped_with_a_warning(reference, record_property):
  log = reference[1]
  named = f"more.jsonl:{BAD_LINE}: malformed JSON line" in log
  counted = "skipped 1 bad JSONL lines" in log
  record_property("observed", f"exit 0; warning names the line: {named}; count logged: {counted}")
  assert named and counted, log[-3000:]


_LATIN1 = "Café de Flore, licensor.".encode("latin-1")


@pytest.mark.parametrize("files, overrides, needles", [
    pytest.param(None, {"data.bad_lines": "fail"}, [f"more.jsonl:{BAD_LINE}: malformed JSON"],
                 id="malformed_jsonl_fail", marks=drill(
                     "malformed_jsonl_fail",
                     f"data.bad_lines=fail: exit 2 naming more.jsonl:{BAD_LINE}")),
    pytest.param({"notes.md": b"not a document"}, {}, ["{folder}", "has no"],
                 id="empty_data_folder", marks=drill(
                     "empty_data_folder", "exit 2: the folder has no documents")),
    pytest.param({"contract.txt": _LATIN1}, {}, ["contract.txt", "not valid UTF-8"],
                 id="non_utf8_text", marks=drill("non_utf8_text", "exit 2 naming the file")),
    pytest.param({"a.txt": b"  \n", "b.jsonl": b'{"text": " "}\n'}, {}, ["empty corpus"],
                 id="empty_corpus", marks=drill("empty_corpus",
                                                "exit 2: no non-empty documents")),
    pytest.param(None, {"data.vocab_size": 512}, ["embedding", "vocab_size"],
                 id="vocab_mismatch", marks=drill(
                     "vocab_mismatch",
                     "resume with another data.vocab_size: exit 2 naming the embedding")),
    # ~1e13 parameters: no disk holds 4 checkpoints of them.
    pytest.param(None, {"model.d_model": 2**20, "model.mlp_dim": 2**22},
                 ["bytes free but the run needs"], id="disk_full", marks=drill(
                     "disk_full", "exit 2 before training: workdir, free and needed bytes")),
])
def test_bad_input_is_one_error_and_leaves_the_run_intact(
    victim, drill_corpus, data_dir, tmp_path, record_property, files, overrides, needles):
  folder = drill_corpus
  if files is not None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name, data in files.items():
      (folder / name).write_bytes(data)
  before = digest(victim / "checkpoints")
  result = run_main(drill_args(folder, data_dir, victim, **overrides))
  unchanged = digest(victim / "checkpoints") == before
  assert_one_error_line(result, 2, [n.format(folder=folder) for n in needles], record_property,
                        "" if unchanged else "; CHECKPOINTS CHANGED")
  assert unchanged, "the failed run changed the finished run's checkpoints"


@drill("unwritable_workdir", "exit 2 naming the workdir")
def test_unwritable_workdir(drill_corpus, data_dir, tmp_path, record_property):
  blocker = tmp_path / "a_file"
  blocker.write_text("a file where the run's parent folder should be")
  result = run_main(drill_args(drill_corpus, data_dir, blocker / "run"))
  assert_one_error_line(result, 2, [str(blocker / "run"), "not writable"], record_property)


def _resumed_identically(args, workdir, reference, at, record_property, before=""):
  """Reruns `args` to the end: it must resume from `at` and log the reference's losses."""
  result = run_main(args)
  resumed = f"resumed from step {at}" in result.stderr
  same = result.returncode == 0 and losses(workdir) == losses(reference[0])
  record_property("observed", f"{before}rerun: exit {result.returncode}, "
                  f"{'resumed' if resumed else 'did not resume'} from step {at}, losses "
                  f"{'identical to' if same else 'DIFFERENT from'} the reference")
  assert result.returncode == 0, result.stderr[-3000:]
  assert resumed and same, result.stderr[-3000:]


@drill("kill9_mid_save", f"kill -9 while step {2 * CKPT_EVERY} is being written: it is never "
       f"restored; the rerun resumes from step {CKPT_EVERY} with identical losses")
def test_kill9_mid_save_never_restores_the_half_written_step(
    drill_corpus, data_dir, reference, tmp_path, record_property):
  step = 2 * CKPT_EVERY
  tmp = f"{step}.orbax-checkpoint-tmp"
  checkpoints = tmp_path / "checkpoints"

  def saving():
    return checkpoints.is_dir() and any(n.startswith(tmp) for n in os.listdir(checkpoints))
  args = drill_args(drill_corpus, data_dir, tmp_path)
  code, _ = start_and_interrupt(args, tmp_path, signal.SIGKILL, ready=saving, poll=0.001)
  mid_save = step not in checkpoint_steps(tmp_path)
  killed = (f"exit {code} with step {step} "
            f"{'half-written' if mid_save else 'ALREADY COMPLETE'}; ")
  record_property("observed", killed)
  assert code == -signal.SIGKILL
  assert mid_save, "the checkpoint was complete before the kill: nothing was tested"
  _resumed_identically(args, tmp_path, reference, CKPT_EVERY, record_property, killed)


@drill("corrupt_checkpoint", f"latest step {NUM_STEPS} truncated: warning names it, restores "
       f"step {NUM_STEPS - CKPT_EVERY}, identical losses, damaged step set aside")
def test_corrupt_checkpoint_falls_back_to_the_previous_step(
    drill_corpus, data_dir, reference, tmp_path, record_property):
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  arrays = [p for p in (workdir / "checkpoints" / str(NUM_STEPS) / "state").rglob("*")
            if p.is_file() and p.parent.name == "d"]
  largest = max(arrays, key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])
  result = run_main(drill_args(drill_corpus, data_dir, workdir))
  warned = f"checkpoint step {NUM_STEPS} in" in result.stderr and "unusable" in result.stderr
  fell_back = f"restored step {NUM_STEPS - CKPT_EVERY} instead of {NUM_STEPS}" in result.stderr
  same = result.returncode == 0 and losses(workdir) == losses(reference[0])
  set_aside = any(n.startswith(f"{NUM_STEPS}.unusable")
                  for n in os.listdir(workdir / "checkpoints"))
  record_property("observed", f"exit {result.returncode}; warning: {warned}; fell back: "
                  f"{fell_back}; losses {'identical' if same else 'DIFFERENT'}; set aside: "
                  f"{set_aside}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert warned and fell_back and same and set_aside, result.stderr[-3000:]


def test_cli_prints_the_table(tmp_path):
  """`python -m launch.drill` runs the selected drills through pytest and prints the table."""
  result = subprocess.run(
      [sys.executable, "-m", "launch.drill", "--only=unwritable_workdir",
       f"--keep_dir={tmp_path / 'lab'}"], cwd=REPO, env=env(), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "| drill | expected | observed | result |" in result.stdout
  assert "| unwritable_workdir | exit 2 naming the workdir | exit 2: error: --workdir=" in (
      result.stdout)
  assert result.stdout.rstrip().endswith("| pass |")
  assert list((tmp_path / "lab").iterdir()), "--keep_dir kept nothing"
