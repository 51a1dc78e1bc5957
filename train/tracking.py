"""Optional experiment trackers behind train/metrics.py's MetricWriter: MLflow and Weights &
Biases. TensorBoard and metrics.jsonl are always written; a tracker is added only when its
config key is set (`tracking.mlflow_uri`, `tracking.wandb_project`), and its package is imported
only then (requirements-tracking.txt), so `python -m train.main` never needs either.

What each tracker gets: the resolved config flattened to dotted keys as hyper-parameters (plus
the parameter count), every scalar MetricWriter writes (`<split>/<name>` at its step:
train/loss, validation/loss, test/...), and at the end report.md, loss_curve.png,
test_predictions.jsonl and config.json as artefacts. A resumed run (same workdir) continues the
same tracker run: its id is kept in <workdir>/tracking.json. Runs of one sweep share an
experiment (`tracking.experiment`; launch/sweep.py sets it to the sweep's folder name and each
run's name to its point).
"""
import json
import os

from absl import logging

RECORD = "tracking.json"   # {"mlflow_run_id": ..., "wandb_run_id": ...} of this workdir
ARTIFACTS = ("report.md", "loss_curve.png", "test_predictions.jsonl", "config.json")


def flatten(tree, prefix: str = "") -> dict:
  """{"optim.lr": 0.001, ...}: nested dicts flattened, leaves as numbers / strings."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, name + "."))
    elif isinstance(value, (bool, int, float, str)) or value is None:
      out[name] = value
    else:
      out[name] = str(tuple(value) if isinstance(value, list) else value)
  return out


def _record(workdir: str) -> dict:
  path = os.path.join(workdir, RECORD)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {}


def _save_record(workdir: str, **ids):
  record = {**_record(workdir), **ids}
  with open(os.path.join(workdir, RECORD), "w") as f:
    json.dump(record, f, indent=2)


def _names(tracking_cfg, workdir: str) -> tuple[str, str]:
  return (tracking_cfg.experiment or "legal_lm",
          tracking_cfg.run_name or os.path.basename(os.path.abspath(workdir).rstrip("/")))


class MlflowTracker:
  """One MLflow run in an experiment of the store at `uri` (sqlite:///path.db, a server, or a
  file store when MLFLOW_ALLOW_FILE_STORE=true). Talks through MlflowClient, so no global active
  run is left behind."""

  def __init__(self, uri: str, tracking_cfg, workdir: str, params: dict):
    from mlflow.tracking import MlflowClient
    self.client = MlflowClient(tracking_uri=uri)
    experiment, run_name = _names(tracking_cfg, workdir)
    found = self.client.get_experiment_by_name(experiment)
    if found is None:
      location = None
      if uri.startswith("sqlite:///"):   # artefacts beside the database, not in the cwd
        location = os.path.join(os.path.dirname(os.path.abspath(uri[len("sqlite:///"):])),
                                "mlartifacts")
      experiment_id = self.client.create_experiment(experiment, artifact_location=location)
    else:
      experiment_id = found.experiment_id
    previous = _record(workdir).get("mlflow_run_id")
    run = None
    if previous:
      try:
        run = self.client.get_run(previous)
        self.client.update_run(previous, status="RUNNING")
        logging.info("mlflow: resuming run %s", previous)
      except Exception:   # a different store: start a new run there
        run = None
    if run is None:
      run = self.client.create_run(experiment_id, run_name=run_name,
                                   tags={"workdir": os.path.abspath(workdir)})
      _save_record(workdir, mlflow_run_id=run.info.run_id)
      from mlflow.entities import Param
      items = [Param(k, str(v)[:6000]) for k, v in params.items()]
      for start in range(0, len(items), 100):
        self.client.log_batch(run.info.run_id, params=items[start:start + 100])
    self.run_id = run.info.run_id
    logging.info("mlflow: run %s (%s) in experiment %r at %s", self.run_id, run_name,
                 experiment, uri)

  def log(self, step: int, scalars: dict):
    import time

    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                for k, v in scalars.items()])

  def artifacts(self, paths: list[str]):
    for path in paths:
      self.client.log_artifact(self.run_id, path)

  def end(self, status: str):
    self.client.set_terminated(self.run_id, status=status)


class WandbTracker:
  """One W&B run (offline unless WANDB_MODE says otherwise: `wandb sync <dir>` uploads it)
  under <workdir>/wandb/, in project `tracking.wandb_project`, grouped by `tracking.experiment`."""

  def __init__(self, project: str, tracking_cfg, workdir: str, params: dict):
    import wandb
    experiment, run_name = _names(tracking_cfg, workdir)
    previous = _record(workdir).get("wandb_run_id")
    self.run = wandb.init(project=project, group=experiment, name=run_name, config=params,
                          dir=workdir, mode=os.environ.get("WANDB_MODE", "offline"),
                          id=previous or None, resume="allow" if previous else None,
                          settings=wandb.Settings(console="off", silent=True))
    if not previous:
      _save_record(workdir, wandb_run_id=self.run.id)
    # Steps of a resumed run repeat: a metric of their own, not W&B's monotonic step.
    self.run.define_metric("trainer/step")
    self.run.define_metric("*", step_metric="trainer/step")

  def log(self, step: int, scalars: dict):
    self.run.log({**scalars, "trainer/step": step})

  def artifacts(self, paths: list[str]):
    for path in paths:
      self.run.save(path, base_path=os.path.dirname(path), policy="now")

  def end(self, status: str):
    self.run.finish(exit_code=0 if status == "FINISHED" else 1)


def make_trackers(config, workdir: str, extra_params: dict | None = None) -> list:
  """The trackers `config.tracking` asks for (none by default)."""
  cfg = config.tracking
  if not (cfg.mlflow_uri or cfg.wandb_project):
    return []
  params = {**flatten(json.loads(config.to_json_best_effort())), **(extra_params or {})}
  trackers = []
  if cfg.mlflow_uri:
    trackers.append(MlflowTracker(cfg.mlflow_uri, cfg, workdir, params))
  if cfg.wandb_project:
    trackers.append(WandbTracker(cfg.wandb_project, cfg, workdir, params))
  return trackers


def artifact_paths(workdir: str) -> list[str]:
  return [os.path.join(workdir, n) for n in ARTIFACTS if os.path.exists(os.path.join(workdir, n))]
