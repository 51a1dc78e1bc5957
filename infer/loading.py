"""A trained model ready for inference: architecture, parameters and tokenizer from a run's
workdir (its best-validation state when it kept one), with batched classify / summarize.

Works for every run the loop writes: a classifier, a summarizer, a pre-trained LM, and a
distilled student (only the student's parameters are loaded). Imports only model/,
model/checkpoint.py (the layering rule) and the tokenizer (whose truncation training shares).
"""
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from infer import decode
from model.config import ModelConfig
from model.transformer import Transformer
from model import checkpoint as checkpoint_lib
from model import tokenizer as tokenizer_lib


class LoadError(ValueError):
  pass


def _abstract_params(model, sharding):
  tokens = jnp.zeros((1, 8), jnp.int32)
  boxed = jax.eval_shape(lambda r: model.init(r, tokens), jax.random.PRNGKey(0))
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                      nn.meta.unbox(boxed["params"]))


@dataclasses.dataclass
class LoadedModel:
  config: ml_collections.ConfigDict     # the run's config
  kind: str                            # classify | summarize | pretrain
  model: Transformer
  params: dict
  tokenizer: tokenizer_lib.Tokenizer
  step: int

  @classmethod
  def from_workdir(cls, workdir: str, prefer_best: bool = True) -> "LoadedModel":
    found = checkpoint_lib.find_finished(workdir, prefer_best)
    if found is None:
      raise LoadError(f"{workdir}: no finished checkpoint (expected checkpoints/ or best/ from a "
                      "training run)")
    ckpt, step = found
    meta = ckpt.restore_meta(step)
    config = ml_collections.ConfigDict(meta["config"])
    kind = config.distill.task if config.task == "distill" else config.task
    model = Transformer(ModelConfig.from_config(config.model, config.data.vocab_size))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = _abstract_params(model, sharding)
    if config.task == "distill":   # the student half of {"student", "teacher"}
      abstract = {"student": abstract}
    params = ckpt.restore_params(step, abstract)
    params = params["student"] if config.task == "distill" else params
    path = meta["tokenizer_path"]
    if not os.path.exists(path):
      raise LoadError(f"{workdir}: the run's tokenizer {path} is missing")
    return cls(config, kind, model, params, tokenizer_lib.load_tokenizer(path), step)

  # --- classification -----------------------------------------------------------------------
  def encode_for_classify(self, texts: list[str], seq_len: int | None = None) -> dict:
    """Right-padded [B, seq_len] rows, truncated like training (data.truncation)."""
    seq_len = seq_len or self.config.data.seq_len
    tokens = np.zeros((len(texts), seq_len), np.int32)
    for i, text in enumerate(texts):
      ids = self.tokenizer.encode_framed(text, seq_len, self.config.data.truncation)
      tokens[i, :len(ids)] = ids
    return {"tokens": tokens, "mask": (tokens > 0).astype(np.int32)}

  def classify(self, texts: list[str], params=None) -> np.ndarray:
    """Class probabilities [len(texts), num_classes]."""
    batch = self.encode_for_classify(texts)
    return np.asarray(classify_probs(self.model, self.params if params is None else params,
                                batch["tokens"], batch["mask"]))

  # --- generation ------------------------------------------------------------------------------
  def summarize(self, texts: list[str], max_new: int | None = None) -> list[str]:
    """Greedy summaries (KV cache), the document truncated like training."""
    max_new = max_new or self.config.eval.decode_len
    tok = self.tokenizer
    tokens, prompt_len = decode.encode_prompts(tok, texts, self.config.data.seq_len, max_new,
                                               self.config.data.truncation)
    ids = decode.greedy(self.model, self.params, tokens, prompt_len, max_new=max_new,
                        eos_id=tok.eos_id)
    return [tok.decode(decode.strip(row, tok.eos_id)) for row in np.asarray(ids)]


# Class probabilities of any model that applies like the Transformer (a quantized one too).
classify_probs = jax.jit(lambda model, params, tokens, mask: jax.nn.softmax(
    model.apply({"params": params}, tokens, pool_mask=mask > 0)), static_argnums=0)

