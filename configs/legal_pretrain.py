"""Pre-train a decoder-only legal language model from scratch.

  python -m train.main --config=configs/legal_pretrain.py:tiny --workdir=/tmp/lm
  python -m train.main --config=configs/legal_pretrain.py --workdir=gs://bucket/lm   # pod size

Presets (the text after ':'): `tiny` (minutes on 2 CPU cores), `small`, the default `base`
(a ~1.7B-parameter run meant for a TPU/GPU pod), `llama3_8b` (Llama-3-8B's shape, for the TPU
ahead-of-time table: --aot_only --aot_topology=v5p-128), and `imdb_lm` (2.1M parameters on legal text
plus IMDB train reviews: the starting point of the fine-tuning results, docs/results), `imdb_self` (the
same model pre-trained on IMDB's unlabelled + train reviews only, for sentiment), `in_abs_lm`
(the same model on 4,096-token rows of legal text + IN-Abs train judgments, blocked attention:
the start of the long-context IN-Abs summarizer), `imdb_self_wide` (`imdb_self` at twice the
width), `imdb_self_wide512` (four times the width, 2,000 steps), `base_32k`, `base_128k`,
`llama3_8b_32k`, `llama3_8b_128k` (those shapes on 32k / 128k-token rows of legal text + IN-Abs
judgments, blocked attention, the sequence split over `mesh.context`). Any key can be overridden on
the command line, e.g. `--config.optim.lr=1e-3 --config.model.attention.kind=full`.
"""
import ml_collections

from configs import common


def get_config(arg: str = "base") -> ml_collections.ConfigDict:
  preset = arg or "base"
  if preset not in PRESETS:
    raise ValueError(f"configs/legal_pretrain.py: unknown preset {preset!r}; "
                     f"expected one of {sorted(PRESETS)}")
  config = common.base_config()
  config.preset = preset
  PRESETS[preset](config)
  return config


def _tiny(config):
  # A few minutes on 2 CPU cores; validation loss drops well below its start.
  config.data.vocab_size = 2048
  config.data.seq_len = 128
  config.data.batch_size = 16
  config.data.max_docs = 3000
  config.data.tokenizer_sentences = 200_000
  config.model.update(num_layers=2, d_model=128, num_heads=4, num_kv_heads=2, head_dim=32,
                      mlp_dim=384)
  config.optim.update(lr=3e-3, warmup_steps=30)
  config.train.update(num_steps=300, log_every=10, eval_every=100, eval_batches=8,
                      checkpoint_every=100)


def _small(config):
  # A workstation-sized model (~25M params).
  config.data.vocab_size = 8192
  config.data.seq_len = 512
  config.data.batch_size = 32
  config.model.update(num_layers=6, d_model=512, num_heads=8, num_kv_heads=8, head_dim=64,
                      mlp_dim=2048)
  config.optim.update(lr=1e-3, warmup_steps=500)
  config.train.update(num_steps=20_000, eval_every=1000, checkpoint_every=1000)


def _base(config):
  # Pod-sized (~1.7B params): 24 layers, d_model 2048, seq 2048, fsdp over every device.
  config.data.vocab_size = 32_768
  config.data.seq_len = 2048
  config.data.batch_size = 256
  config.data.num_workers = 8
  # scan_layers: one traced block for all 24, so compiling (--aot_only, --aot_topology) costs
  # what one layer costs instead of growing with depth.
  config.model.update(num_layers=24, d_model=2048, num_heads=16, num_kv_heads=16, head_dim=128,
                      mlp_dim=8192, dtype="bfloat16", remat="dots", scan_layers=True)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  config.optim.update(lr=3e-4, warmup_steps=2000)
  config.train.update(num_steps=100_000, eval_every=2000, checkpoint_every=1000)


def _imdb_lm(config):
  # The LM the sentiment and summarization fine-tuning runs start from (docs/results/): legal
  # text (licensedcode + CUAD contracts) and IMDB's *train* reviews, never its test reviews.
  from configs.finetune_common import data_path
  config.data.extra_dirs = (data_path("sentiment_imdb/train.jsonl.gz"),
                            data_path("legal_pretrain_corpus/cuad_contracts.jsonl.gz"))
  config.data.vocab_size = 8192
  config.data.seq_len = 256
  config.data.batch_size = 32
  config.data.tokenizer_sentences = 300_000
  config.data.validation_fraction = 0.01
  config.model.update(num_layers=4, d_model=128, num_heads=4, num_kv_heads=4, head_dim=32,
                      mlp_dim=512, dtype="bfloat16")
  config.optim.update(lr=2e-3, warmup_steps=50)
  config.train.update(num_steps=500, log_every=25, eval_every=250, eval_batches=8,
                      checkpoint_every=100)


