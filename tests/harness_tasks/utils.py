"""Loads a task's JSONL from this folder (lm-eval `custom_dataset`), so the YAMLs work from any
working directory and nothing is fetched: {split: datasets.Dataset} in memory."""
import json
import os


def load(data_file: str, **_):
  import datasets
  with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), data_file),
            encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
