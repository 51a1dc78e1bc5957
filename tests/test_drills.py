"""Runs launch/drill.py: a tiny training run broken on purpose in every way docs/launch.md lists.

The drills other tests already run (tests/test_train_e2e.py: bad flags, mesh, missing folder,
non-finite loss, SIGTERM resume; and the non-finite skip policy) are left out here (`--fast`);
the rest run for real, in subprocesses.
"""
import subprocess
import sys

from launch import drill
from test_train_e2e import REPO, env


def test_every_drill_not_covered_elsewhere_passes(tmp_path):
  rows = drill.run_drills(tmp_path / "lab", fast=True)
  assert [d.name for d, _, _ in rows] == [d.name for d in drill.DRILLS if d.fast]
  assert all(passed for _, _, passed in rows), drill.table(rows)


def test_cli_prints_the_table(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "launch.drill", "--only=unwritable_workdir",
       f"--keep_dir={tmp_path / 'lab'}"], cwd=REPO, env=env(), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "| drill | expected | observed | result |" in result.stdout
  assert "| unwritable_workdir | exit 2 naming the workdir | exit 2: error: --workdir=" in (
      result.stdout)
  assert result.stdout.rstrip().endswith("| pass |")
