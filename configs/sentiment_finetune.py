"""Fine-tune a sentiment classifier (IMDB by default) from a pre-trained LM, or from scratch.

  # from the pre-trained LM (its architecture and tokenizer are adopted):
  python -m train.main --config=configs/sentiment_finetune.py:imdb --workdir=runs/imdb_ft \\
      --config.train.init_from=runs/imdb_lm
  # the same model from scratch (no init_from: a tokenizer is trained on the reviews):
  python -m train.main --config=configs/sentiment_finetune.py:imdb --workdir=runs/imdb_scratch

Presets: `imdb` (25k train reviews, 5% held out for validation; the full 25k test set),
`imdb10k` (a fixed 10k-example subset of the train split), `imdb_tfds` (`imdb` read from the
TFDS dataset imdb_reviews, prepared once in data.data_dir on a machine with internet:
`python -m train.data.sources tfds:imdb_reviews`), `imdb_self` (512-token rows, from the
in-domain LM `legal_pretrain.py:imdb_self`), `imdb_self_curve` (one point of its learning curve:
a cheaper fine-tune, from one kept pre-training step), `tiny` (tests; set the files).
`imdb` / `imdb10k` read $LEGAL_LM_DATA/sentiment_imdb/{train,test}.jsonl.gz (default
../shared/data; README "Datasets: where they come from"); any preset reads TFDS instead with
`--config.data.train_file=tfds:imdb_reviews:train --config.data.test_file=tfds:imdb_reviews:test`.
Any JSONL or CSV/TSV file with a text and an integer label works: set data.train_file /
data.test_file and, if named differently, data.text_field / data.label_field.
The run ends with report.md: accuracy, F1, confusion matrix, calibration, per-slice results
and a TF-IDF + logistic-regression baseline on the same test split.
"""
from configs import finetune_common


def get_config(arg: str = "imdb"):
  preset = finetune_common.check_preset("sentiment_finetune.py", arg, PRESETS)
  config = finetune_common.finetune_config("classify")
  config.preset = preset
  config.data.train_file = finetune_common.data_path("sentiment_imdb/train.jsonl.gz")
  config.data.test_file = finetune_common.data_path("sentiment_imdb/test.jsonl.gz")
  config.data.seq_len = 256
  config.data.batch_size = 32
  config.data.truncation = "head_tail"      # a review's verdict is often in its last lines
  config.model.num_classes = 2
  config.eval.evaluators = ("classification",)
  config.eval.batch_size = 128
  config.eval.length_buckets = (128, 256, 512)    # review length in words
  PRESETS[preset](config)
  return config


def _imdb(config):
  del config


def _imdb10k(config):
  config.data.max_examples = 10_000
  config.train.num_epochs = 4.0


def _imdb_tfds(config):
  # The same reviews and official split as `imdb`, from TFDS (text/label features, same names).
  # The held-out validation ids differ (TFDS has no review ids), so results are comparable, not
  # identical, to the `imdb` rows of docs/results/imdb.md.
  config.data.train_file = "tfds:imdb_reviews:train"
  config.data.test_file = "tfds:imdb_reviews:test"


def _imdb_self(config):
  # Fine-tuning from the in-domain LM (configs/legal_pretrain.py:imdb_self, pass it with
  # --config.train.init_from=runs/imdb_self or one of its checkpoints/<step> folders for the
  # learning curve): 512-token head+tail rows, so most reviews fit whole and the rest keep
  # their opening and their verdict. Chosen on the 5% validation split (docs/results/imdb.md): 512
  # against 256 tokens, mean against last-token pooling, and two epochs against one and three
  # (validation loss 0.264 against 0.271 and 0.284, the best of three epochs' states). lr and
  # dropout stay the fine-tuning defaults, chosen on validation from the narrow LM's step 500:
  # lr 1e-3 against 3e-4 and 3e-3 (loss 0.325 against 0.357 and 0.357), dropout 0 against 0.1
  # (level). Long reviews: eval.window_stride, chosen after training (docs/results/imdb.md).
  config.data.seq_len = 512
  config.data.batch_size = 16
  config.train.num_epochs = 2.0


def _imdb_self_curve(config):
  # One point of the accuracy-vs-pre-training-tokens curve (eval/learning_curve.py): the same
  # fine-tune for every kept step of legal_pretrain.py:imdb_self, pass one with
  # --config.train.init_from=runs/imdb_self/checkpoints/<step>. One epoch of 256-token
  # head+tail rows (742 steps, minutes on a CPU) instead of imdb_self's two at 512: a
  # curve is several fine-tunes, and what it compares is the checkpoints, not the fine-tune.
  config.train.num_epochs = 1.0


def _tiny(config):
  config.data.train_file = config.data.test_file = ""
  config.data.vocab_size = 512
  config.data.tokenizer_sentences = 20_000
  config.data.seq_len = 64
  config.data.batch_size = 8
  config.data.validation_fraction = 0.2
  config.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
                      mlp_dim=128, dtype="float32")
  config.optim.update(lr=3e-3, warmup_steps=5)
  config.train.update(num_epochs=0.0, num_steps=30, eval_every=10, log_every=5,
                      checkpoint_every=10, eval_batches=4)
  config.eval.batch_size = 16
  config.eval.bootstrap = 100


PRESETS = {"imdb": _imdb, "imdb10k": _imdb10k, "imdb_tfds": _imdb_tfds, "imdb_self": _imdb_self,
           "imdb_self_curve": _imdb_self_curve, "tiny": _tiny}
