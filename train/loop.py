"""The one training loop every task runs on: step, metrics, validation, checkpoints, preemption.

Read top to bottom, in sections, like big_vision's: compile -> resume -> loop -> finish.
Host syncs are kept off the critical path: metrics of step k are fetched after step k+1 has been
dispatched, so the device is never idle waiting for Python.
"""
import dataclasses
import math
import signal
import time
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np
from absl import logging

from model import errors
from model import sharding as sharding_lib
from train import metrics as metrics_lib
from train import step as step_lib


class NonFiniteLossError(errors.UserError, RuntimeError):
  """The loss diverged past what the step skips; the message says where and what to change."""
  exit_code = 3


@dataclasses.dataclass
class LoopParts:
  """What a run hands the loop (train/run.py)."""
  parts: Any                      # train/build.py Parts: config, task, optimizer, mesh, shardings
  state: Any                      # restored or freshly initialised, already sharded
  train_iter: Iterator            # yields process-local numpy batches; has get_state/set_state
  make_eval_iter: Optional[Callable[[], Iterator]]
  checkpointer: Any
  writer: metrics_lib.MetricWriter
  meta: dict                      # saved with every checkpoint (config, tokenizer path, ...)
  flops_per_token: float
  peak_flops_total: float         # all devices, for MFU
  # Fine-tuning: keep the state with the best validation (train.select_by; stop early on a
  # plateau).
  best_checkpointer: Any = None
  best: Optional[dict] = None     # {"step", "loss", ...} of the best validation so far (resume)
  # Evaluators run at every validation: name -> fn(params) -> scalar metrics.
  eval_hooks: dict = dataclasses.field(default_factory=dict)
  # Training time of the earlier sessions of a resumed run (its checkpoint's meta["wall_s"]).
  wall_s: float = 0.0


class _Preemption:
  """SIGTERM sets a flag; the loop saves at the next step boundary and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d received: saving a checkpoint at the next step, then exiting",
                    signum)
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def to_global(batch: dict, sharding) -> dict:
  """Process-local numpy rows -> one global jax.Array per key, sharded over data x fsdp."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def evaluate(eval_step, params, batches, sharding) -> dict:
  totals = None
  for batch in batches:
    sums = eval_step(params, to_global(batch, sharding))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  totals = jax.device_get(totals)
  weight = max(float(totals["weight"]), 1.0)
  loss = float(totals["loss"]) / weight
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
          "accuracy": float(totals["accuracy"]) / weight, "tokens": weight}


# Under config.train.nonfinite="skip", this many skipped steps in a row still stop the run:
# the data or the model is broken, not one unlucky batch.
MAX_CONSECUTIVE_SKIPS = 10


def _check_finite(step: int, m: dict, skip: bool, consecutive: int) -> int:
  """Returns the count of consecutive skipped steps; raises when the run must stop."""
  if np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]):
    return 0
  if skip and consecutive + 1 < MAX_CONSECUTIVE_SKIPS:
    logging.warning("step %d: non-finite loss (loss=%s, grad_norm=%s); update skipped "
                    "(config.train.nonfinite=skip)", step, m["loss"], m["grad_norm"])
    return consecutive + 1
  why = f"{MAX_CONSECUTIVE_SKIPS} steps in a row" if skip else f"step {step}"
  raise NonFiniteLossError(
      f"non-finite loss at {why} (loss={m['loss']}, grad_norm={m['grad_norm']}); "
      "stopping without saving this state. The last good checkpoint is kept; lower "
      "config.optim.lr, enable clipping (config.optim.clip_norm) or check the data")


def _source_metrics(tokens: dict) -> dict:
  """tokens/<source> (this process's tokens from each mixture source so far) and
  token_share/<source>; empty without a mixture."""
  total = sum(tokens.values())
  return {**{f"tokens/{name}": n for name, n in tokens.items()},
          **{f"token_share/{name}": n / total for name, n in tokens.items() if total}}


