"""launch/sweep.py (grid expansion, job commands, a real 2-point sweep) and bench/long_context.py.

The end-to-end tests run the programs in subprocesses on the tiny generated corpus (the `corpus`
fixture of tests/conftest.py), with `full` attention only, so they pass whichever kernels are
registered.
"""
import csv
import json
import math
import re
import shlex
import subprocess
import sys

import ml_collections
import pytest

from configs import common
from helpers import REPO, env
from launch import sweep as sweep_lib

# A sweep config file as a user would write one: it is also the train.main config of its points.
MINI_SWEEP = '''
import ml_collections
from configs import legal_pretrain


def get_config(arg="mini"):
  preset, _, part = arg.partition(":")
  base = legal_pretrain.get_config("tiny")
  base.data.update(use_licensedcode=False, vocab_size=384, seq_len=32, batch_size=8,
                   validation_fraction=0.1, prefetch=2)
  base.model.update(num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16,
                    mlp_dim=64)
  base.optim.warmup_steps = 2
  base.train.update(num_steps=6, log_every=2, eval_every=3, eval_batches=2, checkpoint_every=3)
  sweep = ml_collections.ConfigDict()
  sweep.preset = preset
  sweep.base = base
  sweep.grid = (("model.positions", ("rope", "learned")),)
  sweep.relevant_if = ()
  sweep.exclude = ()
  sweep.points = ()
  return base if part == "base" else sweep
'''


def make_sweep(grid, relevant_if=(), exclude=(), points=()):
  sweep = ml_collections.ConfigDict()
  sweep.preset = "test"
  sweep.base = common.base_config()
  sweep.grid, sweep.relevant_if, sweep.exclude, sweep.points = grid, relevant_if, exclude, points
  return sweep


def test_grid_is_a_product_with_relevance_exclusion_and_explicit_points():
  sweep = make_sweep(
      grid=(("model.positions", ("rope", "learned")), ("model.num_kv_heads", (1, 2)),
            ("model.attention.block_size", (64, 128))),
      # block_size "matters" only with rope here: the learned points collapse 4 -> 2.
      relevant_if=(("model.attention.block_size", "model.positions", ("rope",)),),
      exclude=((("model.positions", "rope"), ("model.num_kv_heads", 1)),),
      points=((("model.num_layers", 3),),))
  points = sweep_lib.expand(sweep)
  overrides = [dict(p.overrides) for p in points]
  assert len(points) == 2 + 2 + 1, [p.name for p in points]   # rope: kv 2 x 2 blocks
  assert {"model.num_layers": 3} in overrides
  assert not any(o.get("model.positions") == "rope" and o["model.num_kv_heads"] == 1
                 for o in overrides if "model.num_kv_heads" in o)
  assert not any(o.get("model.positions") == "learned" and "model.attention.block_size" in o
                 for o in overrides)
  names = [p.name for p in points]
  assert len(set(names)) == len(names)
  assert "positions=rope,num_kv_heads=2,block_size=64" in names
  assert all(re.fullmatch(r"[A-Za-z0-9._=+,-]+", n) for n in names)   # filesystem-safe


def test_names_fall_back_to_full_keys_when_last_parts_clash():
  sweep = make_sweep(grid=(("a.x", (1, 2)),), points=((("b.x", 1),), (("a.x", 1),)))
  sweep.base = ml_collections.ConfigDict({"a": {"x": 0}, "b": {"x": 0}})
  names = [p.name for p in sweep_lib.expand(sweep)]   # the repeated explicit point runs once
  assert names == ["a.x=1", "a.x=2", "b.x=1"]


@pytest.mark.parametrize("grid, points, message", [
    ((("model.attention.no_such_key", (1, 2)),), (), "'model.attention.no_such_key'"),
    ((("model.positions", ("rope",)),), ((("nosection.x", 1),),), "'nosection.x'"),
    ((("model.num_layers", ("two",)),), (), "model.num_layers='two'"),
])
def test_bad_keys_and_values_fail_up_front_naming_them(grid, points, message):
  with pytest.raises(sweep_lib.SweepError, match=message.replace(".", r"\.")):
    sweep_lib.expand(make_sweep(grid, points=points))


