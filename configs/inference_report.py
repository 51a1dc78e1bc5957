"""What `python -m bench.inference_report` compares (see its docstring).

  python -m bench.inference_report --config=configs/inference_report.py:imdb \\
      --config.teacher=runs/imdb_ft --config.student=runs/imdb_student \\
      --config.summarizer=runs/summ_pe

test_file / summarizer_file are local JSONL files under $LEGAL_LM_DATA (default ../shared/data;
README "Datasets: where they come from"); point them at any JSONL with the same fields.
"""
import ml_collections

from configs import finetune_common


def get_config(arg: str = "imdb"):
  preset = finetune_common.check_preset("inference_report.py", arg, PRESETS)
  c = ml_collections.ConfigDict()
  c.teacher = ""                   # workdir of the fine-tuned classifier
  c.student = ""                   # workdir of its distilled student
  c.student_modes = ("f32", "bf16", "int8_weight_only", "w8a8")
  c.pruned = ()                    # workdirs of pruned runs (infer.prune), or fine-tuned from one
  c.pruned_modes = ("f32", "w8a8")  # a row per pruned run and mode: pruned, pruned + int8
  c.test_file = finetune_common.data_path("sentiment_imdb/test.jsonl.gz")
  c.text_field, c.label_field = "text", "label"
  c.num_examples = -1              # test examples for accuracy (-1: all; else a seeded sample)
  c.seed = 0
  c.seq_len = 256                  # tokens per request (the latency budget is set at 256)
  c.batch_size = 128               # for the accuracy pass
  c.latency_batches = (1, 32)
  c.warmup, c.iters = 3, 50
  c.bootstrap = 1000
  c.summarizer = ""                # workdir of a summarizer: adds the decoding table
  c.summarizer_file = finetune_common.data_path("legal_summ_plain_english/pairs.jsonl")
  c.decode_len, c.decode_examples = 64, 8
  c.out_dir = "runs/inference_report"
  PRESETS[preset](c)
  return c


def _tiny(c):
  c.test_file = c.summarizer_file = ""
  c.seq_len, c.batch_size, c.iters, c.warmup, c.bootstrap = 64, 16, 5, 1, 50
  c.latency_batches = (1, 4)
  c.decode_len, c.decode_examples = 8, 3


PRESETS = {"imdb": lambda c: None, "tiny": _tiny}
