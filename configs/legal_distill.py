"""Distil a summarizer (or any LM run) into a smaller student with token-level KD.

  python -m train.main --config=configs/legal_distill.py:plain_english \\
      --workdir=runs/summ_student --config.distill.teacher=runs/summ_pe

Every summary token is a soft target: loss = alpha * T^2 * KL(teacher || student) per scored
token + (1 - alpha) * the summary cross-entropy. The student takes the teacher's tokenizer.
Presets: `plain_english`, `in_abs` (the data of configs/legal_summ_finetune.py), `tiny`.
"""
from configs import finetune_common, legal_summ_finetune


def get_config(arg: str = "plain_english"):
  preset = finetune_common.check_preset("legal_distill.py", arg, PRESETS)
  config = legal_summ_finetune.get_config(preset)
  config.task = "distill"
  config.distill.update(task="summarize", alpha=0.7, temperature=1.0)
  if preset == "tiny":
    config.model.update(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16,
                        mlp_dim=64)
  else:
    config.model.update(num_layers=2, d_model=64, num_heads=2, num_kv_heads=2, head_dim=32,
                        mlp_dim=256)
  return config


PRESETS = {"plain_english": None, "in_abs": None, "tiny": None}
