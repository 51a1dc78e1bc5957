"""The shared config schema: every key a run can set, with its default and meaning.

Task configs (configs/<name>.py) start from `base_config()` and change what they need. The
schema is locked (`lock()`), so a misspelt key on the command line or in a preset fails at once
with the key's name instead of being silently ignored. The model's keys are declared in
configs/model_schema.py.

A run records its config with `schema_version`; `upgrade` brings a recorded config up to date
when the run is opened (infer/loading.py open_run), so code reads every key of today's schema.
"""
import copy

import ml_collections
from ml_collections import config_dict

from configs import model_schema

# The version of the key layout a run records. Adding a key (its default reproduces what runs
# without it did) needs no new version: `upgrade` fills it in. Renaming or removing a key, or
# changing what a recorded value means, does: bump it and map the older layout in `upgrade`.
SCHEMA_VERSION = 2


def model_section() -> ml_collections.ConfigDict:
  """config.model with every declared key at its default (configs/model_schema.py)."""
  m = ml_collections.ConfigDict({k.name: k.default for k in model_schema.MODEL_KEYS})
  m.attention = ml_collections.ConfigDict({k.name: k.default
                                           for k in model_schema.ATTENTION_KEYS})
  return m


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "pretrain"          # which train/tasks module supplies the loss
  c.preset = ""                # set by get_config; recorded with the run
  c.seed = 0                   # params init, dropout and data shuffling all derive from it
  c.schema_version = SCHEMA_VERSION   # the key layout; recorded runs are upgraded from theirs

  # --- data: where text comes from and how it becomes packed token rows ------------------
  c.data = ml_collections.ConfigDict()
  c.data.data_dir = "~/.cache/legal_lm"   # TFDS builds and the tokenizer cache live here
  c.data.use_licensedcode = True          # the embedded corpus (PyPI licensedcode-data)
  c.data.extra_dirs = ()                  # folders of .txt / .jsonl / .jsonl.gz documents
  # Pre-training from several sources by token share: ("name=source:weight", ...), source
  # "licensedcode" or a folder / file as in extra_dirs; replaces the two keys above when set
  # (train/data/mixture.py).
  c.data.mixture = ()
  c.data.text_field = "text"              # field holding the document in .jsonl files
  c.data.max_docs = -1                    # cap on documents (after a seeded shuffle); -1 = all
  c.data.validation_fraction = 0.02       # documents held out, chosen by a hash of their id
  c.data.vocab_size = 8192                # sentencepiece vocabulary (also the model's)
  c.data.tokenizer_sentences = 1_000_000  # sentences sampled to train the tokenizer
  c.data.seq_len = 512                    # packed row length
  c.data.batch_size = 32                  # global batch (all processes), rows per step
  c.data.num_workers = 0                  # grain worker processes (0 = in the main process)
  c.data.prefetch = 4                     # batches prepared ahead of the step
  c.data.bad_lines = "fail"               # malformed JSONL line: fail (name file:line) | skip
  # Fine-tuning tasks (classify, summarize) read examples from JSONL files instead of the corpus.
  c.data.train_file = ""                  # .jsonl / .jsonl.gz; validation is held out from it
  c.data.test_file = ""                   # scored by the final evaluators; never trained on
  c.data.test_fraction = 0.0              # no test_file: hold out this part of train_file (by id)
  c.data.label_field = "label"            # classify: integer class id in [0, model.num_classes)
  c.data.summary_field = "summary"        # summarize: the target text
  c.data.max_examples = -1                # train examples used (seeded choice); -1 = all
  c.data.max_validation_examples = -1     # validation examples used (seeded choice); -1 = all
  c.data.truncation = "head"              # head | head_tail (keep the start and the end)
  c.data.target_len = 128                 # summarize: summary tokens kept (rest of seq_len: doc)
  # summarize: with ratio > 0, train on gap-sentence pseudo-summaries of data.train_file's
  # unlabelled texts (PEGASUS-style; train/data/gap_sentences.py says how they are made)
  c.data.gap_sentences = ml_collections.ConfigDict(dict(
      ratio=0.0, passage_words=150, mask="<mask>", lowercase=False))

  # --- model: every key is declared in configs/model_schema.py (default, choices, help) ---
  c.model = model_section()

  # --- optimizer ------------------------------------------------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4
  c.optim.schedule = "cosine"         # cosine | linear (to min_lr) | constant, all after warmup
  c.optim.warmup_steps = 1000
  c.optim.min_lr_ratio = 0.1          # cosine decays to lr * min_lr_ratio at the last step
  c.optim.weight_decay = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.clip_norm = 1.0             # global-norm clipping; 0 disables
  c.optim.grad_accum_steps = 1        # micro-batches per optimizer step
  c.optim.z_loss = 1e-4               # weight of log(Z)^2 regulariser; 0 disables
  # pretrain: > 0 runs the LM head + cross-entropy fused over chunks of this many rows (batch x
  # position), never holding [B, T, vocab] logits; 0 = plain (logits, then the loss)
  c.optim.loss_chunk = 0

  # --- device mesh: axis sizes, -1 takes the remaining devices ---------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  # --- loop -----------------------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 10_000
  c.train.num_epochs = 0.0            # > 0: num_steps from the train split, validation each epoch
  c.train.init_from = ""              # workdir or checkpoint dir of a pre-trained run ("" = scratch)
  c.train.early_stopping = 0          # stop after this many validations without improvement; 0 off
  # the best state (fine-tuning): "loss" (validation loss) or "<evaluator>/<metric>" of
  # config.eval.evaluators at each validation, e.g. "rouge/rougeL" or "classification/macro_f1"
  c.train.select_by = "loss"
  c.train.nonfinite = "stop"          # non-finite loss: stop (clear error) | skip (drop the update)
  # CPU only: the train step's dots through auto (onednn for bf16 compute on a CPU with native
  # bf16, else ynn) | ynn (YNNPACK; 1.2x faster f32 step on a 2-core AVX2 CPU,
  # docs/results/step_time.md) | xnn | onednn
  # | xla (XLA's own Eigen dots); see train/step.py
  c.train.xla_cpu_dot_library = "auto"
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.eval_batches = 16
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  # LoRA (train/lora.py): rank > 0 trains low-rank adapters on the projections `targets` (a
  # regex over module paths like block_0/attn/query) of the frozen train.init_from model, plus
  # the classifier head; the update is (alpha / rank) * dropout(x) A B.
  c.train.lora = ml_collections.ConfigDict()
  c.train.lora.rank = 0
  c.train.lora.alpha = 16.0
  c.train.lora.dropout = 0.0
  c.train.lora.targets = r"block_\d+/(attn/(query|key|value|out)|mlp/(wi|wg|wo))"
  c.train.peak_flops = 0.0            # per-device peak FLOP/s for MFU; 0 = guess from device

  # --- distillation (task "distill"): a frozen teacher run teaches this config's model ------
  c.distill = ml_collections.ConfigDict()
  # Workdir of the teacher run (its best state if it has one); several separated by commas (one
  # architecture and tokenizer) teach as an ensemble: the mean of their tempered probabilities.
  c.distill.teacher = ""
  c.distill.task = "classify"         # the student's own task: classify | summarize | pretrain
  c.distill.alpha = 0.5               # weight of the soft (teacher) loss; 1 - alpha: labels
  c.distill.temperature = 2.0         # softens both distributions; the KL is scaled by T^2
  c.distill.hidden_weight = 0.0       # > 0: also match token-similarity matrices of hidden states
  # "teacher_layers": start the student from the teacher's embedding, head and evenly spaced
  # blocks (DistilBERT's recipe; needs the teacher's width); "none": random initialisation.
  c.distill.init_student = "none"
  # A classifier's offline teacher, mixed into the networks' (train/data/soft_targets.py):
  # a JSONL file of {"id", "probs"} per train and validation example; "" = none. The teacher
  # distribution is (1 - offline_weight) * the networks' mean + offline_weight * its tempered
  # probabilities.
  c.distill.offline_teacher = ""
  c.distill.offline_weight = 0.5
  # A classifier student's transfer set: unlabelled texts (a dataset as data.train_file names
  # one, field data.text_field) that join the train rows and are taught by the teachers alone
  # (an offline teacher's JSONL must cover them too); an epoch then covers them as well.
  c.distill.transfer_file = ""

  # --- evaluators run on data.test_file at the end (and on validation during training) --------
  c.eval = ml_collections.ConfigDict()
  c.eval.evaluators = ()              # e.g. ("classification",), ("rouge", "factual")
  c.eval.num_examples = -1            # test examples scored; -1 = all
  c.eval.batch_size = 32
  c.eval.decode_len = 128             # summarize: decoding length cap (tokens)
  # classify: 0 = a long text is truncated as in training; S > 0 = it is also read whole in
  # row-long windows S ids apart and its rows' log-probabilities averaged (infer/classifier_rows.py)
  c.eval.window_stride = 0
  # How summaries are decoded at validation and test (infer/decode_controls.py Controls); every default
  # is off, and all off is greedy decoding. The controls act on the summary's own tokens, never
  # the document's (copying a source phrase stays allowed).
  c.eval.decode = ml_collections.ConfigDict()
  c.eval.decode.beam = 0                   # > 1: beam search with this many beams; 0: greedy
  c.eval.decode.length_penalty = 1.0       # beam: log-prob sum / length ** this (1: the mean)
  c.eval.decode.no_repeat_ngram_size = 0   # n > 0: no n-gram twice in a summary
  c.eval.decode.repetition_penalty = 1.0   # > 1: generated tokens' logits / p (CTRL; 1: off)
  c.eval.decode.min_new = 0                # eos banned before this many summary tokens
  # Per-document length cap ceil(r * document tokens), clipped to [max(min_new, 1), decode_len]:
  # 0 = off, a number r, or "train": r = the median summary / document token ratio of the
  # train split (any type, hence the reference).
  c.eval.decode.length_ratio = config_dict.FieldReference(0.0, field_type=object)
  # samples > 0: MBR decoding (infer/rerank.py): that many summaries sampled at temperature /
  # top_p, plus the greedy (or beam) one; the candidate agreeing most with the rest is kept.
  c.eval.decode.samples = 0
  c.eval.decode.temperature = 1.0
  c.eval.decode.top_p = 1.0
  # > 0: a candidate's support in its document (unigram + bigram precision) times this weight
  # is added to its agreement with the others (infer/rerank.py mbr_index).
  c.eval.decode.source_weight = 0.0
  c.eval.bootstrap = 1000             # resamples for 95% confidence intervals
  c.eval.length_buckets = (256, 1024, 4096)   # slice edges in words of the input text
  c.eval.slice_fields = ()            # record fields to slice by as well (e.g. "source")
  c.eval.rubric_examples = 0          # > 0: export a human-evaluation sheet of that many examples
  # lm-evaluation-harness tasks scored after the test evaluation (infer/harness.py; needs
  # requirements-harness.txt), e.g. ("hellaswag",) or local tasks from eval.harness_include_path.
  c.eval.harness_tasks = ()
  c.eval.harness_include_path = ""    # folder of extra task YAMLs ("" = the harness's own)
  c.eval.harness_limit = -1           # examples per harness task; -1 = all

  # --- optional experiment trackers beside TensorBoard + metrics.jsonl (train/tracking.py;
  # requirements-tracking.txt). Off unless a store / project is set. ---------------------------
  c.tracking = ml_collections.ConfigDict()
  c.tracking.mlflow_uri = ""          # e.g. sqlite:///runs/mlflow.db (or an http:// server)
  c.tracking.wandb_project = ""       # W&B project; offline (<workdir>/wandb) unless WANDB_MODE
  c.tracking.experiment = ""          # MLflow experiment / W&B group ("" = legal_lm); sweeps set it
  c.tracking.run_name = ""            # "" = the workdir's folder name; sweeps: the point's name
  return c


