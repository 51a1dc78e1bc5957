"""Tests of launch/cluster.py: the generated TPU-pod / GKE / SLURM / local artefacts and the
up-front config checks.

The shell artefacts are executed, not just grepped: fake `gcloud`, `srun` and `scontrol` on PATH
run the real script the way the cluster would (every worker / every task), and a fake `python3`
records the working directory, the JAX_* variables and the exact argv train.main would get. The
local launcher runs a real 2-process training and resumes it.
"""
import ast
import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import yaml

from configs import legal_pretrain
from helpers import REPO, base_args, env
from launch import cluster
from train.config_check import ConfigError

OVERRIDES = ("--config.data.extra_dirs=('/data/legal corpus',)", "--config.train.num_steps=50")
RECORD = """#!/bin/bash
{ pwd; echo "$JAX_COORDINATOR_ADDRESS|$JAX_NUM_PROCESSES|$JAX_PROCESS_ID"
  printf '%s\\n' "$@"; } > "$RECORD_DIR/call_${JAX_PROCESS_ID:-$WORKER}"
"""
FAKE_TOOLS = {
    # Runs the remote command on every worker of the slice, as `--worker=all` does.
    "gcloud": """#!/bin/bash
for arg in "$@"; do [[ $arg == --command=* ]] && cmd="${arg#--command=}"; done
for WORKER in 0 1 2 3; do WORKER=$WORKER bash -c "$cmd"; done
""",
    # The batch step runs on the first node of the allocation.
    "sbatch": """#!/bin/bash
exec bash "$1"
""",
    "scontrol": """#!/bin/bash
[[ "$*" == "show hostnames gpu-[07-08]" ]] && printf 'gpu-07\\ngpu-08\\n'
""",
    # One task per node, each with its rank, as srun --ntasks-per-node=1 does.
    "srun": """#!/bin/bash
shift   # --kill-on-bad-exit=1
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@"; done
""",
    "python3": RECORD,
}


def _job(platform, preset, *overrides, workdir="/shared/runs/Contract_v2", **options):
  """A Job as the CLI builds it: the tiny config with `overrides` applied, then the preset."""
  config = legal_pretrain.get_config("tiny")
  for arg in overrides:
    key, value = arg[len("--config."):].split("=", 1)
    config.update_from_flattened_dict({key: ast.literal_eval(value)})
  argv = ["--config=configs/legal_pretrain.py:tiny", *overrides]
  return cluster.make_job(platform, config, argv, workdir, preset, **options)


def _run_with_fake_tools(tmp_path, job, extra_env):
  """Writes and runs the job's script with the fake tools; {process id: (cwd, env, argv)}."""
  bin_dir, record_dir = tmp_path / "bin", tmp_path / "calls"
  for folder in (bin_dir, record_dir, tmp_path / "home" / "legal-lm"):
    folder.mkdir(parents=True)
  for name, text in FAKE_TOOLS.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(stat.S_IRWXU)
  command = cluster.write(job, str(tmp_path / "out"))
  clean = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  result = subprocess.run(command, capture_output=True, text=True, timeout=60, env={
      **clean, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path / "home"),
      "RECORD_DIR": str(record_dir), **extra_env})
  assert result.returncode == 0, result.stderr
  calls = {}
  for path in record_dir.iterdir():
    cwd, jax_env, *argv = path.read_text().splitlines()
    calls[path.name.split("_")[1]] = (cwd, jax_env, argv)
  return command, calls


def _train_argv(mesh, *after):
  return ["-m", "train.main", "--config=configs/legal_pretrain.py:tiny", *OVERRIDES, *mesh,
          "--workdir=/shared/runs/Contract_v2", *after]


def test_slurm_script_starts_one_process_per_node_with_the_jax_contract(tmp_path):
  job = _job("slurm", "2x8xh100", *OVERRIDES)
  script = cluster.write(job, str(tmp_path / "peek"))[-1]
  with open(script) as f:
    text = f.read()
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
               "#SBATCH --job-name=contract-v2"):
    assert line in text.splitlines()
  command, calls = _run_with_fake_tools(tmp_path, job, {
      "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_NTASKS": "2"})
  assert command[0] == "sbatch"
  mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=8", "--config.mesh.tensor=1"]
  assert calls == {str(i): (REPO, f"gpu-07:8476|2|{i}", _train_argv(mesh)) for i in (0, 1)}


