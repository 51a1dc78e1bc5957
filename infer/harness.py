r"""EleutherAI lm-evaluation-harness for this codebase's runs: its LM interface
(`loglikelihood`, `loglikelihood_rolling`, `generate_until`) over infer/loading.py's
LoadedModel, and the command that scores a run on harness tasks.

  python -m infer.harness --workdir=runs/imdb_lm --tasks=hellaswag,lambada_openai
  python -m infer.harness --workdir=runs/tiny --tasks=my_task --include_path=my_tasks/ \
      --limit=100 --output=runs/tiny/harness.json

Needs the optional requirements-harness.txt (`pip install -r requirements-harness.txt`;
lm-eval 0.4.13, no torch). The command lives in infer/, not eval/: eval/ is the layer of pure
evaluators below the inference API, and this one drives a model (the layering table in the
README). A fine-tuning run with `eval.harness_tasks` set runs the same tasks after its test
evaluation and puts the scores in report.md (train/final_eval.py).

How requests become model calls:
  * Framing: the project's own LMs are trained on `[bos] document [eos]`, so every scored
    context starts with [bos]. An imported Hugging Face run keeps its family's framing: what
    its tokenizer prepends with add_special_tokens=True (Llama's and Gemma's BOS; nothing for
    GPT-2 or Qwen2), exactly as the harness's own HF backend (`hf`, add_bos_token=True) encodes,
    so the two backends score an imported model alike (tests/test_harness.py). An empty context
    and loglikelihood_rolling start from lm-eval's "prefix token" (BOS, else EOS).
  * Context / continuation split as the harness's Hugging Face backend does it: trailing spaces
    of the context move to the continuation; the context is the context encoded alone, the
    continuation the tokens of `context + continuation` after as many tokens as the context
    alone encodes to (a tokenizer may merge across the boundary: the continuation's tokens are
    those of the whole string, the context's those of the context).
  * Too long: the left end of the context is cut so [bos]... fits `max_length` (default the
    run's data.seq_len) input positions, as the harness cuts (the [bos] goes first).
  * Shapes: requests are sorted by length and scored `batch_size` rows at a time, rows padded to
    a multiple of `bucket` positions and batches to batch_size rows, so a task compiles a few
    programs (one per bucket) and reuses them. Rows are split over the mesh's batch axes.
  * Generation: greedy (or sampled with do_sample/temperature) with the KV-cache decoder
    (infer/decode.py, as a causal LM), `max_gen_toks` new tokens, cut at the first `until`
    string and at [eos].
"""
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from lm_eval.api.model import LM

from infer import completions, decode, loading
from model import errors
from model import sharding as sharding_lib


@functools.partial(jax.jit, static_argnums=0)
def score_tokens(model, params, tokens, length, targets, weights):
  """tokens/targets/weights [B, L] (targets = the next token; weights 1 where it is scored),
  length [B] valid positions -> (sum of log p(target) over weighted positions [B], whether
  every weighted target is the argmax [B])."""
  segment = (jnp.arange(tokens.shape[1])[None] < length[:, None]).astype(jnp.int32)
  logits = model.apply({"params": params}, tokens, segment_ids=segment)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  total = jnp.sum(jnp.where(weights > 0, picked, 0.0), axis=-1)
  greedy = jnp.all((jnp.argmax(logp, axis=-1) == targets) | (weights == 0), axis=-1)
  return total, greedy


@dataclasses.dataclass
class _Row:
  """One scored sequence: `seq` = the last max_length + 1 tokens of [bos] context continuation
  (inputs seq[:-1], targets seq[1:]), of which the last `scored` targets count."""
  seq: list[int]
  scored: int