def _merge(defaults: dict, recorded: dict) -> dict:
  """`defaults` with `recorded`'s values over them, section by section; keys only `recorded`
  has (e.g. distill.teacher_model, added when a run is resolved) are kept."""
  out = dict(defaults)
  for key, value in recorded.items():
    if isinstance(value, dict) and isinstance(defaults.get(key), dict):
      out[key] = _merge(defaults[key], value)
    else:
      out[key] = value
  return out


# Keys that left the schema, by the version that dropped them (options whose only measurement
# was negative; docs/results/imdb.md keeps it): a run recorded before still carries them.
_REMOVED = {2: ("data.train_window_stride", "train.profile", "distill.offline_folds")}


def upgrade(recorded: dict) -> dict:
  """A recorded run config (a plain dict, as a checkpoint or config.json holds it) brought up
  to today's schema: every key of base_config() at today's default, the recorded values over
  them, schema_version set to SCHEMA_VERSION. The one place older runs are made readable."""
  version = recorded.get("schema_version", 0)
  if version > SCHEMA_VERSION:
    raise ValueError(f"config.schema_version={version}: the run was written by a newer version "
                     f"of this code (it reads up to {SCHEMA_VERSION})")
  recorded = copy.deepcopy(recorded)
  for dropped_in, keys in _REMOVED.items():
    for dotted in keys if version < dropped_in else ():
      section, key = dotted.split(".")
      recorded.get(section, {}).pop(key, None)
  out = _merge(base_config().to_dict(), recorded)
  teacher = out["distill"].get("teacher_model")
  if isinstance(teacher, dict):   # a distillation records its teacher's config.model
    out["distill"]["teacher_model"] = _merge(model_section().to_dict(), teacher)
  out["schema_version"] = SCHEMA_VERSION
  return out