def run_sweep(config_file, sweep_dir, *extra, corpus_dir=None, data=None, timeout=600):
  args = [f"--config={config_file}:mini", f"--sweep_dir={sweep_dir}", *extra]
  if corpus_dir:
    args += [f"--config.base.data.extra_dirs=('{corpus_dir}',)",
             f"--config.base.data.data_dir={data}"]
  return subprocess.run([sys.executable, "-m", "launch.sweep", *args], cwd=REPO, env=env(),
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def mini_config(tmp_path):
  path = tmp_path / "mini_sweep.py"
  path.write_text(MINI_SWEEP)
  return path


def test_print_jobs_gives_one_reproducible_command_per_point(mini_config, tmp_path):
  result = run_sweep(mini_config, tmp_path / "sweep", "--print_jobs", "--config.base.seed=7")
  assert result.returncode == 0, result.stderr[-3000:]
  jobs = [shlex.split(line) for line in result.stdout.strip().splitlines()]
  assert len(jobs) == 2
  for job, positions in zip(jobs, ("rope", "learned")):
    assert job[1:4] == ["-m", "train.main", f"--config={mini_config}:mini:base"]
    assert f"--workdir={tmp_path / 'sweep' / f'positions={positions}'}" in job
    assert f"--config.model.positions={positions}" in job
    assert "--config.seed=7" in job   # base overrides reach every point
  assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_mini_sweep_end_to_end_then_skips_finished_points(mini_config, corpus, data_dir,
                                                          tmp_path):
  sweep_dir = tmp_path / "sweep"
  first = run_sweep(mini_config, sweep_dir, corpus_dir=corpus, data=data_dir)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  for name in ("results.csv", "results.md", "loss_curves.png", "quality_vs_speed.png"):
    assert (sweep_dir / name).stat().st_size > 0, name
  with open(sweep_dir / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert sorted(r["name"] for r in rows) == ["positions=learned", "positions=rope"]
  for r in rows:
    assert r["status"] == "done" and r["steps"] == "6"
    for key in ("final_val_loss", "best_val_loss", "best_val_ppl", "tokens_per_s",
                "step_time_ms", "peak_rss_mib"):
      assert math.isfinite(float(r[key])) and float(r[key]) > 0, (key, r)
    assert float(r["best_val_loss"]) <= float(r["final_val_loss"])
  # learned positions add max_len x d_model parameters.
  params = {r["name"]: int(r["params"]) for r in rows}
  assert params["positions=learned"] - params["positions=rope"] == 8192 * 32
  losses = [float(r["best_val_loss"]) for r in rows]
  assert losses == sorted(losses)
  assert len((sweep_dir / "results.md").read_text().strip().splitlines()) == 2 + 2

  logs = {p: (sweep_dir / p / "sweep.log").stat().st_size for p in params}
  second = run_sweep(mini_config, sweep_dir, corpus_dir=corpus, data=data_dir)
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stdout.count("done, skipped") == 2
  assert logs == {p: (sweep_dir / p / "sweep.log").stat().st_size for p in params}


@pytest.mark.slow
def test_long_context_benchmark_tiny(tmp_path):
  out = tmp_path / "lc"
  result = subprocess.run(
      [sys.executable, "-m", "bench.long_context", "--kinds=full,no_such_kernel",
       "--lengths=64,128", "--tokens_per_batch=256", "--num_layers=1", "--d_model=32",
       "--num_heads=2", "--vocab_size=256", "--timed_steps=2", f"--out_dir={out}"],
      cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "skipped: no_such_kernel" in result.stdout
  report = json.loads((out / "long_context.json").read_text())
  assert report["missing_kinds"] == ["no_such_kernel"]
  assert [(r["kind"], r["seq_len"], r["batch"]) for r in report["results"]] == [
      ("full", 64, 4), ("full", 128, 2)]
  for r in report["results"]:
    assert r["status"] == "ok", r
    assert r["step_ms"] > 0 and r["xla_temp_bytes"] > 0 and r["peak_rss_bytes"] > 0
  assert (out / "long_context.png").stat().st_size > 0