def test_tpu_pod_script_runs_on_every_worker_with_auto_detection(tmp_path):
  job = _job("tpu-pod", "v4-32", *OVERRIDES, name="my-v4", zone="us-central2-b")
  command, calls = _run_with_fake_tools(tmp_path, job, {})
  assert command[0] == "bash"
  with open(command[-1]) as f:
    gcloud = [line for line in f if line.startswith("gcloud ")]
  assert gcloud[0].startswith("gcloud compute tpus tpu-vm ssh my-v4 --zone=us-central2-b "
                              "--worker=all ")
  mesh = ["--config.mesh.data=1", "--config.mesh.fsdp=16", "--config.mesh.tensor=1"]
  home = str(tmp_path / "home" / "legal-lm")
  # No JAX_* variables: --distributed=on lets jax.distributed detect the TPU slice.
  assert calls == {str(w): (home, "||", _train_argv(mesh, "--distributed=on"))
                   for w in range(4)}


@pytest.mark.parametrize("preset, pods, selector, resource", [
    ("v5p-128", 16, {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                     "cloud.google.com/gke-tpu-topology": "4x4x4"}, {"google.com/tpu": 4}),
    ("2x8xh100", 2, {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
     {"nvidia.com/gpu": 8}),
])
def test_gke_jobset_sets_process_count_id_and_coordinator(tmp_path, preset, pods, selector,
                                                          resource):
  overrides = (*OVERRIDES, "--config.data.batch_size=64")   # divisible by 16 processes x fsdp 64
  job = _job("gke", preset, *overrides, image="registry/legal-lm:1", pvc="runs-claim:/shared")
  command = cluster.write(job, str(tmp_path))
  assert command[:3] == ["kubectl", "apply", "-f"]
  with open(command[-1]) as f:
    manifest = yaml.safe_load(f)
  assert manifest["kind"] == "JobSet" and manifest["metadata"]["name"] == "contract-v2"
  assert manifest["spec"]["network"]["enableDNSHostnames"] is True
  (workers,) = manifest["spec"]["replicatedJobs"]
  spec = workers["template"]["spec"]
  assert (workers["name"], workers["replicas"]) == ("workers", 1)
  assert (spec["parallelism"], spec["completions"], spec["completionMode"]) == (pods, pods,
                                                                                 "Indexed")
  pod = spec["template"]["spec"]
  assert pod["nodeSelector"] == selector
  assert pod["volumes"] == [{"name": "shared",
                            "persistentVolumeClaim": {"claimName": "runs-claim"}}]
  (container,) = pod["containers"]
  assert container["resources"]["limits"] == resource
  assert container["image"] == "registry/legal-lm:1" and container["workingDir"] == "/app"
  assert container["volumeMounts"] == [{"name": "shared", "mountPath": "/shared"}]
  mesh = [f"--config.mesh.{k}={v}" for k, v in job.preset.mesh.items()]
  assert container["command"] == ["python3", "-m", "train.main",
                                  "--config=configs/legal_pretrain.py:tiny", *overrides, *mesh,
                                  "--workdir=/shared/runs/Contract_v2"]
  env_vars = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
  assert env_vars == {
      "JAX_COORDINATOR_ADDRESS": "contract-v2-workers-0-0.contract-v2:8476",
      "JAX_NUM_PROCESSES": str(pods),
      "JAX_PROCESS_ID": {"fieldRef": {"fieldPath": "metadata.annotations"
                                      "['batch.kubernetes.io/job-completion-index']"}}}


def test_explicit_mesh_flags_win_over_the_preset():
  job = _job("slurm", "2x8xh100", "--config.mesh.fsdp=4", "--config.mesh.tensor=2")
  assert [a for a in job.train_args if a.startswith("--config.mesh")] == [
      "--config.mesh.fsdp=4", "--config.mesh.tensor=2", "--config.mesh.data=2"]


@pytest.mark.parametrize("platform, preset, overrides, options, message", [
    ("slurm", "2x8xh100", ("--config.mesh.fsdp=3",), {},
     r"2x8xh100 \(16 devices in 2 processes\): config.mesh .* multiplies to 6 but there are 16"),
    ("slurm", "v5p-128", (), {}, "v5p-128 is a tpu preset; slurm runs gpu presets"),
    ("gke", "h100", (), {"image": "x"}, "unknown --platform_preset='h100'"),
    ("tpu-pod", "v4-32", (), {}, "tpu-pod needs --zone"),
    ("gke", "8xh100", (), {}, "gke needs --image"),
    ("slurm", "8xh100", (), {"workdir": "runs/x"}, "absolute path on a shared filesystem"),
    ("gke", "8xh100", (), {"image": "x", "workdir": "gs://b/r"}, "mount the bucket"),
    ("slurm", "8xh100", (), {"name": "Big_Run"}, "--name=Big_Run: expected lowercase"),
    ("gke", "8xh100", (), {"image": "x", "pvc": "claim"}, "--pvc=claim: expected CLAIM:/"),
])
def test_bad_launch_requests_fail_up_front(platform, preset, overrides, options, message):
  with pytest.raises(ConfigError, match=message):
    _job(platform, preset, *overrides, **options)


def test_cli_dry_run_and_one_line_mesh_error(tmp_path):
  cmd = [sys.executable, "-m", "launch.cluster", "slurm", "--platform_preset=8xh100",
         "--config=configs/legal_pretrain.py:tiny", "--workdir=/shared/runs/a",
         f"--out_dir={tmp_path}"]
  dry = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
  assert dry.returncode == 0, dry.stderr[-3000:]
  assert f"submit with:\n  sbatch {tmp_path}/job.sbatch" in dry.stdout
  assert os.path.exists(tmp_path / "job.sbatch")

  bad = subprocess.run(cmd + ["--config.mesh.tensor=3", f"--out_dir={tmp_path}/bad"], cwd=REPO,
                       env=env(), capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2
  assert "error: platform preset 8xh100 (8 devices in 1 processes): config.mesh" in bad.stderr
  assert "Traceback" not in bad.stderr and not os.path.exists(tmp_path / "bad")


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_local_launch_trains_two_processes_and_resumes_exactly(
    corpus, data_dir, tmp_path):
  workdir = tmp_path / "run"
  args = base_args(corpus, data_dir, workdir, **{"train.num_steps": 6,
                                                 "train.checkpoint_every": 3})
  cmd = [sys.executable, "-m", "launch.cluster", "local", "--platform_preset=cpu-8",
         f"--out_dir={tmp_path / 'job'}", "--submit", *args]
  first = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
  assert "mesh {'data': 2, 'fsdp': 4, 'context': 1, 'tensor': 1} on 8 devices (2 processes)" in first.stdout
  before = _metrics(workdir)
  # Lose the last checkpoint (a crash after step 6 was logged): the next launch redoes 4-6.
  shutil.rmtree(workdir / "checkpoints" / "6")
  second = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-2000:]
  assert "resumed from step 3" in second.stdout
  again = _metrics(workdir)[len(before):]
  assert sorted((r["split"], r["step"]) for r in again) == [
      ("train", 4), ("train", 5), ("train", 6), ("validation", 6)]
  first_time = {(r["split"], r["step"]): r["loss"] for r in before}
  for row in again:   # the resumed processes continue exactly where the checkpoint left off
    assert row["loss"] == first_time[row["split"], row["step"]], row
  assert np.isfinite(row["loss"])


def test_local_processes_keep_the_callers_xla_flags(monkeypatch):
  from launch import local
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
  env = local.process_env(1, 2, 1234, devices=4)
  assert env["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=4"
  assert (env["JAX_PROCESS_ID"], env["JAX_NUM_PROCESSES"]) == ("1", "2")
