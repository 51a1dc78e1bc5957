"""The one inference API: find a run, restore its parameters, and classify / summarize /
generate with it.

Every model form is a run: a classifier, a summarizer, a pre-trained LM, a distilled student
(only the student half of its parameters is loaded) and a quantized copy written by
`python -m infer.quantize` (its own workdir, holding `quantized/` and a record of the run it came
from). Fine-tuning (`train.init_from`), distillation (the teacher), batch inference, the HTTP
server, the final evaluation and the benchmarks all go through `open_run` / `restore_params` /
`LoadedModel`, so a run that loads in one loads in all.

Imports only model/ (checkpoint I/O, tokenizer) and infer/: the layering rule.
"""
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import common as configs_common
from infer import (classifier_rows, decode, decode_controls, lora_weights, rerank, stream_text,
                   word_ngrams)
from model import checkpoint as checkpoint_lib
from model import errors
from model import sharding as sharding_lib
from model import tokenizer as tokenizer_lib
from model import transformer
from model.config import ModelConfig
from model.task_kind import task_kind
from model.transformer import Transformer

QUANTIZED_DIR = "quantized"   # inside a quantized run's workdir (infer/quantize.py writes it)


class LoadError(errors.UserError):
  """No usable run at a path; the message names the path (and the flag or key given)."""


def resolve_path(path: str) -> str:
  """An absolute, user-expanded path: Orbax rejects relative ones, and every entry point
  takes paths as the user typed them."""
  return os.path.abspath(os.path.expanduser(path))


@dataclasses.dataclass
class Run:
  """A finished run on disk: where, which checkpoint step, and what it recorded."""
  workdir: str
  step: int
  meta: dict                                  # config, tokenizer_path, vocab_size, params ...
  checkpointer: checkpoint_lib.Checkpointer | None   # None for a quantized run
  quantization: str = "none"                  # or the infer/ptq.py mode it was written in

  @property
  def config(self) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(self.meta["config"])

  @property
  def kind(self) -> str:
    return task_kind(self.meta["config"])

  @property
  def lora(self) -> "lora_weights.LoraSpec | None":
    """The adapters a LoRA run trained (its checkpoint holds base + adapters), else None."""
    return lora_weights.spec_of_run_config(self.meta["config"])

  def tokenizer(self) -> tokenizer_lib.Tokenizer:
    """The tokenizer the run recorded, or a LoadError if its file is gone."""
    path = self.meta["tokenizer_path"]
    if not os.path.exists(path):
      raise LoadError(f"{self.workdir}: the run's tokenizer {path} is missing")
    return tokenizer_lib.load_tokenizer(path)

  def model_config(self, **changes) -> ModelConfig:
    source = self.config
    cfg = ModelConfig.from_config(source.model, source.data.vocab_size)
    return dataclasses.replace(cfg, **changes)


def split_workdirs(spec: str) -> list[str]:
  """Several runs named in one flag or config value ("runs/a, runs/b"): commas, spaces ignored."""
  return [w.strip() for w in spec.split(",") if w.strip()]


def open_run(path: str, *, prefer_best: bool = False, what: str = "--workdir") -> Run:
  """The run at `path` (its workdir, or its checkpoints folder): with prefer_best its
  best-validation state when it kept one, else its newest checkpoint; <workdir>/checkpoints/
  <step> names one kept step. `what` names the flag or
  config key the path came from, for the error message. The run's recorded config is brought up
  to today's schema here (configs.common.upgrade), the one place older runs are made readable."""
  full_path = resolve_path(path)
  workdir, step = checkpoint_lib.split_step_path(full_path)
  if os.path.isdir(os.path.join(workdir, QUANTIZED_DIR, "params")):
    from infer import ptq   # qwix takes ~0.8 s to import: only quantized runs need it
    meta = ptq.load_meta(os.path.join(workdir, QUANTIZED_DIR))
    return Run(workdir, meta["source_step"], upgraded(meta["run_meta"], workdir), None,
               meta["mode"])
  if not os.path.isdir(workdir):
    raise LoadError(f"{what}={path}: no such directory ({workdir})")
  found = checkpoint_lib.find_finished(full_path, prefer_best)
  if found is None and step is not None:
    raise LoadError(f"{what}={path}: {workdir} has no readable checkpoint at step {step}")
  if found is None:
    raise LoadError(f"{what}={path}: no finished checkpoint in {workdir} (expected the workdir "
                    "of a training run, with checkpoints/, or of infer.quantize, with "
                    f"{QUANTIZED_DIR}/)")
  checkpointer, step = found
  return Run(workdir, step, upgraded(checkpointer.restore_meta(step), workdir), checkpointer)


