"""Fine-tune a legal summarizer as a prefix-LM: `[bos] document [eos] summary [eos]`, the
document attended bidirectionally, loss on the summary tokens only.

  python -m train.main --config=configs/legal_summ_finetune.py:plain_english \\
      --workdir=runs/summ_pe --config.train.init_from=runs/imdb_lm

Presets:
- `plain_english`: ToS/contract sections -> plain-English summaries (446 pairs; a fixed 15%
  held out by id hash is the test split; 10% of the rest is validation).
- `in_abs`: Indian Supreme Court judgments -> headnotes (IN-Abs train/test).
- `in_abs_4k`: the same at 4,096 tokens (3,072 of judgment, 1,024 of headnote), to start from
  `legal_pretrain.py:in_abs_lm` (legal text + IN-Abs train judgments at 4k).
- `gap_sentences`: a PEGASUS-style start for `plain_english`: gap-sentence pseudo-summaries of
  CUAD contract passages (train/data/gap_sentences.py); then `plain_english` from it.
- `tiny`: tests (set the files).
Both read local JSONL copies under $LEGAL_LM_DATA (default ../shared/data; no TFDS builder
exists for either: README "Datasets: where they come from"); any JSONL or CSV/TSV file with
`text` and `summary` columns (or data.text_field / data.summary_field) works.
Long documents: judgments run to tens of thousands of tokens, so the document is truncated to
`data.seq_len - data.target_len` tokens (head_tail: its first quarter and its end, where the
holding is) and attention is `blocked` (memory O(N x block), exact). Raising seq_len towards
the whole judgment is a config change (`--config.data.seq_len=8192`), not a code change.
The report has ROUGE-1/2/L/Lsum with 95% bootstrap CIs (overall and per document-length
bucket), factual-consistency proxies, and lead-3 / lead-N baselines by the same evaluator.
Summaries are decoded greedily with no repeated 4-gram (`eval.decode.no_repeat_ngram_size`);
`eval.decode` also holds beam search, a repetition penalty, a minimum length and a per-document
length (`--config.eval.decode.length_ratio=train`: the train split's median ratio).
"""
from configs import finetune_common


def get_config(arg: str = "plain_english"):
  preset = finetune_common.check_preset("legal_summ_finetune.py", arg, PRESETS)
  config = finetune_common.finetune_config("summarize")
  config.preset = preset
  config.data.summary_field = "summary"
  config.data.truncation = "head_tail"
  config.model.attention.update(kind="blocked", block_size=128)
  config.eval.evaluators = ("rouge", "factual")
  config.eval.batch_size = 16
  config.eval.rubric_examples = 20
  # Summaries tend to repeat themselves: no 4-gram twice in a summary. It bans only
  # the summary's own n-grams, so copying a phrase of the document stays allowed.
  config.eval.decode.no_repeat_ngram_size = 4
  PRESETS[preset](config)
  return config


def _plain_english(config):
  # One file: the held-out test part is chosen by id hash (see data.test_fraction below).
  config.data.train_file = finetune_common.data_path("legal_summ_plain_english/pairs.jsonl")
  config.data.seq_len = 512
  config.data.target_len = 96
  config.data.batch_size = 16
  config.data.validation_fraction = 0.1
  config.data.test_fraction = 0.15
  config.eval.decode_len = 96
  config.eval.length_buckets = (100, 200, 400)
  config.train.num_epochs = 8.0


def _in_abs(config):
  config.data.train_file = finetune_common.data_path("legal_summ_in_abs/in_abs_train.jsonl.gz")
  config.data.test_file = finetune_common.data_path("legal_summ_in_abs/in_abs_test.jsonl.gz")
  config.data.seq_len = 1024
  config.data.target_len = 256
  config.data.batch_size = 8
  config.eval.decode_len = 256
  config.eval.length_buckets = (2000, 5000, 10000)
  config.train.num_epochs = 1.0


def _tiny(config):
  config.data.train_file = ""
  config.data.vocab_size = 512
  config.data.tokenizer_sentences = 20_000
  config.data.seq_len = 64
  config.data.target_len = 16
  config.data.batch_size = 8
  config.data.validation_fraction = 0.2
  config.data.test_fraction = 0.2
  config.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
                      mlp_dim=128, dtype="float32")
  config.model.attention.block_size = 16
  config.optim.update(lr=3e-3, warmup_steps=5)
  config.train.update(num_epochs=0.0, num_steps=30, eval_every=10, log_every=5,
                      checkpoint_every=10)
  config.eval.update(decode_len=12, batch_size=8, bootstrap=100, rubric_examples=4,
                     length_buckets=(20, 40))


def _in_abs_4k(config):
  # IN-Abs at long context, step 2, from legal_pretrain.py:in_abs_lm (init_from):
  # 4,096-token rows, the judgment's head and tail in 3,072 tokens and a headnote of up to
  # 1,024 (headnotes average 932 words; 256 tokens held a quarter of one), `blocked` attention.
  _in_abs(config)
  config.data.seq_len = 4096
  config.data.target_len = 1024
  config.data.batch_size = 2
  config.eval.decode_len = 1024
  config.eval.batch_size = 4
  # A validation pass over all 351 held-out judgments at 4k takes 11 min on a 2-core CPU
  # (docs/results/summarization.md); 96 keep the loss comparison between steps (the same 96
  # every time) at a quarter of that.
  config.data.max_validation_examples = 96


def _gap_sentences(config):
  # A PEGASUS-style start for `plain_english`: the same row shapes, trained on
  # gap-sentence pseudo-summaries of CUAD contract passages (train/data/gap_sentences.py), so
  # that the summarizer learns to read its document; then `plain_english` with
  # train.init_from=<this run>. Contracts give ~27k passages of <= 150 words, lowercased like
  # the plain-English pairs; no test split (the final evaluation is the plain-English run's).
  _plain_english(config)
  config.data.train_file = finetune_common.data_path(
      "legal_pretrain_corpus/cuad_contracts.jsonl.gz")
  config.data.gap_sentences.update(ratio=0.2, passage_words=150, lowercase=True)
  config.data.validation_fraction = 0.02
  config.data.test_fraction = 0.0
  config.data.max_validation_examples = 128
  config.train.update(num_epochs=0.0, num_steps=600, eval_every=100, checkpoint_every=100)


PRESETS = {"plain_english": _plain_english, "in_abs": _in_abs, "in_abs_4k": _in_abs_4k,
           "gap_sentences": _gap_sentences, "tiny": _tiny}
