"""Tasks: what a batch means and how the loss is computed. The loop core is shared.

A task provides `dummy_batch(batch, seq_len)` (shapes for init/compile) and
`loss(params, batch, rng, train) -> (loss_sum, metric_sums)`, where metric_sums holds
`weight` (the number of scored tokens/examples) so the step can average exactly across
micro-batches and devices.
"""
from train.tasks import classify, distill, pretrain, summarize

# "distill" is built by train/build.py around the student's task; the others take
# (model, z_loss=...).
TASKS = {"pretrain": pretrain.PretrainTask, "classify": classify.ClassifyTask,
         "summarize": summarize.SummarizeTask, "distill": distill.DistillTask}


def get_task(name: str):
  if name not in TASKS:
    raise ValueError(f"config.task={name!r} is not a known task; expected one of {sorted(TASKS)}")
  return TASKS[name]
