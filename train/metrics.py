"""Run observability: TensorBoard events + metrics.jsonl, progress line with ETA, FLOPs and MFU."""
import json
import os
import re
import sys
import time

import jax
from absl import logging

from model.progress import format_eta
from train import config_check

# Dense bf16 peak FLOP/s per device, used for MFU when config.train.peak_flops is 0.
_PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "tpu v4": 275e12,
               "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6": 918e12}


# Evaluator metrics where a larger number is better (the rest, losses and error counts, are
# better smaller): the direction of a slice's gap and of train.select_by.
HIGHER_IS_BETTER = ("accuracy", "macro_f1", "rouge1", "rouge2", "rougeL", "rougeLsum",
                    "entity_precision", "number_precision", "date_precision")


def selection_score(select_by: str, scores: dict) -> float:
  """The validation number the best state is chosen by, signed so that larger is better:
  `scores` holds "loss" and every evaluator's "<evaluator>/<metric>" of one validation."""
  if select_by not in scores:
    raise config_check.ConfigError(f"config.train.select_by={select_by!r} is not a validation metric of this "
                   f"run; it has: {', '.join(sorted(scores))}")
  value = float(scores[select_by])
  return value if select_by.split("/")[-1] in HIGHER_IS_BETTER else -value


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the number came from)."""
  if configured > 0:
    return configured, "config"
  kind = jax.devices()[0].device_kind.lower()
  for name, flops in _PEAK_FLOPS.items():
    if name in kind:
      return flops, f"table ({kind})"
  # CPU: AVX-512 = 2 FMA units x 16 f32 lanes x 2 FLOP per core-cycle at ~2.5 GHz. A rough bound,
  # spread over the (possibly fake) devices that share the host's cores.
  cores = os.cpu_count() or 1
  return cores * 2.5e9 * 64 / jax.local_device_count(), "estimate (cpu)"


def block_params(model_cfg) -> int:
  """The transformer blocks' projection weights (attention and MLP), all layers."""
  c = model_cfg
  attn = c.d_model * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp = c.d_model * c.mlp_dim * (3 if c.mlp_activation == "swiglu" else 2)
  return c.num_layers * (attn + mlp)


def train_flops_per_token(model_cfg, seq_len: int) -> float:
  """Model FLOPs per trained token: 6 x matmul params + causal-agnostic attention (PaLM, App. B)."""
  c = model_cfg
  matmul_params = block_params(c) + c.d_model * c.vocab_size
  return 6.0 * matmul_params + 12.0 * c.num_layers * seq_len * c.num_heads * c.head_dim


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX tries `import torch` at import time only to accept torch tensors; where torch is
  installed (the test and conversion environments) that costs ~2.7 s of every run's start on a
  2-core CPU (docs/results/tests.md). We log Python floats only, so torch is hidden for that
  one import (unless this process already imported it) and visible again right after.
  """
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None   # makes `import torch` raise ImportError, which tensorboardX expects
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def tag_name(name: str) -> str:
  """`name` as TensorBoard and MLflow accept it: each character outside [\\w./-] becomes "_"
  (what TensorBoard itself does, with a warning per scalar; MLflow rejects such keys). The JSONL
  keeps the name as given ("test/baseline/tf-idf_+_logistic_regression")."""
  return re.sub(r"[^\w./-]", "_", name)


class MetricWriter:
  """Writes scalars to TensorBoard and one JSON object per (step, prefix) to metrics.jsonl."""

  def __init__(self, workdir: str, enabled: bool = True, trackers=()):
    """`trackers`: optional MLflow / W&B trackers (train/tracking.py) that get every scalar
    too, and the run's artefacts at `finish`."""
    self.enabled = enabled
    self.trackers = list(trackers) if enabled else []
    if not enabled:
      return
    self.tb = _summary_writer_class()(os.path.join(workdir, "tb"))
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write(self, step: int, prefix: str, scalars: dict):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    tagged = {tag_name(f"{prefix}/{k}"): v for k, v in scalars.items()}
    for tag, v in tagged.items():
      self.tb.add_scalar(tag, v, step)
    self.jsonl.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")
    self.jsonl.flush()
    self._each_tracker("log", step, tagged)

  def _each_tracker(self, method: str, *args):
    """A tracker that fails (a store gone away) is dropped with a warning; training goes on."""
    for tracker in list(self.trackers):
      try:
        getattr(tracker, method)(*args)
      except Exception as e:  # noqa: BLE001 - any tracker error
        logging.warning("%s failed (%s: %s); it is dropped for the rest of the run",
                        type(tracker).__name__, type(e).__name__, e)
        self.trackers.remove(tracker)

  def finish(self, status: str = "FINISHED", artifacts=()):
    """Ends the trackers' runs (after close: the report and plots exist by then), uploading
    `artifacts` (paths) first."""
    if artifacts:
      self._each_tracker("artifacts", list(artifacts))
    self._each_tracker("end", status)
    self.trackers = []

  def close(self):
    if self.enabled:
      self.tb.close()
      self.jsonl.close()


class Progress:
  """Steps/s, tokens/s, MFU, ETA and the share of time spent waiting for input, over the last
  logging interval.

  Tokens are input positions (batch x seq_len, padding included, as MFU counts them), so
  pre-training and classification report the same kind of number."""

  def __init__(self, start_step: int, num_steps: int, tokens_per_step: int,
               flops_per_step: float, peak_flops: float, wall_s_before: float = 0.0):
    """wall_s_before: the training time of the earlier starts of a resumed run (its
    checkpoint records it), so `wall_s` is the run's whole time, not this process's."""
    self.num_steps = num_steps
    self.tokens_per_step = tokens_per_step
    self.flops_per_step = flops_per_step
    self.peak = peak_flops
    self.last_step, self.last_time = start_step, time.perf_counter()
    self.started, self.wall_s_before = self.last_time, wall_s_before
    self.first = True
    self.input_wait_s = 0.0   # time blocked on the input pipeline since the last update

  def waited_for_input(self, seconds: float):
    """Counts time the loop spent blocked on the next batch: near 0 means the pipeline keeps
    ahead of the step; a large share means the step waits for data (add workers/prefetch)."""
    self.input_wait_s += seconds

  def wall_s(self) -> float:
    return self.wall_s_before + time.perf_counter() - self.started

  def update(self, step: int) -> dict:
    now = time.perf_counter()
    steps, dt = step - self.last_step, max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    out = {"step_time_s": dt / max(steps, 1), "tokens_per_s": self.tokens_per_step * steps / dt,
           "mfu": self.flops_per_step * steps / dt / self.peak, "wall_s": self.wall_s(),
           "input_wait_frac": min(self.input_wait_s / dt, 1.0)}
    self.input_wait_s = 0.0
    # The first interval includes compilation: no ETA from it (and none written).
    if not self.first:
      out["eta_s"] = out["step_time_s"] * (self.num_steps - step)
    self.first = False
    return out


def log_progress(step: int, num_steps: int, loss: float, prog: dict):
  logging.info("step %d/%d  loss %.4f  %.0f tok/s  %.1f ms/step  MFU %.1f%%  input wait %.0f%%  "
               "ETA %s", step, num_steps, loss, prog["tokens_per_s"], 1e3 * prog["step_time_s"],
               100 * prog["mfu"], 100 * prog["input_wait_frac"], format_eta(prog.get("eta_s")))
