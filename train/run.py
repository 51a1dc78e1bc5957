"""One training run, in sections: resolve the config -> workdir -> inputs -> build -> state
(resumed, or fresh plus what it starts from) -> the loop -> the final evaluation. Pre-training,
fine-tuning and distillation differ only in their inputs (train/inputs.py), their task
(train/build.py) and, for fine-tuning, the evaluation around the loop (train/final_eval.py).
"""
import dataclasses
import json
import os
import shutil
import time

import jax
from absl import logging

from infer import loading
from model import checkpoint as checkpoint_lib
from model.config import ModelConfig
from model.progress import format_eta
from model.task_kind import task_kind
from train import build, final_eval, finetune
from train import inputs as inputs_lib
from train import loop as loop_lib
from train import metrics as metrics_lib
from train.config_check import ConfigError


def prepare_workdir(workdir: str, config, model_cfg: ModelConfig) -> bool:
  """Creates the run directory (returns whether it is new); fails early if it is not writable
  or has no room for the checkpoints."""
  created = not os.path.exists(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} is not writable: {e.strerror}") from None
  # Room for keep_checkpoints checkpoints plus the one being written, at 12 bytes per parameter
  # (f32 params and two Adam moments; train_flops_per_token at seq_len 0 is 6 x the matmul
  # parameters, nearly all of them) and 64 MiB of logs, less what this run's checkpoints hold.
  params = metrics_lib.train_flops_per_token(model_cfg, 0) / 6
  held = sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in
             os.walk(os.path.join(workdir, "checkpoints")) for name in names)
  copies = config.train.keep_checkpoints + 1
  needed = int(copies * 12 * params + (64 << 20) - held)
  disk = os.statvfs(workdir)
  free = disk.f_bavail * disk.f_frsize
  if free < needed:
    raise ConfigError(
        f"--workdir={workdir} has {free:,} bytes free but the run needs about {needed:,} "
        f"({copies} checkpoints of {12 * params / 2**30:.2f} GiB and logs); free space, lower "
        "config.train.keep_checkpoints or use another --workdir")
  return created


def _origin(config, sources: build.Sources) -> str:
  """What the report says a fine-tune started from: the pre-trained run and the step it read
  (a workdir means its newest checkpoint, which moves while that run goes on)."""
  if sources.pretrained is None:
    return "scratch"
  return f"{config.train.init_from} (step {sources.pretrained.step})"


def _start_state(parts: build.Parts, sources: build.Sources, checkpointer, latest, train_iter):
  """The state the loop starts from: the checkpoint it resumes, else a fresh one with the
  pre-trained backbone, the teachers and the student's teacher blocks restored into it."""
  if latest is not None:
    state, _ = checkpointer.restore(latest, parts.abstract_target(), train_iter)
    logging.info("resumed from step %d", int(jax.device_get(state.step)))
    return state
  state = parts.init_state()
  if sources.pretrained is not None:
    state = finetune.load_backbone(sources.pretrained, state, parts.mesh,
                                   student=parts.distilling)
  if sources.teachers:
    state = finetune.add_teachers(state, sources.teachers, parts.task, parts.mesh)
    if parts.config.distill.init_student == "teacher_layers":
      state = finetune.init_student_from_teacher(state, parts.config.model.num_layers,
                                                 parts.task.teacher.cfg.num_layers)
  return state


def check_optional_packages(config):
  """The optional packages a config asks for are installed: a one-line error now, not after
  training (lm-eval for eval.harness_tasks, mlflow / wandb for tracking.*)."""
  import importlib.util
  wanted = [("eval.harness_tasks", "lm_eval", "requirements-harness.txt",
             config.eval.harness_tasks),
            ("tracking.mlflow_uri", "mlflow", "requirements-tracking.txt",
             config.tracking.mlflow_uri),
            ("tracking.wandb_project", "wandb", "requirements-tracking.txt",
             config.tracking.wandb_project)]
  for key, module, requirements, value in wanted:
    if value and importlib.util.find_spec(module) is None:
      raise ConfigError(f"config.{key}={value!r} needs the {module} package: "
                        f"pip install -r {requirements}")


