"""What a run's model does, read from its config: the one definition every layer uses."""


def task_kind(config) -> str:
  """classify | summarize | pretrain: what a run's (student) model does, from its config (a
  ConfigDict or the dict a checkpoint records); a distillation run's model is its student."""
  return config["distill"]["task"] if config["task"] == "distill" else config["task"]
