r"""Plot a run's metrics.jsonl: training and validation loss, and throughput, per step.

  python -m eval.plot_run --workdir=/tmp/lm          # writes /tmp/lm/loss_curve.png

The loop calls `plot()` at the end of every run, so the picture is always beside the metrics.
"""
import json
import os

from absl import app, flags

from model import errors


def read_metrics(path: str) -> dict:
  """{split: {step: row}}; a resumed run re-logs steps after its checkpoint: the last one wins."""
  out = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      out.setdefault(row["split"], {})[row["step"]] = row
  return out


def plot(workdir: str, out_name: str = "loss_curve.png") -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  metrics = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  train, val = metrics.get("train", {}), metrics.get("validation", {})
  fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
  if train:
    steps = sorted(train)
    ax_loss.plot(steps, [train[s]["loss"] for s in steps], label="train", lw=1)
    speed = [s for s in steps if "tokens_per_s" in train[s]][1:]   # first includes compile
    ax_speed.plot(speed, [train[s]["tokens_per_s"] for s in speed], lw=1)
  if val:
    steps = sorted(val)
    ax_loss.plot(steps, [val[s]["loss"] for s in steps], "o-", label="validation")
  ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
  ax_loss.legend()
  ax_loss.grid(alpha=0.3)
  ax_speed.set(xlabel="step", ylabel="tokens/s", title="training throughput")
  ax_speed.grid(alpha=0.3)
  fig.suptitle(os.path.basename(os.path.normpath(workdir)))
  fig.tight_layout()
  path = os.path.join(workdir, out_name)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv):
  del argv
  print(plot(flags.FLAGS.workdir))


if __name__ == "__main__":
  # Defined here, not at import: train.main imports this module and has its own --workdir.
  flags.DEFINE_string("workdir", None, "Run directory holding metrics.jsonl.")
  flags.mark_flag_as_required("workdir")
  app.run(errors.exit_on_user_error(main))
