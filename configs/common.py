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
  c.data = _data()
  c.model = model_section()   # every key declared in configs/model_schema.py
  c.optim = _optim()
  c.mesh = _mesh()
  c.train = _train()
  c.distill = _distill()
  c.eval = _eval()
  c.tracking = _tracking()
  return c


def _data() -> ml_collections.ConfigDict:
  """config.data: where text comes from and how it becomes packed token rows."""
  d = ml_collections.ConfigDict()
  d.data_dir = "~/.cache/legal_lm"   # TFDS builds and the tokenizer cache live here
  d.use_licensedcode = True          # the embedded corpus (PyPI licensedcode-data)
  d.extra_dirs = ()                  # folders of .txt / .jsonl / .jsonl.gz documents
  # Pre-training from several sources by token share: ("name=source:weight", ...), source
  # "licensedcode" or a folder / file as in extra_dirs; replaces the two keys above when set
  # (train/data/mixture.py).
  d.mixture = ()
  d.text_field = "text"              # field holding the document in .jsonl files
  d.max_docs = -1                    # cap on documents (after a seeded shuffle); -1 = all
  d.validation_fraction = 0.02       # documents held out, chosen by a hash of their id
  d.vocab_size = 8192                # sentencepiece vocabulary (also the model's)
  d.tokenizer_sentences = 1_000_000  # sentences sampled to train the tokenizer
  d.seq_len = 512                    # packed row length
  d.batch_size = 32                  # global batch (all processes), rows per step
  d.num_workers = 0                  # grain worker processes (0 = in the main process)
  d.prefetch = 4                     # batches prepared ahead of the step
  d.bad_lines = "fail"               # malformed JSONL line: fail (name file:line) | skip
  # Fine-tuning tasks (classify, summarize) read examples from JSONL files instead of the corpus.
  d.train_file = ""                  # .jsonl / .jsonl.gz; validation is held out from it
  d.test_file = ""                   # scored by the final evaluators; never trained on
  d.test_fraction = 0.0              # no test_file: hold out this part of train_file (by id)
  d.label_field = "label"            # classify: integer class id in [0, model.num_classes)
  d.summary_field = "summary"        # summarize: the target text
  d.max_examples = -1                # train examples used (seeded choice); -1 = all
  d.max_validation_examples = -1     # validation examples used (seeded choice); -1 = all
  d.truncation = "head"              # head | head_tail (keep the start and the end)
  d.target_len = 128                 # summarize: summary tokens kept (rest of seq_len: doc)
  # summarize: with ratio > 0, train on gap-sentence pseudo-summaries of data.train_file's
  # unlabelled texts (PEGASUS-style; train/data/gap_sentences.py says how they are made)
  d.gap_sentences = ml_collections.ConfigDict(dict(
      ratio=0.0, passage_words=150, mask="<mask>", lowercase=False))
  return d


def _optim() -> ml_collections.ConfigDict:
  """config.optim: AdamW, the learning-rate schedule and the loss's regularisers."""
  o = ml_collections.ConfigDict()
  o.lr = 3e-4
  o.schedule = "cosine"         # cosine | linear (to min_lr) | constant, all after warmup
  o.warmup_steps = 1000
  o.min_lr_ratio = 0.1          # cosine decays to lr * min_lr_ratio at the last step
  o.weight_decay = 0.1
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.clip_norm = 1.0             # global-norm clipping; 0 disables
  o.grad_accum_steps = 1        # micro-batches per optimizer step
  o.z_loss = 1e-4               # weight of log(Z)^2 regulariser; 0 disables
  # pretrain: > 0 runs the LM head + cross-entropy fused over chunks of this many rows (batch x
  # position), never holding [B, T, vocab] logits; 0 = plain (logits, then the loss); -1 = auto:
  # fused on one device whose float32 logits would pass 1 GiB (train/tasks/pretrain.py)
  o.loss_chunk = -1
  return o


def _mesh() -> ml_collections.ConfigDict:
  """config.mesh: the device mesh's axis sizes; -1 takes the remaining devices."""
  m = ml_collections.ConfigDict()
  m.data = -1
  m.fsdp = 1
  m.context = 1     # > 1: the sequence is split over this many devices (context parallelism)
  m.tensor = 1
  # Multi-slice: how many slices each axis spans over the data center network (DCN); the sizes
  # above are then per slice, and an axis's full size is the product (train/config_check.py).
  m.dcn_data = 1
  m.dcn_fsdp = 1
  return m


def _train() -> ml_collections.ConfigDict:
  """config.train: the loop (steps, validation, checkpoints, best state, LoRA)."""
  t = ml_collections.ConfigDict()
  t.num_steps = 10_000
  t.num_epochs = 0.0            # > 0: num_steps from the train split, validation each epoch
  t.init_from = ""              # workdir or checkpoint dir of a pre-trained run ("" = scratch)
  t.early_stopping = 0          # stop after this many validations without improvement; 0 off
  # the best state (fine-tuning): "loss" (validation loss) or "<evaluator>/<metric>" of
  # config.eval.evaluators at each validation, e.g. "rouge/rougeL" or "classification/macro_f1"
  t.select_by = "loss"
  t.nonfinite = "stop"          # non-finite loss: stop (clear error) | skip (drop the update)
  # CPU only: the train step's dots through auto (onednn for bf16 compute on a CPU with native
  # bf16, else ynn) | ynn (YNNPACK; 1.2x faster f32 step on a 2-core AVX2 CPU,
  # docs/results/step_time.md) | xnn | onednn
  # | xla (XLA's own Eigen dots); see train/step.py
  t.xla_cpu_dot_library = "auto"
  t.log_every = 50
  t.eval_every = 500
  t.eval_batches = 16
  t.checkpoint_every = 500
  t.keep_checkpoints = 3
  # LoRA (train/lora.py): rank > 0 trains low-rank adapters on the projections `targets` (a
  # regex over module paths like block_0/attn/query) of the frozen train.init_from model, plus
  # the classifier head; the update is (alpha / rank) * dropout(x) A B.
  t.lora = ml_collections.ConfigDict()
  t.lora.rank = 0
  t.lora.alpha = 16.0
  t.lora.dropout = 0.0
  t.lora.targets = r"block_\d+/(attn/(query|key|value|out)|mlp/(wi|wg|wo))"
  t.peak_flops = 0.0            # per-device peak FLOP/s for MFU; 0 = guess from device
  return t


