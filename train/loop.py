"""The one training loop every task runs on: step, metrics, validation, checkpoints, preemption.

Read top to bottom, in sections, like big_vision's: compile -> loop (step, drain, validate,
keep the best, checkpoint) -> finish.
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
  # Training time of the earlier starts of a resumed run (its checkpoint's meta["wall_s"]).
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


def _compile(p: LoopParts):
  """(train step, eval step, batch sharding): both steps compiled ahead of time with the real
  shardings."""
  parts = p.parts
  batch_sharding = sharding_lib.batch_sharding(parts.mesh)
  t0 = time.perf_counter()
  train_step = parts.compile_train_step()
  example = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
             for k, v in parts.dummy_batch().items()}
  eval_step = step_lib.compile_step(
      step_lib.make_eval_step(parts.task), parts.mesh, (parts.shardings.params, batch_sharding),
      sharding_lib.replicated(parts.mesh), (p.state.params, example))
  logging.info("compiled train and eval steps in %.1fs", time.perf_counter() - t0)
  return train_step, eval_step, batch_sharding


class _Loop:
  """The loop's running state (train state, step, the step in flight, the best validation) and
  its sections: take a step, drain a finished step's metrics, validate, keep the best state."""

  def __init__(self, p: LoopParts, eval_step, batch_sharding):
    self.p, self.cfg = p, p.parts.config
    self.num_steps = self.cfg.train.num_steps
    self.eval_step, self.batch_sharding = eval_step, batch_sharding
    self.state = p.state
    self.step = self.first_step = int(jax.device_get(self.state.step))
    tokens_per_step = self.cfg.data.batch_size * self.cfg.data.seq_len
    self.progress = metrics_lib.Progress(self.step, self.num_steps, tokens_per_step,
                                         p.flops_per_token * tokens_per_step,
                                         p.peak_flops_total, p.wall_s)
    self.pending = None      # (step, device metrics, source tokens) of the last dispatched step
    self.skips = 0           # consecutive non-finite steps (config.train.nonfinite=skip)
    self.last_eval = {}
    self.best = dict(p.best or {})
    self.stop_early = False

  def take_step(self, train_step):
    """Dispatches the next step, then drains the one before it (finished by now)."""
    t_input = time.perf_counter()
    host_batch = next(self.p.train_iter)
    self.progress.waited_for_input(time.perf_counter() - t_input)
    batch = to_global(host_batch, self.batch_sharding)
    # A mixture's tokens per source so far (this process's batches), logged with the step.
    sources = dict(getattr(self.p.train_iter, "source_tokens", None) or {})
    self.state, dev_metrics = train_step(self.state, batch)
    self.step += 1
    if self.pending is not None:
      self.drain()
    self.pending = (self.step, dev_metrics, sources)

  def drain(self):
    """Fetches the pending step's metrics, checks them and logs them."""
    done_step, dev_metrics, sources = self.pending
    self.pending = None
    m = jax.device_get(dev_metrics)
    self.skips = _check_finite(done_step, m, self.cfg.train.nonfinite == "skip", self.skips)
    if done_step % self.cfg.train.log_every == 0 or done_step == self.num_steps:
      prog = self.progress.update(done_step)
      self.p.writer.write(done_step, "train", {**m, **prog, **_source_metrics(sources)})
      metrics_lib.log_progress(done_step, self.num_steps, float(m["loss"]), prog)

  def validate(self) -> dict:
    """The validation loss and the evaluators' metrics at this step, written and logged."""
    p, step = self.p, self.step
    result = evaluate(self.eval_step, self.state.params, p.make_eval_iter(), self.batch_sharding)
    p.writer.write(step, "validation", result)
    logging.info("step %d validation: loss %.4f  perplexity %.2f  accuracy %.4f", step,
                 result["loss"], result["perplexity"], result["accuracy"])
    scores = {"loss": result["loss"]}
    for name, hook in p.eval_hooks.items():
      hooked = hook(self.state.params)
      p.writer.write(step, f"validation/{name}", hooked)
      scores.update({f"{name}/{key}": value for key, value in hooked.items()})
    if p.best_checkpointer is not None and step > 0:
      self.track_best(result["loss"], scores)
    self.last_eval = result
    return result

  def track_best(self, loss, scores):
    """Saves the state when validation improves by `train.select_by` (the loss, or e.g.
    "rouge/rougeL": an evaluator's metric); stops after `early_stopping` evaluations without
    improvement (counted from steps, so a resumed run counts the same)."""
    cfg, best, step = self.cfg, self.best, self.step
    select_by = cfg.train.select_by
    score = metrics_lib.selection_score(select_by, scores)
    if not best or score > best["score"]:
      best.update(step=step, loss=loss, select_by=select_by, value=scores[select_by],
                  score=score)
      self.p.best_checkpointer.save(step, self.state, None, {**self.p.meta, "best": dict(best)},
                                    force=True)
      logging.info("step %d: best validation %s so far (%.4f), saved to %s", step, select_by,
                   scores[select_by], self.p.best_checkpointer.directory)
    patience = cfg.train.early_stopping
    if patience and (step - best["step"]) // cfg.train.eval_every >= patience:
      logging.info("early stopping at step %d: no better validation %s than %.4f (step %d) "
                   "in %d evaluations", step, select_by, best["value"],
                   best["step"], patience)
      self.stop_early = True

  def train(self, train_step, preemption: _Preemption):
    """Steps to train.num_steps, validating and checkpointing on schedule; stops early at a
    plateau or on preemption, with a checkpoint."""
    p, cfg = self.p, self.cfg
    if (self.step == 0 or self.step >= self.num_steps) and p.make_eval_iter:
      # Step 0: the untrained baseline every later evaluation compares to; a finished run
      # started again: its final validation once more.
      self.validate()
    while self.step < self.num_steps:
      self.take_step(train_step)
      is_last = self.step == self.num_steps
      if p.make_eval_iter and (self.step % cfg.train.eval_every == 0 or is_last):
        self.validate()
        is_last = is_last or self.stop_early
      if p.checkpointer.should_save(self.step) or is_last or preemption.requested:
        self.drain()      # never checkpoint a state whose loss we have not seen to be finite
        p.checkpointer.save(self.step, self.state, p.train_iter,
                            {**p.meta, "wall_s": self.progress.wall_s()},
                            force=is_last or preemption.requested)
      if preemption.requested:
        logging.warning("preempted at step %d: checkpoint written, exiting", self.step)
        break
      if self.stop_early:
        break
    if self.pending is not None:
      self.drain()


def run(p: LoopParts) -> dict:
  """Compiles, trains from the state `p` holds to train.num_steps, and returns the outcome:
  step, state, last validation, best validation, whether preempted or stopped early, wall_s."""
  train_step, eval_step, batch_sharding = _compile(p)
  loop = _Loop(p, eval_step, batch_sharding)
  preemption = _Preemption()
  try:
    loop.train(train_step, preemption)
  finally:
    preemption.restore()
    p.checkpointer.wait()
    if p.best_checkpointer is not None:
      p.best_checkpointer.wait()
  return {"step": loop.step, "state": loop.state, "validation": loop.last_eval,
          "best": loop.best, "preempted": preemption.requested, "stopped_early": loop.stop_early,
          # A finished run started again trains nothing: its training time stays the one its
          # checkpoint recorded, not that plus this start's re-validation.
          "wall_s": loop.progress.wall_s() if loop.step > loop.first_step else p.wall_s}
