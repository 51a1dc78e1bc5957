"""Distil a fine-tuned sentiment classifier (the teacher) into a smaller, faster student, or
several (an ensemble) into one.

  python -m train.main --config=configs/sentiment_distill.py:imdb --workdir=runs/imdb_student \\
      --config.distill.teacher=runs/imdb_ft
  python -m train.main --config=configs/sentiment_distill.py:imdb_ensemble \\
      --workdir=runs/ens4_student --config.train.init_from=runs/wide4000/checkpoints/4000 \\
      --config.distill.teacher=runs/ft_a,runs/ft_b,runs/ft_c,runs/ft_d

The student adopts the teacher's tokenizer and vocabulary; its own architecture is below (half
the layers, started from the teacher's: `distill.init_student`).
loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy on the labels, where
several teachers' distribution is the mean of their tempered probabilities (mixed, with
`distill.offline_teacher`, with precomputed probabilities from a JSONL file);
`distill.hidden_weight` adds token-relation matching; `distill.transfer_file` adds unlabelled
texts (e.g. IMDB's unlabelled reviews) that the teachers alone teach.
Presets: `imdb_ensemble` (a student of the teachers' size, from the in-domain LM the teachers
were fine-tuned from, taught by all of them), `imdb` (a 10k subset of the data of
configs/sentiment_finetune.py:imdb, from $LEGAL_LM_DATA), `imdb_tfds` (the same recipe on the TFDS dataset imdb_reviews: see
configs/sentiment_finetune.py:imdb_tfds), `tiny` (tests).
"""
from configs import finetune_common, sentiment_finetune


def get_config(arg: str = "imdb"):
  preset = finetune_common.check_preset("sentiment_distill.py", arg, PRESETS)
  config = sentiment_finetune.get_config(preset if preset in ("tiny", "imdb_tfds") else "imdb")
  config.preset = preset
  config.task = "distill"
  config.distill.update(task="classify", alpha=0.7, temperature=2.0)
  PRESETS[preset](config)
  return config


def _imdb(config):
  # The teacher's width and half its depth, started from its embedding, head and blocks 0 and 3
  # (DistilBERT's recipe): a student from random weights (2 layers, d_model 64) trained for one
  # epoch stayed 2.3 points below the teacher on validation.
  config.model.update(num_layers=2, d_model=128, num_heads=4, num_kv_heads=4, head_dim=32,
                      mlp_dim=512, dropout_rate=0.0)   # the teacher's soft labels regularise
  config.distill.init_student = "teacher_layers"
  config.data.max_examples = 10_000    # one epoch of a seeded 10k subset: 313 steps, minutes
  config.train.num_epochs = 1.0


def _imdb_ensemble(config):
  # One student of the teachers' own size that learns from an ensemble of fine-tunes
  # (docs/results/imdb.md): --config.distill.teacher=runs/a,runs/b,... and
  # --config.train.init_from=<the in-domain LM checkpoint they were fine-tuned from>, whose
  # architecture the student adopts. The teachers' recipe otherwise
  # (sentiment_finetune.py:imdb_self_curve: one epoch of 256-token head+tail rows over all
  # train reviews, their dropout, windows at stride 254 for long test reviews), so what differs
  # from one of them is only what it learns from.
  config.distill.init_student = "none"
  config.train.num_epochs = 1.0
  config.eval.window_stride = 254


def _tiny(config):
  config.model.update(num_layers=2, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16,
                      mlp_dim=64)


PRESETS = {"imdb": _imdb, "imdb_tfds": _imdb, "imdb_ensemble": _imdb_ensemble, "tiny": _tiny}