class HarnessLM(LM):
  """lm-eval's LM over a LoadedModel (a pre-trained LM, or any run with an LM head)."""

  def __init__(self, loaded: loading.LoadedModel, batch_size: int = 16,
               max_length: int | None = None, max_gen_toks: int = 256, bucket: int = 64):
    super().__init__()
    if loaded.kind == "classify":
      raise ValueError("the harness scores language models: this run is a classifier (its "
                       "head predicts classes, not tokens)")
    self.loaded = loaded
    self.tok = loaded.tokenizer
    self.frame = completions.leading_specials(self.tok)   # as the server frames prompts
    self.max_length = max_length or loaded.config.data.seq_len
    self.max_gen_toks = max_gen_toks
    self.bucket = bucket
    # Whole rows per device: batch_size rounded up to the mesh's batch-axis size.
    shards = 1 if loaded.mesh is None else (loaded.mesh.shape["data"] *
                                            loaded.mesh.shape["fsdp"])
    self.batch_size = -(-max(batch_size, 1) // shards) * shards

  # --- lm-eval's identity --------------------------------------------------------------------
  @property
  def tokenizer_name(self) -> str:
    return f"legal_lm:{self.tok.fingerprint}"

  @property
  def eot_token_id(self):
    return self.tok.eos_id

  @property
  def prefix_token_id(self):
    return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

  def tok_encode(self, text: str) -> list[int]:
    return self.tok.encode(text)

  # --- scoring -------------------------------------------------------------------------------
  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, framed, continuation ids), split like the HF backend."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = self.tok.encode(context + continuation)
    if not context:
      return [self.prefix_token_id], whole
    alone = self.tok.encode(context)
    return self.frame + alone, whole[len(alone):]

  def _row(self, context: list[int], continuation: list[int]) -> _Row:
    return _Row((context + continuation)[-(self.max_length + 1):], len(continuation))

  def score_rows(self, rows: list[_Row]) -> list[tuple[float, bool]]:
    """(sum log p, is greedy) of each row's last `scored` targets, in batches sorted by length."""
    out = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].seq))
    mesh = self.loaded.mesh
    place = ((lambda x: jax.device_put(x, sharding_lib.batch_sharding(mesh))) if mesh is not None
             else (lambda x: x))
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      longest = max(len(rows[chunk[0]].seq) - 1, 1)
      width = -(-longest // self.bucket) * self.bucket
      tokens = np.zeros((self.batch_size, width), np.int32)
      targets = np.zeros_like(tokens)
      weights = np.zeros_like(tokens)
      length = np.ones(self.batch_size, np.int32)
      for r, i in enumerate(chunk):
        seq, n = rows[i].seq, len(rows[i].seq) - 1
        tokens[r, :n], targets[r, :n] = seq[:-1], seq[1:]
        weights[r, n - min(rows[i].scored, n):n] = 1
        length[r] = max(n, 1)
      total, greedy = score_tokens(self.loaded.model, self.loaded.params, place(tokens),
                                   place(length), place(targets), place(weights))
      total, greedy = np.asarray(jax.device_get(total)), np.asarray(jax.device_get(greedy))
      for r, i in enumerate(chunk):
        out[i] = (float(total[r]), bool(greedy[r]))
    return out

  def loglikelihood_tokens(self, pairs: list[tuple[list[int], list[int]]]
                           ) -> list[tuple[float, bool]]:
    return self.score_rows([self._row(c, x) for c, x in pairs])

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    pairs = [self.encode_pair(*req.args) for req in requests]
    results = self.loglikelihood_tokens(pairs)
    for req, res in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", req.args, res)
    return results

  def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint windows of `text` (each token predicted once, [bos] first)."""
    from lm_eval import utils
    return [(list(c), list(x)) for c, x in map(utils.make_disjoint_window,
                                               utils.get_rolling_token_windows(
                                                   token_list=self.tok.encode(text),
                                                   prefix_token=self.prefix_token_id,
                                                   max_seq_len=self.max_length, context_len=1))]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows = [self.rolling_windows(req.args[0]) for req in requests]
    flat = self.loglikelihood_tokens([w for ws in windows for w in ws])
    out, at = [], 0
    for req, ws in zip(requests, windows):
      total = sum(lp for lp, _ in flat[at:at + len(ws)])
      at += len(ws)
      out.append(total)
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return out

  # --- generation ----------------------------------------------------------------------------
  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    out = [None] * len(requests)
    groups = {}   # one generation setting per group: the compiled decoder is shared
    for i, req in enumerate(requests):
      context, kwargs = req.args
      kwargs = dict(kwargs or {})
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
      temperature = float(kwargs.pop("temperature", 0.0))
      if not kwargs.pop("do_sample", False):
        temperature = 0.0
      key = (max_new, temperature, int(kwargs.pop("top_k", 0) or 0),
             float(kwargs.pop("top_p", 1.0) or 1.0))
      groups.setdefault(key, []).append((i, context, until))
    for (max_new, temperature, top_k, top_p), items in groups.items():
      budget = self.max_length - max_new
      items.sort(key=lambda item: -len(item[1]))
      for start in range(0, len(items), self.batch_size):
        chunk = items[start:start + self.batch_size]
        prompts = [[self.tok.bos_id] + self.tok.encode(c)[-(budget - 1):] if budget > 1
                   else [self.tok.bos_id] for _, c, _ in chunk]
        prompts += prompts[:1] * (self.batch_size - len(prompts))
        tokens, prompt_len = decode.pack_prompts(prompts, max_new, self.bucket)
        ids = decode.generate(self.loaded.model, self.loaded.params, tokens, prompt_len,
                              jax.random.PRNGKey(start), max_new=max_new,
                              eos_id=self.tok.eos_id, temperature=temperature, top_k=top_k,
                              top_p=top_p, prefix_lm=False)
        ids = np.asarray(jax.device_get(ids))
        for (i, _, until), row in zip(chunk, ids):
          text = self.tok.decode(decode.strip(row, self.tok.eos_id))
          for stop in until:
            if stop and stop in text:
              text = text[:text.index(stop)]
          out[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out


# --- running tasks ----------------------------------------------------------------------------
def evaluate(lm: HarnessLM, tasks, *, include_path: str | None = None, limit=None,
             num_fewshot: int | None = None, log_samples: bool = False, seed: int = 0) -> dict:
  """lm_eval.simple_evaluate of `tasks` (names, or task dicts) with `lm`: its results dict
  ("results": {task: {metric,filter: value}}, "samples" with log_samples)."""
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")   # local tasks never wait on the hub
  from lm_eval import evaluator
  from lm_eval.tasks import TaskManager
  tasks, manager = list(tasks), None
  if include_path:
    # Indexing lm_eval's own ~15k task files takes ~15 s: skip it when the local folder holds
    # every task asked for.
    manager = TaskManager(include_path=include_path, include_defaults=False)
    if any(isinstance(t, str) and t not in manager.all_tasks for t in tasks):
      manager = None
  if manager is None:
    manager = TaskManager(include_path=include_path)
  return evaluator.simple_evaluate(
      model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
      log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
      torch_random_seed=None, fewshot_random_seed=seed, bootstrap_iters=0)


def scalar_results(results: dict) -> dict:
  """{task: {metric: value}} of the numeric results, the filter name dropped when it is the
  default ("acc,none" -> "acc")."""
  out = {}
  for task, metrics in results.get("results", {}).items():
    row = {}
    for key, value in metrics.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool) and "," in key:
        metric, flt = key.split(",", 1)
        if metric.endswith("_stderr"):
          continue
        row[metric if flt == "none" else f"{metric}_{flt}"] = float(value)
    out[task] = row
  return out


def run_on_params(config, loaded: loading.LoadedModel, params, tasks, *, include_path="",
                  limit=None, batch_size: int = 16) -> dict:
  """The harness scores of `params` (a run being evaluated, before its checkpoint is read back)
  as {task: {metric: value}}: the final report's evaluator."""
  del config
  lm = HarnessLM(dataclasses.replace(loaded, params=params), batch_size=batch_size)
  return scalar_results(evaluate(lm, tasks, include_path=include_path or None, limit=limit))


def main(argv):
  from absl import flags
  from model import log_setup
  log_setup.quiet_libraries()
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  run = loading.open_run(f.workdir, prefer_best=True)
  mesh_cfg = run.config.mesh.copy_and_resolve_references()
  # inference: every device on the batch axis (decoding does not split the sequence)
  mesh_cfg.update(data=-1, fsdp=1, context=1, tensor=1)
  loaded = loading.LoadedModel.from_run(run, mesh=sharding_lib.make_mesh(mesh_cfg))
  lm = HarnessLM(loaded, batch_size=f.batch_size, max_length=f.max_length or None,
                 max_gen_toks=f.max_gen_toks)
  tasks = [t for t in f.tasks.split(",") if t]
  results = evaluate(lm, tasks, include_path=f.include_path or None,
                     limit=f.limit if f.limit > 0 else None,
                     num_fewshot=f.num_fewshot if f.num_fewshot >= 0 else None,
                     log_samples=bool(f.output))
  from lm_eval.utils import make_table
  print(make_table(results))
  if f.output:
    os.makedirs(os.path.dirname(os.path.abspath(f.output)) or ".", exist_ok=True)
    with open(f.output, "w", encoding="utf-8") as fh:
      json.dump({"workdir": run.workdir, "step": run.step, "scores": scalar_results(results),
                 "results": results.get("results"), "samples": results.get("samples")},
                fh, indent=1, default=str)
    logging.info("wrote %s", f.output)


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "The run to score (its best state if it kept one).",
                      required=True)
  flags.DEFINE_string("tasks", None, "Comma-separated harness task (or group) names.",
                      required=True)
  flags.DEFINE_string("include_path", "", "Folder of extra task YAMLs (local tasks).")
  flags.DEFINE_float("limit", 0, "Examples per task (< 1: a fraction); 0 = all.")
  flags.DEFINE_integer("num_fewshot", -1, "Few-shot examples; -1 = each task's default.")
  flags.DEFINE_integer("batch_size", 16, "Rows per model call (rounded up to the devices).")
  flags.DEFINE_integer("max_length", 0, "Context window in tokens; 0 = the run's data.seq_len.")
  flags.DEFINE_integer("max_gen_toks", 256, "Default new-token cap of generation tasks.")
  flags.DEFINE_string("output", "", "JSON file for the scores and per-example samples.")
  app.run(errors.exit_on_user_error(main))
