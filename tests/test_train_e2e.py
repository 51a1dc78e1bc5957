"""End-to-end runs of `python -m train.main` in subprocesses, on a tiny generated corpus.

Covers what only a real process can show: kill -9 and SIGTERM mid-run followed by a rerun give
bit-identical per-step losses to an uninterrupted run; clear one-line errors for bad configs
and data. (The 2-process jax.distributed run and its resume: tests/test_launch.py.) The corpus
and data_dir fixtures are in conftest.py, the run helpers in helpers.py.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from model import checkpoint as checkpoint_lib
from model.progress import format_eta

from helpers import (NUM_STEPS, REPO, base_args, checkpoint_steps, env, losses, run_main,
                     start_and_interrupt)

# Tests marked `drill` are also reliability drills (`python -m launch.drill`, docs/launch.md);
# tests/test_drills.py holds the drills no test here covers.
drill = pytest.mark.drill


@pytest.fixture(scope="module")
def reference_run(corpus, data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = run_main(base_args(corpus, data_dir, workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_uninterrupted_run_learns(reference_run):
  train = losses(reference_run)
  assert sorted(train) == list(range(1, NUM_STEPS + 1))
  val = losses(reference_run, "validation")
  assert val[NUM_STEPS] < val[40] < val[20] < val[0] - 0.2, val
  assert checkpoint_steps(reference_run)[-1] == NUM_STEPS
  for name in ("config.json", "metrics.jsonl"):
    assert os.path.exists(os.path.join(reference_run, name))
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(reference_run / "tb"))
  with open(reference_run / "metrics.jsonl") as f:
    waits = [r["input_wait_frac"] for r in map(json.loads, f) if r["split"] == "train"]
  assert len(waits) == NUM_STEPS and all(0.0 <= w <= 1.0 for w in waits), waits


def test_progress_reports_the_share_of_time_spent_waiting_for_input(monkeypatch):
  from train import metrics
  now = [100.0]
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
  progress = metrics.Progress(0, 100, tokens_per_step=10, flops_per_step=1.0, peak_flops=1.0)
  progress.waited_for_input(1.5)
  progress.waited_for_input(1.0)
  now[0] = 110.0
  first = progress.update(10)
  assert first["input_wait_frac"] == pytest.approx(0.25) and first["step_time_s"] == 1.0
  now[0] = 120.0
  assert progress.update(20)["input_wait_frac"] == 0.0    # each interval counts afresh


@pytest.mark.slow
@pytest.mark.parametrize("sig", [
    pytest.param(signal.SIGKILL, id="kill9"),
    pytest.param(signal.SIGTERM, id="sigterm", marks=drill(
        "sigterm_preemption", "SIGTERM after the step-20 checkpoint: checkpoint, exit 0; the rerun "
        "resumes with identical losses")),
])
def test_interrupted_run_resumes_bit_identical(corpus, data_dir, tmp_path, reference_run, sig):
  args = base_args(corpus, data_dir, tmp_path)
  code, stderr = start_and_interrupt(args, tmp_path, sig)
  steps = checkpoint_steps(tmp_path)
  if sig == signal.SIGTERM:
    assert code == 0, stderr[-3000:]     # preemption: checkpoint, then a clean exit
    assert "preempted at step" in stderr
  else:
    assert code == -signal.SIGKILL
  assert steps[-1] < NUM_STEPS, "the run finished before the signal: nothing was tested"
  interrupted_at = steps[-1]

  result = run_main(args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from step {interrupted_at}" in result.stderr
  # Bit-identical: the JSON floats are exact reprs of the float32 values.
  assert losses(tmp_path) == losses(reference_run)
  assert losses(tmp_path, "validation") == losses(reference_run, "validation")
  # The run's training time goes on from the checkpoint's, not from zero: it never drops
  # from one logged step to the next across the restart.
  wall = losses(tmp_path, key="wall_s")
  wall = [wall[s] for s in sorted(wall)]
  assert all(a <= b for a, b in zip(wall, wall[1:])), wall
  assert "training time, all sessions of this run" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("override, expected", [
    pytest.param("--config.model.no_such_key=1", "no_such_key",
                 marks=drill("unknown_key", "exit 2 naming the key")),
    pytest.param("--config.data.extra_dirs=('/no/such/folder',)", "/no/such/folder",
                 marks=drill("missing_data_folder", "exit 2 naming the folder")),
    pytest.param("--config.mesh.data=3", "config.mesh",
                 marks=drill("mesh_mismatch", "exit 2: the mesh does not multiply to the device "
                             "count")),
    ("--config.model.num_kv_heads=3", "num_kv_heads"),
    pytest.param("--config.train.num_steps=abc", "num_steps",
                 marks=drill("wrong_type", "exit 2 naming the key")),
])
def test_bad_config_gives_one_clear_error(corpus, data_dir, tmp_path, override, expected,
                                          record_property):
  result = run_main(base_args(corpus, data_dir, tmp_path) + [override], timeout=300)
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  record_property("observed", f"exit {result.returncode}: {(errors or ['(no error line)'])[-1]}")
  assert result.returncode == 2, result.stderr[-3000:]
  assert expected in result.stderr
  assert "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_pod_sized_config_compiles_ahead_of_time():
  """The real-size preset (widths, vocab, seq 2048, fsdp over 8 devices) builds, shards and
  compiles; 2 of its 24 layers keep the compile short."""
  result = subprocess.run(
      [sys.executable, "-m", "train.main", "--config=configs/legal_pretrain.py", "--aot_only",
       "--config.model.num_layers=2"],
      cwd=REPO, env=env(devices=8), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "AOT compile OK" in result.stdout
  assert "{'data': 1, 'fsdp': 8, 'context': 1, 'tensor': 1}" in result.stdout
  # 2 layers of d_model 2048 / MLP 8192 + a 32768 x 2048 tied table.
  params = 2 * (4 * 2048 * 2048 + 3 * 2048 * 8192 + 2 * 2048) + 32768 * 2048 + 2048
  assert f"{params / 1e6:.1f}M params" in result.stdout


@pytest.mark.slow
@drill("nonfinite_loss", "exit 3 at step 2; only the finite step-1 checkpoint exists, and its "
       "arrays are finite")
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(corpus, data_dir, tmp_path):
  # An absurd learning rate: step 1 is finite, its update makes step 2's loss non-finite.
  args = base_args(corpus, data_dir, tmp_path, **{
      "optim.lr": 1e30, "optim.warmup_steps": 0, "optim.clip_norm": 0.0,
      "train.checkpoint_every": 1, "train.num_steps": 10})
  result = run_main(args, timeout=300)
  assert result.returncode == 3, result.stderr[-3000:]
  assert "non-finite loss at step 2" in result.stderr
  assert "Traceback" not in result.stderr
  assert checkpoint_steps(tmp_path) == [1]

  import jax
  import orbax.checkpoint as ocp
  from model.checkpoint import Checkpointer
  ckpt = Checkpointer(str(tmp_path), every=1, keep=3)
  # Untargeted restore: every saved array as written.
  restored = ckpt.manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  ckpt.close()
  leaves = jax.tree.leaves(restored.state)
  assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)


@pytest.mark.slow
@drill("nonfinite_skip", "config.train.nonfinite=skip: each skipped step is logged; N in a row "
       "still stop the run (exit 3)")
def test_nonfinite_skip_drops_updates_then_stops_after_a_run_of_them(corpus, data_dir, tmp_path):
  """config.train.nonfinite=skip, through the real loop: every non-finite step is logged and
  skipped; MAX_CONSECUTIVE_SKIPS in a row still stop the run (exit 3)."""
  from train.loop import MAX_CONSECUTIVE_SKIPS
  args = base_args(corpus, data_dir, tmp_path, **{
      "optim.lr": 1e30, "optim.warmup_steps": 0, "optim.clip_norm": 0.0,
      "train.checkpoint_every": 100, "train.num_steps": 30, "train.nonfinite": "skip"})
  result = run_main(args, timeout=300)
  assert result.returncode == 3, result.stderr[-3000:]
  skipped = [int(s) for s in re.findall(r"step (\d+): non-finite loss .* update skipped",
                                        result.stderr)]
  # Step 1 is finite and its update diverges: steps 2 .. N are skipped, step N + 1 stops.
  assert skipped == list(range(2, MAX_CONSECUTIVE_SKIPS + 1)), result.stderr[-3000:]
  assert f"non-finite loss at {MAX_CONSECUTIVE_SKIPS} steps in a row" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_rerunning_a_finished_run_says_so_and_validates_again(reference_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run, workdir)
  before = losses(workdir, "validation")
  result = run_main(base_args_for(workdir, reference_run))
  assert result.returncode == 0, result.stderr[-3000:]
  assert (f"already finished (step {NUM_STEPS} of config.train.num_steps={NUM_STEPS}): "
          "nothing to train") in result.stderr
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  again = [r for r in rows if r["split"] == "validation" and r["step"] == NUM_STEPS]
  assert len(again) == 2 and again[0]["loss"] == again[1]["loss"] == before[NUM_STEPS]
  assert checkpoint_steps(workdir) == checkpoint_steps(reference_run)
  # Nothing trained, so the run's training time is the one its last checkpoint recorded.
  meta = checkpoint_lib.Checkpointer(str(workdir), every=NUM_STEPS, keep=NUM_STEPS,
                                     async_save=False).restore_meta(NUM_STEPS)
  expected = f"{format_eta(meta['wall_s'])} ({meta['wall_s']:.3f} s, step {NUM_STEPS})"
  assert f"training time, all sessions of this run: {expected}" in result.stderr, \
      result.stderr[-3000:]
  # The run ends with one line naming its folder and what it holds.
  steps = ", ".join(map(str, checkpoint_steps(workdir)))
  folder_lines = [x for x in result.stderr.splitlines() if "] run folder " in x]
  assert len(folder_lines) == 1 and folder_lines[0].endswith(
      f"run folder {workdir}: checkpoints/ (steps {steps}), config.json, metrics.jsonl, "
      "tb/ (TensorBoard), loss_curve.png"), result.stderr[-3000:]


def base_args_for(workdir, reference_workdir):
  """The command line `reference_workdir` was trained with, pointed at `workdir`."""
  config = json.loads((reference_workdir / "config.json").read_text())
  data = config["data"]
  return base_args(data["extra_dirs"][0], data["data_dir"], workdir)


@pytest.mark.slow
def test_a_failed_start_leaves_no_workdir_or_checkpoints_folder(corpus, data_dir, tmp_path):
  bad = {"data.extra_dirs": "('/no/such/folder',)"}
  fresh = tmp_path / "new_run"
  result = run_main(base_args(corpus, data_dir, fresh, **bad), timeout=300)
  assert result.returncode == 2 and "/no/such/folder" in result.stderr, result.stderr[-2000:]
  assert not fresh.exists()
  existing = tmp_path / "made_by_the_user"
  existing.mkdir()
  result = run_main(base_args(corpus, data_dir, existing, **bad), timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert existing.is_dir() and os.listdir(existing) == []