@dataclasses.dataclass
class _Start:
  """What a run starts from: its checkpointer, the record of the run it resumes (None for a new
  one), its inputs, the built model and step, and the state the loop starts from."""
  checkpointer: checkpoint_lib.Checkpointer
  resumed_meta: dict | None
  inputs: inputs_lib.Inputs
  parts: build.Parts
  state: object


def _start(config, sources: build.Sources, workdir: str) -> _Start:
  """Workdir and checkpoints -> inputs, model, state. A failed start leaves no empty run (or
  folder) behind."""
  created = prepare_workdir(workdir, config, sources.model_cfg)
  checkpoints_dir = os.path.join(workdir, "checkpoints")
  had_checkpoints = os.path.exists(checkpoints_dir)
  started = False
  try:
    checkpointer = checkpoint_lib.Checkpointer(workdir, every=config.train.checkpoint_every,
                                               keep=config.train.keep_checkpoints)
    latest = checkpointer.latest_step()
    resumed_meta = checkpointer.restore_meta(latest) if latest is not None else None
    if latest is not None and latest >= config.train.num_steps:
      logging.warning("%s already finished (step %d of config.train.num_steps=%d): nothing to "
                      "train; re-running %s. Use a new --workdir (or raise num_steps) to "
                      "train again", workdir, latest, config.train.num_steps,
                      "the final evaluation" if build.is_finetuning(config) else "validation")
    inputs = inputs_lib.make(config, sources, resumed_meta)
    parts = build.build(config, model_cfg=sources.model_cfg)
    state = _start_state(parts, sources, checkpointer, latest, inputs.train_iter)
    started = True
  finally:
    if not started and jax.process_index() == 0:
      if created:
        shutil.rmtree(workdir, ignore_errors=True)
      elif (not had_checkpoints and os.path.isdir(checkpoints_dir)
            and not os.listdir(checkpoints_dir)):
        os.rmdir(checkpoints_dir)
  return _Start(checkpointer, resumed_meta, inputs, parts, state)


def _record(config, workdir: str, start: _Start) -> tuple[dict, int, float]:
  """(the metadata every checkpoint carries, parameter count, peak FLOP/s per device), logged;
  process 0 writes config.json, only now: a run that fails to start leaves an existing record
  untouched."""
  parts, tokenizer = start.parts, start.inputs.tokenizer
  n_params = parts.param_count()
  peak, peak_source = metrics_lib.peak_flops_per_device(config.train.peak_flops)
  logging.info("model: %.2fM params; mesh %s on %d devices (%d processes); peak %.3g FLOP/s "
               "per device from %s", n_params / 1e6, dict(parts.mesh.shape), parts.mesh.size,
               jax.process_count(), peak, peak_source)
  meta = {"config": json.loads(config.to_json_best_effort()),
          "tokenizer_path": tokenizer.path, "vocab_size": tokenizer.vocab_size,
          "dataset": start.inputs.source, "params": n_params}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  return meta, n_params, peak


def _writer(config, workdir: str, n_params: int) -> metrics_lib.MetricWriter:
  """metrics.jsonl and TensorBoard (process 0), plus the trackers configured."""
  trackers = []
  if jax.process_index() == 0 and (config.tracking.mlflow_uri or config.tracking.wandb_project):
    from train import tracking   # optional packages: imported only when configured
    trackers = tracking.make_trackers(config, workdir, {"params": n_params})
  return metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0, trackers=trackers)


def _final_evaluation(config, workdir, sources, start: _Start, evaluation, result: dict,
                      writer, n_params: int, t0: float):
  """The test evaluation of a finished run (`result["test"]`): a fine-tune's report, or a
  pre-trained model's harness tasks when configured."""
  pc = jax.process_count()
  finished = not result["preempted"] and (result["stopped_early"] or
                                          result["step"] >= config.train.num_steps)
  if evaluation is not None and finished:
    if pc > 1:
      logging.warning("the test evaluation runs single-process: rerun this command with one "
                      "process to write report.md")
    else:
      result["test"] = evaluation.final(result, writer, {
          "parameters": n_params, "init_from": _origin(config, sources),
          "final step": result["step"],
          "training seconds, all sessions": round(result["wall_s"], 1),
          "session seconds (train + eval)": round(time.perf_counter() - t0, 1)})
  if (evaluation is None and finished and config.eval.harness_tasks and pc == 1
      and not result["preempted"]):
    parts = start.parts
    result["test"] = final_eval.pretrain_report(
        config, workdir, loaded=loading.LoadedModel(
            config, task_kind(config), parts.model, None, start.inputs.tokenizer,
            result["step"], mesh=parts.mesh),
        params=parts.eval_params(result["state"].params), writer=writer,
        step=result["step"], facts={"parameters": n_params, "final step": result["step"]})