def _llama3_8b(config):
  # Llama-3-8B's shape (~8.0B params): 32 layers, d_model 4096, 32 heads / 8 kv heads (GQA) of
  # 128, SwiGLU 14336, vocab 128256, untied, rope theta 500k; seq 4096 x batch 256 = 1M tokens
  # per step, bf16 compute, fsdp over every device. docs/results/tpu_compile.md compiles it for
  # v5p-128 / v5e-256 (--aot_topology) with remat none / dots / full and fsdp vs fsdp x tensor.
  _base(config)
  config.data.vocab_size = 128_256
  config.data.seq_len = 4096
  config.data.batch_size = 256
  config.model.update(num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                      mlp_dim=14_336, mlp_activation="swiglu", rope_theta=500_000.0,
                      tie_embeddings=False, dtype="bfloat16", remat="full")


def _imdb_self(config):
  # In-domain self-pre-training for sentiment (ULMFiT's target-domain LM): IMDB's 49,730
  # unlabelled reviews plus its 25k *train* reviews (never the test reviews), ~25M tokens, no
  # legal text. The imdb_lm architecture on 512-token rows (a review's long tail fits); 6,000
  # steps of 8,192 tokens = ~2 epochs. Every checkpoint is kept: fine-tuning from each gives
  # the accuracy-vs-pre-training-tokens curve (configs/sentiment_finetune.py:imdb_self).
  # A long CPU run: start it in the background; re-running the command resumes it.
  from configs.finetune_common import data_path
  _imdb_lm(config)
  config.data.use_licensedcode = False
  config.data.extra_dirs = (data_path("sentiment_imdb/unsup.jsonl.gz"),
                            data_path("sentiment_imdb/train.jsonl.gz"))
  config.data.seq_len = 512
  config.data.batch_size = 16
  config.optim.update(lr=2e-3, warmup_steps=200)
  config.train.update(num_steps=6000, log_every=50, eval_every=500, eval_batches=16,
                      checkpoint_every=500, keep_checkpoints=12)


def _imdb_self_wide(config):
  # imdb_self at twice the width (d_model 256, 8 heads, MLP 1024; 6.29M params against 2.10M),
  # everything else equal - data, tokenizer size, lr, and the 4,500-step schedule (36.9M tokens)
  # the imdb_self run used - so its learning-curve points compare with that run's at equal
  # tokens and equal schedule position: the width ablation for the sentiment target
  # (docs/results/imdb.md, docs/results/pretraining.md). Hours on a CPU; it resumes.
  _imdb_self(config)
  config.model.update(d_model=256, num_heads=8, num_kv_heads=8, head_dim=32, mlp_dim=1024)
  config.train.num_steps = 4500


def _imdb_self_wide512(config):
  # The next width (docs/results/pretraining.md): d_model 512, 16 heads of 32, MLP 2048
  # (20.98M params). 2,000 steps (16.4M tokens: a measured point of both smaller widths' curves,
  # within 0.3 points of their end) on a schedule that decays fully by then, so compare it with
  # their final points. Step: 3.9 s on a 2-core Intel AMX CPU (~2.2 h), 12-13 s on a 2-core
  # AVX2 AMD EPYC (~7 h; docs/results/pretraining.md): resume it across several starts there.
  _imdb_self_wide(config)
  config.model.update(d_model=512, num_heads=16, num_kv_heads=16, head_dim=32, mlp_dim=2048)
  config.train.num_steps = 2000


def _in_abs_lm(config):
  # IN-Abs at long context, step 1: the imdb_lm architecture on 4,096-token rows of
  # legal text only: licensedcode + CUAD contracts + the 7,028 IN-Abs *train* judgments (their
  # `text` field: never a headnote, never a test judgment). `blocked` attention keeps memory
  # O(N x block) (docs/results/long_context.md). Step 2 is
  # configs/legal_summ_finetune.py:in_abs_4k with --config.train.init_from=<this run>.
  from configs.finetune_common import data_path
  _imdb_lm(config)
  config.data.extra_dirs = (data_path("legal_pretrain_corpus/cuad_contracts.jsonl.gz"),
                            data_path("legal_summ_in_abs/in_abs_train.jsonl.gz"))
  config.data.seq_len = 4096
  config.data.batch_size = 2
  config.model.attention.kind = "blocked"
  config.optim.update(lr=2e-3, warmup_steps=100)
  config.train.update(num_steps=2000, log_every=25, eval_every=250, eval_batches=8,
                      checkpoint_every=250, keep_checkpoints=8)


