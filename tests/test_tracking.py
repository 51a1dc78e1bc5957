"""Optional experiment trackers (train/tracking.py behind train/metrics.py's MetricWriter): a tiny
pre-training run logs to a real MLflow sqlite store and to W&B in offline mode; read back, the
store holds the flattened config as parameters, the train and validation losses at the steps
metrics.jsonl has them, and the run's artefacts. Off by default: without tracking keys nothing
is imported. Sweeps name one tracker run per point under one experiment."""
import importlib.util
import json
import os

import pytest

from helpers import REPO, base_args, losses, run_main

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
STEPS = 4


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


@pytest.fixture(scope="module")
def tracked_run(corpus, data_dir, tmp_path_factory):
  pytest.importorskip("mlflow", reason="mlflow is optional: pip install -r "
                      "requirements-tracking.txt")
  root = tmp_path_factory.mktemp("tracking")
  workdir = root / "run"
  overrides = {"train.num_steps": STEPS, "train.eval_every": 2, "train.checkpoint_every": STEPS,
               "tracking.mlflow_uri": f"sqlite:///{root}/mlflow.db",
               "tracking.experiment": "tiny_experiment"}
  has_wandb = importlib.util.find_spec("wandb") is not None
  if has_wandb:
    overrides["tracking.wandb_project"] = "legal_lm_tests"
  if HAS_LM_EVAL:   # a pre-training run writes report.md when it has harness scores
    overrides.update({"eval.harness_tasks": "('legal_mc',)", "eval.harness_limit": 2,
                      "eval.harness_include_path": os.path.join(REPO, "tests", "harness_tasks"),
                      "data.seq_len": 64})
  os.environ["WANDB_MODE"] = "offline"
  r = run_main(base_args(corpus, data_dir, workdir, **overrides))
  assert r.returncode == 0, r.stderr[-3000:]
  return root, workdir, has_wandb


@pytest.mark.slow
def test_mlflow_store_holds_params_metrics_and_artifacts(tracked_run):
  from mlflow.tracking import MlflowClient
  root, workdir, _ = tracked_run
  client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
  experiment = client.get_experiment_by_name("tiny_experiment")
  runs = client.search_runs([experiment.experiment_id])
  assert len(runs) == 1
  run = runs[0]
  assert run.info.status == "FINISHED" and run.info.run_name == "run"
  config = json.loads((workdir / "config.json").read_text())
  flat = _flat(config)
  for key in ("optim.lr", "data.seq_len", "model.num_layers", "train.num_steps", "seed"):
    assert run.data.params[key] == str(flat[key]), key
  assert run.data.params["tracking.experiment"] == "tiny_experiment"
  assert int(run.data.params["params"]) > 0
  for split in ("train", "validation"):
    expected = losses(workdir, split)
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id,
                                                                  f"{split}/loss")}
    assert history == pytest.approx(expected, rel=1e-6), split
  assert sorted(losses(workdir, "train")) == list(range(1, STEPS + 1))
  assert sorted(losses(workdir, "validation")) == [0, 2, 4]
  artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
  assert {"loss_curve.png", "config.json"} <= artifacts
  if HAS_LM_EVAL:
    assert "report.md" in artifacts
    assert "harness: legal_mc" in (workdir / "report.md").read_text()
    assert "test/harness/legal_mc/acc" in run.data.metrics
  record = json.loads((workdir / "tracking.json").read_text())
  assert record["mlflow_run_id"] == run.info.run_id