def run(p: LoopParts) -> dict:
  cfg, parts = p.parts.config, p.parts
  num_steps = cfg.train.num_steps
  batch_sharding = sharding_lib.batch_sharding(parts.mesh)
  metric_sharding = sharding_lib.replicated(parts.mesh)

  # --- compile (ahead of time, with the real shardings) ------------------------------------
  t0 = time.perf_counter()
  train_step = parts.compile_train_step()
  example = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
             for k, v in parts.dummy_batch().items()}
  eval_step = step_lib.compile_step(
      step_lib.make_eval_step(parts.task), parts.mesh, (parts.shardings.params, batch_sharding),
      metric_sharding, (p.state.params, example))
  logging.info("compiled train and eval steps in %.1fs", time.perf_counter() - t0)

  # --- loop ----------------------------------------------------------------------------------
  state = p.state
  step = first_step = int(jax.device_get(state.step))
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  progress = metrics_lib.Progress(step, num_steps, tokens_per_step,
                                  p.flops_per_token * tokens_per_step, p.peak_flops_total,
                                  p.wall_s)
  preemption = _Preemption()
  pending = None           # (step, device metrics) of the last dispatched step
  skips = 0                # consecutive non-finite steps (config.train.nonfinite=skip)
  last_eval = {}
  best = dict(p.best or {})
  stop_early = False

  def drain(pending):
    """Fetches the previous step's metrics (it has finished by now) and logs them."""
    nonlocal skips
    done_step, dev_metrics, sources = pending
    m = jax.device_get(dev_metrics)
    skips = _check_finite(done_step, m, cfg.train.nonfinite == "skip", skips)
    if done_step % cfg.train.log_every == 0 or done_step == num_steps:
      prog = progress.update(done_step)
      p.writer.write(done_step, "train", {**m, **prog, **_source_metrics(sources)})
      metrics_lib.log_progress(done_step, num_steps, float(m["loss"]), prog)

  def run_eval(step):
    result = evaluate(eval_step, state.params, p.make_eval_iter(), batch_sharding)
    p.writer.write(step, "validation", result)
    logging.info("step %d validation: loss %.4f  perplexity %.2f  accuracy %.4f", step,
                 result["loss"], result["perplexity"], result["accuracy"])
    scores = {"loss": result["loss"]}
    for name, hook in p.eval_hooks.items():
      hooked = hook(state.params)
      p.writer.write(step, f"validation/{name}", hooked)
      scores.update({f"{name}/{key}": value for key, value in hooked.items()})
    if p.best_checkpointer is not None and step > 0:
      track_best(step, result["loss"], scores)
    return result

  def track_best(step, loss, scores):
    """Saves the state when validation improves by `train.select_by` (the loss, or e.g.
    "rouge/rougeL": an evaluator's metric); stops after `early_stopping` evaluations without
    improvement (counted from steps, so a resumed run counts the same)."""
    nonlocal stop_early
    select_by = cfg.train.select_by
    score = metrics_lib.selection_score(select_by, scores)
    if not best or score > best["score"]:
      best.update(step=step, loss=loss, select_by=select_by, value=scores[select_by],
                  score=score)
      p.best_checkpointer.save(step, state, None, {**p.meta, "best": dict(best)}, force=True)
      logging.info("step %d: best validation %s so far (%.4f), saved to %s", step, select_by,
                   scores[select_by], p.best_checkpointer.directory)
    patience = cfg.train.early_stopping
    if patience and (step - best["step"]) // cfg.train.eval_every >= patience:
      logging.info("early stopping at step %d: no better validation %s than %.4f (step %d) "
                   "in %d evaluations", step, select_by, best["value"],
                   best["step"], patience)
      stop_early = True

  try:
    if (step == 0 or step >= num_steps) and p.make_eval_iter:
      # Step 0: the untrained baseline every later evaluation compares to; a finished run
      # started again: its final validation once more.
      last_eval = run_eval(step)
    while step < num_steps:
      t_input = time.perf_counter()
      host_batch = next(p.train_iter)
      progress.waited_for_input(time.perf_counter() - t_input)
      batch = to_global(host_batch, batch_sharding)
      # A mixture's tokens per source so far (this process's batches), logged with the step.
      sources = dict(getattr(p.train_iter, "source_tokens", None) or {})
      state, dev_metrics = train_step(state, batch)
      step += 1
      if pending is not None:
        drain(pending)
      pending = (step, dev_metrics, sources)

      is_last = step == num_steps
      if p.make_eval_iter and (step % cfg.train.eval_every == 0 or is_last):
        last_eval = run_eval(step)
        is_last = is_last or stop_early
      if p.checkpointer.should_save(step) or is_last or preemption.requested:
        drain(pending)      # never checkpoint a state whose loss we have not seen to be finite
        pending = None
        p.checkpointer.save(step, state, p.train_iter, {**p.meta, "wall_s": progress.wall_s()},
                            force=is_last or preemption.requested)
      if preemption.requested:
        logging.warning("preempted at step %d: checkpoint written, exiting", step)
        break
      if stop_early:
        break
    if pending is not None:
      drain(pending)
  finally:
    preemption.restore()
    p.checkpointer.wait()
    if p.best_checkpointer is not None:
      p.best_checkpointer.wait()
  return {"step": step, "state": state, "validation": last_eval, "best": best,
          "preempted": preemption.requested, "stopped_early": stop_early,
          # A finished run started again trains nothing: its training time stays the one its
          # checkpoint recorded, not that plus this session's re-validation.
          "wall_s": progress.wall_s() if step > first_step else p.wall_s}