PRESETS = {"tiny": _tiny, "small": _small, "base": _base, "imdb_lm": _imdb_lm,
           "llama3_8b": _llama3_8b, "imdb_self": _imdb_self, "imdb_self_wide": _imdb_self_wide,
           "imdb_self_wide512": _imdb_self_wide512,
           "in_abs_lm": _in_abs_lm}


def _mixture(config):
  # Pre-training from a weighted mixture (data.mixture; train/data/mixture.py), weights = token
  # shares: the licensedcode legal corpus, CUAD contracts, IN-Abs *train* judgments (never its
  # test documents) and IMDB's unlabelled reviews. The tiny model and schedule; each source
  # capped at data.max_docs documents.
  from configs.finetune_common import data_path
  _tiny(config)
  config.data.mixture = (
      "legal=licensedcode:0.4",
      "cuad=" + data_path("legal_pretrain_corpus/cuad_contracts.jsonl.gz") + ":0.2",
      "in_abs=" + data_path("legal_summ_in_abs/in_abs_train.jsonl.gz") + ":0.2",
      "imdb_unsup=" + data_path("sentiment_imdb/unsup.jsonl.gz") + ":0.2")


PRESETS["mixture"] = _mixture


def _long_context(config, seq_len: int, batch_size: int, context: int):
  # Pre-training rows of 32k / 128k tokens for a TPU slice: the legal corpus (licensedcode + CUAD
  # contracts) plus the long IN-Abs *train* judgments, packed. `blocked` attention keeps memory
  # O(N x block); remat "full" saves only each layer's input, since at this length activations,
  # not weights, set the per-chip memory; the context axis splits every row over `context` chips
  # (model/attention/context_parallel.py) and fsdp takes the rest of the slice.
  # docs/results/tpu_compile.md ("Long context") compiles them for v5p-128: all four fit
  # (base 7.1 / 10.7 GiB per chip at 32k / 128k, the 8B 31.9 / 40.4); base_32k with
  # --config.mesh.context=1 (a whole row per chip) needs 11.4.
  from configs.finetune_common import data_path
  config.data.extra_dirs = (data_path("legal_pretrain_corpus/cuad_contracts.jsonl.gz"),
                            data_path("legal_summ_in_abs/in_abs_train.jsonl.gz"))
  config.data.seq_len = seq_len
  config.data.batch_size = batch_size
  config.model.attention.kind = "blocked"
  config.model.remat = "full"
  config.mesh.update(data=1, fsdp=-1, context=context, tensor=1)
  # Micro-batches of one row per fsdp group of a v5p-128 (fsdp 8 = 64 chips / context 8): the
  # compiled step's temporaries grow with the rows each chip holds (base_32k: 7.1 GiB per chip
  # at one row, 9.1 at four; docs/results/tpu_compile.md).
  config.optim.grad_accum_steps = batch_size // 8


def _base_long(seq_len, batch_size, context):
  def preset(config):
    _base(config)
    _long_context(config, seq_len, batch_size, context)
    # RoPE's base at 10k repeats its slowest rotation every ~63k positions; 1M keeps positions
    # 128k apart distinguishable (the base long-context models such as Code Llama use).
    config.model.rope_theta = 1_000_000.0
  return preset


def _llama3_8b_long(seq_len, batch_size, context):
  def preset(config):
    _llama3_8b(config)    # rope theta 500k, as Llama 3 trained it
    _long_context(config, seq_len, batch_size, context)
  return preset


# 2M tokens a step: 64 rows of 32k, 16 of 128k. The rows must also divide over the slice's
# hosts (16 on a v5p-128, 64 on a v6e-256: 128k there needs 64 rows, 8M tokens).
PRESETS.update(base_32k=_base_long(32_768, 64, 8), base_128k=_base_long(131_072, 16, 8),
               llama3_8b_32k=_llama3_8b_long(32_768, 64, 8),
               llama3_8b_128k=_llama3_8b_long(131_072, 16, 8))