def _wandb_records(path):
  """Payloads of a .wandb file: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of
  records with a 7-byte header (crc32, length uint16, type: 1 full, 2 first, 3 middle, 4 last)."""
  import struct
  raw = path.read_bytes()
  assert raw[:4] == b":W&B"
  pos, block, parts = 7, 32768, []
  while pos + 7 <= len(raw):
    if block - pos % block < 7:   # the block's tail is padding
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
    if kind == 0:
      break
    data = raw[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind == 1:
      yield data
    elif kind == 2:
      parts = [data]
    elif kind == 3:
      parts.append(data)
    else:
      yield b"".join(parts + [data])


@pytest.mark.slow
def test_wandb_offline_run_has_the_history(tracked_run):
  _, workdir, has_wandb = tracked_run
  if not has_wandb:
    pytest.skip("wandb is optional: pip install -r requirements-tracking.txt")
  runs = [d for d in os.listdir(workdir / "wandb") if d.startswith("offline-run-")]
  assert len(runs) == 1
  run_dir = workdir / "wandb" / runs[0]
  record = json.loads((workdir / "tracking.json").read_text())
  assert runs[0].endswith(record["wandb_run_id"])
  files = os.listdir(run_dir / "files")
  assert "loss_curve.png" in files and "config.json" in files
  # The run's transaction log (wandb's LevelDB-style record file), parsed here: every train/loss
  # logged, at its step.
  from wandb.proto import wandb_internal_pb2
  history = {}
  for data in _wandb_records(run_dir / f"run-{record['wandb_run_id']}.wandb"):
    rec = wandb_internal_pb2.Record()
    rec.ParseFromString(data)
    if rec.WhichOneof("record_type") == "history":
      items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
      if "train/loss" in items:
        history[int(items["trainer/step"])] = items["train/loss"]
  assert history == pytest.approx(losses(workdir, "train"), rel=1e-6)


def test_no_tracking_keys_no_tracker_imports_and_no_torch(tmp_path):
  """Nothing optional is imported (torch neither: tensorboardX would import it, ~2.7 s of every
  run's start; docs/results/tests.md), and the TensorBoard event file holds the scalar."""
  import subprocess
  import sys
  import struct
  code = ("import sys, ml_collections\n"
          "from train import metrics\n"
          "w = metrics.MetricWriter(sys.argv[1])\n"
          "w.write(7, 'train', {'loss': 1.5}); w.close(); w.finish()\n"
          "bad = [m for m in ('mlflow', 'wandb', 'lm_eval', 'train.tracking', 'torch')\n"
          "       if m in sys.modules]\n"
          "assert not bad, bad\n")
  r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  from tensorboardX.proto import event_pb2
  (events,) = os.listdir(tmp_path / "tb")
  data, scalars = (tmp_path / "tb" / events).read_bytes(), {}
  while data:   # TFRecord: u64 length, u32 crc, payload, u32 crc
    (length,) = struct.unpack("<Q", data[:8])
    event = event_pb2.Event.FromString(data[12:12 + length])
    data = data[16 + length:]
    scalars.update({(v.tag, event.step): v.simple_value for v in event.summary.value})
  assert scalars == {("train/loss", 7): 1.5}


def test_sweep_points_are_runs_of_one_experiment():
  from configs import common
  from launch import sweep
  base = common.base_config()
  point = sweep.Point("kind=local", (("model.attention.kind", "local"),))
  assert sweep.tracking_overrides(base, {}, "/x/ablate", point) == ()
  forwarded = {"tracking.mlflow_uri": "sqlite:///m.db"}
  assert sweep.tracking_overrides(base, forwarded, "/x/ablate/", point) == (
      ("tracking.experiment", "ablate"), ("tracking.run_name", "kind=local"))
  forwarded["tracking.experiment"] = "mine"
  assert sweep.tracking_overrides(base, forwarded, "/x/ablate", point) == (
      ("tracking.run_name", "kind=local"),)


def test_metric_names_are_made_legal_for_tensorboard_and_trackers(tmp_path, caplog):
  import struct
  from tensorboardX.proto import event_pb2
  from train import metrics

  class Recorder:
    logged = []

    def log(self, step, scalars):
      self.logged.append((step, scalars))

  writer = metrics.MetricWriter(str(tmp_path), trackers=[Recorder()])
  with caplog.at_level("WARNING"):
    writer.write(3, "test/baseline/tf-idf_+_logistic_regression", {"accuracy": 0.9})
  writer.close()
  assert not [r for r in caplog.records if "illegal" in r.getMessage()]
  tag = "test/baseline/tf-idf___logistic_regression/accuracy"
  assert Recorder.logged == [(3, {tag: 0.9})]
  (events_file,) = (tmp_path / "tb").iterdir()
  raw, tags, pos = events_file.read_bytes(), [], 0
  while pos < len(raw):      # TFRecords: length (u64), its crc, the Event, the Event's crc
    (length,) = struct.unpack("<Q", raw[pos:pos + 8])
    event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
    tags += [v.tag for v in event.summary.value]
    pos += 12 + length + 4
  assert tags == [tag]
  # The JSONL keeps the evaluator's own name (eval/learning_curve.py reads it).
  record = json.loads((tmp_path / "metrics.jsonl").read_text())
  assert record == {"step": 3, "split": "test/baseline/tf-idf_+_logistic_regression",
                    "accuracy": 0.9}