def _distill() -> ml_collections.ConfigDict:
  """config.distill: distillation (task "distill"): a frozen teacher run teaches this
  config's model."""
  d = ml_collections.ConfigDict()
  # Workdir of the teacher run (its best state if it has one); several separated by commas (one
  # architecture and tokenizer) teach as an ensemble: the mean of their tempered probabilities.
  d.teacher = ""
  d.task = "classify"         # the student's own task: classify | summarize | pretrain
  d.alpha = 0.5               # weight of the soft (teacher) loss; 1 - alpha: labels
  d.temperature = 2.0         # softens both distributions; the KL is scaled by T^2
  d.hidden_weight = 0.0       # > 0: also match token-similarity matrices of hidden states
  # "teacher_layers": start the student from the teacher's embedding, head and evenly spaced
  # blocks (DistilBERT's recipe; needs the teacher's width); "none": random initialisation.
  d.init_student = "none"
  # A classifier's offline teacher, mixed into the networks' (train/data/soft_targets.py):
  # a JSONL file of {"id", "probs"} per train and validation example; "" = none. The teacher
  # distribution is (1 - offline_weight) * the networks' mean + offline_weight * its tempered
  # probabilities.
  d.offline_teacher = ""
  d.offline_weight = 0.5
  # A classifier student's transfer set: unlabelled texts (a dataset as data.train_file names
  # one, field data.text_field) that join the train rows and are taught by the teachers alone
  # (an offline teacher's JSONL must cover them too); an epoch then covers them as well.
  d.transfer_file = ""
  return d


def _eval() -> ml_collections.ConfigDict:
  """config.eval: evaluators run on data.test_file at the end (and on validation during
  training)."""
  e = ml_collections.ConfigDict()
  e.evaluators = ()              # e.g. ("classification",), ("rouge", "factual")
  e.num_examples = -1            # test examples scored; -1 = all
  e.batch_size = 32
  e.decode_len = 128             # summarize: decoding length cap (tokens)
  # classify: 0 = a long text is truncated as in training; S > 0 = it is also read whole in
  # row-long windows S ids apart and its rows' log-probabilities averaged (infer/classifier_rows.py)
  e.window_stride = 0
  # How summaries are decoded at validation and test (infer/decode_controls.py Controls); every default
  # is off, and all off is greedy decoding. The controls act on the summary's own tokens, never
  # the document's (copying a source phrase stays allowed).
  e.decode = ml_collections.ConfigDict()
  e.decode.beam = 0                   # > 1: beam search with this many beams; 0: greedy
  e.decode.length_penalty = 1.0       # beam: log-prob sum / length ** this (1: the mean)
  e.decode.no_repeat_ngram_size = 0   # n > 0: no n-gram twice in a summary
  e.decode.repetition_penalty = 1.0   # > 1: generated tokens' logits / p (CTRL; 1: off)
  e.decode.min_new = 0                # eos banned before this many summary tokens
  # Per-document length cap ceil(r * document tokens), clipped to [max(min_new, 1), decode_len]:
  # 0 = off, a number r, or "train": r = the median summary / document token ratio of the
  # train split (any type, hence the reference).
  e.decode.length_ratio = config_dict.FieldReference(0.0, field_type=object)
  # samples > 0: MBR decoding (infer/rerank.py): that many summaries sampled at temperature /
  # top_p, plus the greedy (or beam) one; the candidate agreeing most with the rest is kept.
  e.decode.samples = 0
  e.decode.temperature = 1.0
  e.decode.top_p = 1.0
  # > 0: a candidate's support in its document (unigram + bigram precision) times this weight
  # is added to its agreement with the others (infer/rerank.py mbr_index).
  e.decode.source_weight = 0.0
  e.bootstrap = 1000             # resamples for 95% confidence intervals
  e.length_buckets = (256, 1024, 4096)   # slice edges in words of the input text
  e.slice_fields = ()            # record fields to slice by as well (e.g. "source")
  e.rubric_examples = 0          # > 0: export a human-evaluation sheet of that many examples
  # lm-evaluation-harness tasks scored after the test evaluation (infer/harness.py; needs
  # requirements-harness.txt), e.g. ("hellaswag",) or local tasks from eval.harness_include_path.
  e.harness_tasks = ()
  e.harness_include_path = ""    # folder of extra task YAMLs ("" = the harness's own)
  e.harness_limit = -1           # examples per harness task; -1 = all
  return e


def _tracking() -> ml_collections.ConfigDict:
  """config.tracking: optional experiment trackers beside TensorBoard + metrics.jsonl
  (train/tracking.py; requirements-tracking.txt). Off unless a store / project is set."""
  t = ml_collections.ConfigDict()
  t.mlflow_uri = ""          # e.g. sqlite:///runs/mlflow.db (or an http:// server)
  t.wandb_project = ""       # W&B project; offline (<workdir>/wandb) unless WANDB_MODE
  t.experiment = ""          # MLflow experiment / W&B group ("" = legal_lm); sweeps set it
  t.run_name = ""            # "" = the workdir's folder name; sweeps: the point's name
  return t


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