def upgraded(meta: dict, workdir: str) -> dict:
  """A run's recorded metadata with its config brought up to today's schema."""
  try:
    return {**meta, "config": configs_common.upgrade(meta["config"])}
  except ValueError as e:   # a run written by a newer schema
    raise LoadError(f"{workdir}: {e}") from None


def abstract_params(model, mesh=None, lora=None):
  """`model`'s parameter tree as ShapeDtypeStructs: placed by its logical axis names over
  `mesh`, or on the default device when mesh is None. With a LoraSpec `lora`, the tree a LoRA
  run of `model` saved (the adapters beside the kernels they target)."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  boxed = jax.eval_shape(lambda r: model.init(r, tokens), jax.random.PRNGKey(0))["params"]
  if lora is not None:
    boxed = lora_weights.with_adapters(boxed, lora)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, nn.meta.unbox(boxed))
  else:
    shardings = sharding_lib.logical_sharding(nn.get_partition_spec(boxed), mesh)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.meta.unbox(boxed), shardings)


def restore_params(run: Run, model, mesh=None):
  """The parameters `model` has from `run`'s checkpoint (a distilled run's student half), in
  their shardings over `mesh` (None: the default device); the optimizer state is not read.
  A LoRA run's base and adapters are restored and merged (infer/lora_weights.py): plain
  Transformer parameters, so every reader takes a LoRA run like any other."""
  if run.checkpointer is None:
    raise LoadError(f"{run.workdir} is a quantized ({run.quantization}) run: its int8 "
                    "parameters load with LoadedModel, not as float parameters to train from")
  stored_scanned = bool(run.config.model.scan_layers)
  if isinstance(model, Transformer) and model.cfg.scan_layers != stored_scanned:
    # model.scan_layers differs between the checkpoint and `model`: restore in the stored
    # layout, then stack / unstack the blocks into `model`'s (and its shardings).
    stored = restore_params(run, Transformer(dataclasses.replace(model.cfg,
                                                                 scan_layers=stored_scanned)),
                            mesh)
    target = jax.tree.map(lambda a: a.sharding, abstract_params(model, mesh))
    convert = transformer.unstack_blocks if stored_scanned else transformer.stack_blocks
    return jax.jit(convert, out_shardings=target)(stored)
  spec = run.lora
  abstract = abstract_params(model, mesh, lora=spec)
  distilled = run.meta["config"]["task"] == "distill"
  params = run.checkpointer.restore_params(run.step, {"student": abstract} if distilled
                                           else abstract)
  params = params["student"] if distilled else params
  if spec is not None:   # merged where the plain model's parameters live
    plain = jax.tree.map(lambda a: a.sharding, abstract_params(model, mesh))
    params = jax.jit(lora_weights.merge, static_argnums=1, out_shardings=plain)(params, spec)
  return params


@dataclasses.dataclass
class LoadedModel:
  """A model ready to predict: its run config, module, parameters and tokenizer."""
  config: ml_collections.ConfigDict     # the run's config
  kind: str                             # classify | summarize | pretrain
  model: nn.Module                      # a Transformer, or qwix's wrapper of one
  params: dict
  tokenizer: tokenizer_lib.TokenizerBase
  step: int
  quantization: str = "none"
  mesh: jax.sharding.Mesh | None = None   # where params live; batches are split over it
  _ngram_words: object = dataclasses.field(default=None, repr=False, compare=False)

  @classmethod
  def from_run(cls, run: Run, mesh=None) -> "LoadedModel":
    tokenizer = run.tokenizer()   # first: a missing file fails before the restore
    if run.quantization != "none":
      from infer import ptq
      model, params, _ = ptq.load(os.path.join(run.workdir, QUANTIZED_DIR))
    else:
      # Inference (decoding, int8, LoRA merge, pruning, export) reads per-layer params.
      model = Transformer(run.model_config(scan_layers=False))
      params = restore_params(run, model, mesh)
    return cls(run.config, run.kind, model, params, tokenizer, run.step, run.quantization,
               None if run.quantization != "none" else mesh)

  @classmethod
  def from_workdir(cls, workdir: str, prefer_best: bool = True, mesh=None,
                   what: str = "--workdir") -> "LoadedModel":
    return cls.from_run(open_run(workdir, prefer_best=prefer_best, what=what), mesh)

  # --- classification -----------------------------------------------------------------------
  def encode_for_classify(self, texts: list[str], seq_len: int | None = None) -> dict:
    """Right-padded [B, seq_len] rows, framed and truncated like training (data.truncation)."""
    seq_len = seq_len or self.config.data.seq_len
    how = self.config.data.truncation
    return classifier_rows.pad_rows(
        [self.tokenizer.encode_framed(t, seq_len, how) for t in texts], seq_len)

  def _place(self, rows: np.ndarray):
    """A batch of rows on the model's mesh, split over its batch axes (as is without a mesh)."""
    if self.mesh is None:
      return rows
    return jax.device_put(rows, sharding_lib.batch_sharding(self.mesh))

  def _chunks(self, texts: list, batch_size: int | None):
    """`texts` (or id rows) in chunks of batch_size, each padded to batch_size with its first
    item (one compiled shape); a chunk of everything without a batch_size."""
    size = batch_size or max(len(texts), 1)
    for start in range(0, len(texts), size):
      chunk = texts[start:start + size]
      yield len(chunk), chunk + chunk[:1] * (size - len(chunk) if batch_size else 0)

  def classify(self, texts: list[str], params=None, batch_size: int | None = None,
               window_stride: int | None = None) -> np.ndarray:
    """Class probabilities [len(texts), num_classes], `batch_size` rows per call. A text longer
    than a row is truncated as in training; with window_stride > 0 (None: the run's
    eval.window_stride) it is also read whole, in windows that many ids apart, and its rows'
    log-probabilities averaged (infer/classifier_rows.py)."""
    params = self.params if params is None else params
    stride = self.config.eval.window_stride if window_stride is None else window_stride
    seq_len = self.config.data.seq_len
    rows, owners = classifier_rows.rows_for(self.tokenizer, texts, seq_len,
                                            self.config.data.truncation, stride)
    # Windows add rows; without a batch_size they still go in batches of len(texts) rows,
    # so callers that pad `texts` to fixed sizes (the server) keep fixed compiled shapes.
    size = batch_size or (len(texts) if stride else None)
    out = []
    for n, chunk in self._chunks(rows, size):
      batch = classifier_rows.pad_rows(chunk, seq_len)
      probs = classify_probs(self.model, params, self._place(batch["tokens"]),
                             self._place(batch["mask"]))
      out.append(np.asarray(jax.device_get(probs))[:n])
    probs = np.concatenate(out)
    return classifier_rows.pool(probs, owners, len(texts)) if stride else probs

  # --- generation ------------------------------------------------------------------------------
  def ngram_words(self, no_repeat_ngram_size: int) -> "word_ngrams.WordPieces | None":
    """How the tokenizer's pieces make words, when an n-gram ban is on (computed once): bans
    compare words ("The" = " the" = " T" + "he"), not token ids; so does MBR's agreement
    (ngram_words(1))."""
    if not no_repeat_ngram_size:
      return None
    if self._ngram_words is None:
      self._ngram_words = word_ngrams.word_pieces(self.tokenizer)
    return self._ngram_words

  def summarize(self, texts: list[str], max_new: int | None = None, params=None,
                batch_size: int | None = None, *, beam: int = 0, length_penalty: float = 1.0,
                no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0,
                min_new: int = 0, length_ratio: float = 0.0, samples: int = 0,
                temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                source_weight: float = 0.0) -> list[str]:
    """Summaries (KV cache), each document framed and truncated like training, `batch_size`
    documents per call: greedy, or beam search with `beam` > 1 beams (scores divided by
    length ** length_penalty). The decoding controls (infer/decode_controls.py Controls; all off by
    default) act on the summary's own tokens, never the document's: no_repeat_ngram_size,
    repetition_penalty, min_new (eos banned before that many tokens). length_ratio > 0 caps
    each summary at ceil(length_ratio * the document's tokens), clipped to
    [max(min_new, 1), max_new] (see `fit_length_ratio`). samples > 0: MBR decoding
    (infer/rerank.py), the consensus of that many summaries sampled at `temperature` / `top_p`
    (PRNG `seed`) and the greedy / beam one, under the same controls; source_weight > 0 also
    weighs each candidate's support in its document (rerank.mbr_index)."""
    sampling = rerank.Sampling(samples, temperature, top_p, seed, source_weight)
    max_new = max_new or self.config.eval.decode_len
    params = self.params if params is None else params
    tok = self.tokenizer
    controls = decode_controls.Controls(no_repeat_ngram_size=no_repeat_ngram_size,
                               repetition_penalty=repetition_penalty, min_new=min_new,
                               ngram_words=self.ngram_words(no_repeat_ngram_size))
    out = []
    for n, chunk in self._chunks(texts, batch_size):
      tokens, prompt_len = decode.encode_prompts(tok, chunk, self.config.data.seq_len, max_new,
                                                 self.config.data.truncation)
      limit = (decode_controls.length_limit(self.count_tokens(chunk), length_ratio, min_new,
                                            max_new) if length_ratio > 0 else None)
      if beam > 1:
        ids = decode.beam_search(self.model, params, tokens, prompt_len, beam=beam,
                                 max_new=max_new, eos_id=tok.eos_id,
                                 length_penalty=length_penalty, controls=controls, limit=limit)
      else:
        ids = decode.greedy(self.model, params, tokens, prompt_len, max_new=max_new,
                            eos_id=tok.eos_id, controls=controls, limit=limit)
      if sampling.samples:
        sources = [tok.encode(t) for t in chunk] if source_weight else None
        rows, _ = rerank.mbr_decode(self.model, params, tokens, prompt_len, ids, sampling,
                                    max_new=max_new, eos_id=tok.eos_id, controls=controls,
                                    limit=limit, words=self.ngram_words(1), sources=sources)
      else:
        rows = [decode.strip(row, tok.eos_id) for row in np.asarray(ids)]
      out += [tok.decode(row) for row in rows[:n]]
    return out

  def count_tokens(self, texts: list[str]) -> np.ndarray:
    """Tokens of each text, whole (no framing, no truncation): the lengths `length_ratio`
    relates a summary to its document by."""
    return np.array([len(self.tokenizer.encode(t)) for t in texts], np.int64)

  def fit_length_ratio(self, documents: list[str], summaries: list[str]) -> float:
    """The median summary / document token ratio over (document, summary) pairs, e.g. a
    train split's: the `length_ratio` that sizes each summary to its document."""
    return decode_controls.fit_length_ratio(self.count_tokens(documents),
                                            self.count_tokens(summaries))

  def encode_for_generate(self, prompts: list[str], max_new: int):
    """(tokens, prompt_len): `[bos] text` prompts (each text's head kept) packed with room for
    max_new tokens; ValueError unless max_new leaves room for a prompt in data.seq_len."""
    tok = self.tokenizer
    budget = self.config.data.seq_len - max_new
    if budget < 2:
      raise ValueError(f"max_new={max_new} leaves no room for a prompt in data.seq_len="
                       f"{self.config.data.seq_len}")
    if self.config.model.num_classes:
      raise ValueError("a classifier has no language-model head to generate with")
    if not self.config.model.causal:
      raise ValueError("a bidirectional encoder (model.causal=False) does not generate text; "
                       "fine-tune it as a classifier")
    return decode.pack_prompts([[tok.bos_id] + tok.encode(p)[:budget - 1] for p in prompts],
                               max_new)

  def generate(self, prompts: list[str], max_new: int, *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, beam: int = 0,
               stop: tuple = (), length_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
               repetition_penalty: float = 1.0, min_new: int = 0) -> list[str]:
    """Continuations of `prompts` as a plain causal LM (any run with an LM head: a pre-trained
    LM, a summarizer): greedy at temperature 0, else sampled; `beam` > 1: beam search (sum of
    log-probabilities / length ** length_penalty). Each prompt is `[bos] text`, its head kept;
    each text ends before eos and before the first of the `stop` strings. The decoding
    controls (decode_controls.Controls, off by default) act on the generated tokens only."""
    tok = self.tokenizer
    tokens, prompt_len = self.encode_for_generate(prompts, max_new)
    controls = decode_controls.Controls(temperature=temperature, top_k=top_k, top_p=top_p,
                               no_repeat_ngram_size=no_repeat_ngram_size,
                               repetition_penalty=repetition_penalty, min_new=min_new,
                               ngram_words=self.ngram_words(no_repeat_ngram_size))
    if beam > 1:
      ids = decode.beam_search(self.model, self.params, tokens, prompt_len, beam=beam,
                               max_new=max_new, eos_id=tok.eos_id, length_penalty=length_penalty,
                               controls=controls, prefix_lm=False)
    else:
      ids = decode.generate(self.model, self.params, tokens, prompt_len,
                            jax.random.PRNGKey(seed), max_new=max_new, eos_id=tok.eos_id,
                            controls=controls, prefix_lm=False)
    return [stream_text.cut_at_stop(tok.decode(decode.strip(row, tok.eos_id)), stop)[0]
            for row in np.asarray(ids)]

  def generate_stream(self, prompts: list[str], max_new: int, *, temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: tuple = (),
                      chunk: int = 8, no_repeat_ngram_size: int = 0,
                      repetition_penalty: float = 1.0, min_new: int = 0):
    """`generate` decoded `chunk` tokens at a time (decode.generate_chunks): yields, after each
    chunk, one string per prompt, the text that became final since the last yield (a possible
    start of a stop string and an incomplete UTF-8 character are held back until they are
    settled: infer/stream_text.py). Joined, each row's pieces equal `generate`'s text. Stops
    decoding once every row hit eos or a stop string."""
    tokens, prompt_len = self.encode_for_generate(prompts, max_new)
    rows = stream_text.StreamedRows(len(prompts), self.tokenizer, max_new, stop)
    chunks = decode.generate_chunks(
        self.model, self.params, tokens, prompt_len, jax.random.PRNGKey(seed), max_new=max_new,
        eos_id=self.tokenizer.eos_id, chunk=chunk, temperature=temperature, top_k=top_k,
        top_p=top_p, no_repeat_ngram_size=no_repeat_ngram_size,
        repetition_penalty=repetition_penalty, min_new=min_new,
        ngram_words=self.ngram_words(no_repeat_ngram_size))
    for block in chunks:
      yield rows.add(block)
      if rows.all_finished:
        break

  def check_max_new(self, max_new: int | None) -> int | None:
    """The summary length to use (None for a classifier); ValueError unless it leaves room for
    a prompt in the model's sequence length."""
    if self.kind != "summarize":
      if max_new:
        raise ValueError(f"max_new={max_new}: only summarizers generate; this is a "
                         f"{self.kind!r} model")
      return None
    max_new = max_new or self.config.eval.decode_len
    limit = self.config.data.seq_len - 3      # [bos] at least one token [eos]
    if not 1 <= max_new <= limit:
      raise ValueError(f"max_new={max_new}: expected 1..{limit} (data.seq_len="
                       f"{self.config.data.seq_len} holds the prompt and the summary)")
    return max_new

  def predict(self, texts: list[str], *, max_new: int | None = None,
              pad_to: int | None = None, **decoding) -> list[dict]:
    """One result per text: {"probs", "label"} (classifier) or {"summary"} (summarizer;
    `decoding`: summarize's keyword arguments beam, length_penalty, no_repeat_ngram_size,
    repetition_penalty, min_new, length_ratio - all off by default).

    The batch is padded to `pad_to` rows with copies of its first text (which never lengthens a
    summarizer's prompt bucket), so callers control the batch shapes jit sees."""
    if self.kind not in ("classify", "summarize"):
      raise ValueError(f"a {self.kind!r} run does not predict: inference needs a fine-tuned "
                       "classifier or summarizer")
    padded = texts + texts[:1] * ((pad_to or 0) - len(texts))
    if self.kind == "classify":
      if decoding:
        raise ValueError(f"a classifier does not decode: {sorted(decoding)} apply to summaries")
      probs = self.classify(padded)[:len(texts)]
      return [{"probs": p.tolist(), "label": int(p.argmax())} for p in probs]
    return [{"summary": s} for s in self.summarize(padded, max_new, **decoding)[:len(texts)]]

  def warm_up(self, sizes: list[int], max_new: int | None) -> int:
    """Compiles every shape a batch of `sizes` rows can take (the jit caches `predict` hits);
    returns how many."""
    if self.kind == "classify":
      for size in sizes:
        self.classify(["warm-up"] * size)
      return len(sizes)
    # Prompts are [bos] document [eos]: 2 .. seq_len - max_new tokens, in pack_prompts' buckets.
    lengths = decode.prompt_lengths(self.config.data.seq_len - max_new, max_new, shortest=2)
    for size in sizes:
      for length in lengths:
        decode.greedy(self.model, self.params, np.zeros((size, length), np.int32),
                      np.full(size, 2, np.int32), max_new=max_new,
                      eos_id=self.tokenizer.eos_id).block_until_ready()
    return len(sizes) * len(lengths)


# Class probabilities of any model that applies like the Transformer (a quantized one too).
classify_probs = jax.jit(lambda model, params, tokens, mask: jax.nn.softmax(
    model.apply({"params": params}, tokens, pool_mask=mask > 0)), static_argnums=0)