def _steps(folder: str) -> str:
  """" (steps 100, 200)" for the checkpoints `folder` holds, "" for none."""
  found = sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(
      folder) else []
  return f" (step{'s' * (len(found) > 1)} {', '.join(map(str, found))})" if found else ""


def folder_summary(workdir: str, shown: str | None = None) -> str:
  """One line naming the run folder (as `shown`, default `workdir`) and what it holds, e.g.
  `run folder runs/tiny: checkpoints/ (steps 100, 200), config.json, metrics.jsonl, tb/
  (TensorBoard), loss_curve.png, report.md`: only what exists, hidden files left out."""
  notes = {"checkpoints": lambda: _steps(os.path.join(workdir, "checkpoints")),
           "best": lambda: _steps(os.path.join(workdir, "best", "checkpoints")),
           "tb": lambda: " (TensorBoard)"}
  order = ["checkpoints", "best", "config.json", "metrics.jsonl", "tb", "loss_curve.png",
           "report.md"]
  names = sorted((n for n in os.listdir(workdir) if not n.startswith(".")),
                 key=lambda n: (order.index(n) if n in order else len(order), n))
  items = [name + ("/" if os.path.isdir(os.path.join(workdir, name)) else "")
           + notes.get(name, lambda: "")() for name in names]
  return f"run folder {shown or workdir}: {', '.join(items) or 'nothing'}"


def train(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (a new run, or the one there resumed) and, for a finished
  fine-tune, evaluates it on the test split; returns the loop's result (plus "test")."""
  # --- config: finished, validated, frozen ----------------------------------------------------
  config, sources = build.resolve(config)
  check_optional_packages(config)
  shown, workdir = workdir, loading.resolve_path(workdir)

  # --- workdir and checkpoints -> inputs, model, state ------------------------------------------
  start = _start(config, sources, workdir)
  parts, checkpointer = start.parts, start.checkpointer
  evaluation = (final_eval.FinetuneEvaluation(config, workdir, parts, start.inputs)
                if build.is_finetuning(config) else None)
  meta, n_params, peak = _record(config, workdir, start)

  # --- the loop ----------------------------------------------------------------------------------
  writer = _writer(config, workdir, n_params)
  t0 = time.perf_counter()
  status = "FAILED"
  try:
    result = loop_lib.run(loop_lib.LoopParts(
        parts=parts, state=start.state, train_iter=start.inputs.train_iter,
        make_eval_iter=start.inputs.make_eval_iter, checkpointer=checkpointer, writer=writer,
        meta=meta, flops_per_token=metrics_lib.train_flops_per_token(
            parts.model_cfg, config.data.seq_len),
        peak_flops_total=peak * parts.mesh.size,
        best_checkpointer=evaluation and evaluation.best_checkpointer,
        best=evaluation and evaluation.best,
        eval_hooks=evaluation.hooks(jax.process_count()) if evaluation else {},
        wall_s=(start.resumed_meta or {}).get("wall_s", 0.0)))
    logging.info("training time, all sessions of this run: %s (%.3f s, step %d)",
                 format_eta(result["wall_s"]), result["wall_s"], result["step"])
    # --- the final evaluation (fine-tuning) ------------------------------------------------------
    _final_evaluation(config, workdir, sources, start, evaluation, result, writer, n_params, t0)
    status = "KILLED" if result["preempted"] else "FINISHED"
  finally:
    writer.close()
    checkpointer.close()
    if evaluation is not None:
      evaluation.close()
    if status == "FAILED":
      writer.finish(status)
  if jax.process_index() == 0:
    from eval import plot_run
    logging.info("loss curve: %s", plot_run.plot(workdir))
  if writer.trackers:
    from train import tracking
    writer.finish(status, tracking.artifact_paths(workdir))
  if jax.process_index() == 0:
    logging.info("%s", folder_summary(workdir, shown))
  return result
