"""Hugging Face checkpoints in and out of this codebase's runs.

  python -m train.hf.convert import --hf_dir=DIR --workdir=runs/NAME [--seq_len=1024]
  python -m train.hf.convert export --workdir=runs/NAME --hf_dir=OUT [--shard_size_mb=4096]

import reads DIR/config.json and DIR/*.safetensors (one file, or shards listed by
model.safetensors.index.json) tensor by tensor, maps each onto this codebase's parameter tree
(train/hf/families.py), puts it straight into its sharding over the mesh, and writes a finished
run: an Orbax checkpoint (state = {"params": ...}: no optimizer state, which every reader of a
finished run skips), its metadata (config, tokenizer, the source) and config.json, with the
tokenizer files copied to <workdir>/tokenizer/. train.init_from, distill.teacher, infer.*,
infer.quantize and the evaluators take it like any other run. The run is written in a temporary
folder beside the workdir and renamed at the end, so a failure leaves nothing behind.
Decoders (Llama, Mistral, Qwen2, Gemma, GPT-2) become language-model runs, encoders (BERT,
RoBERTa, DistilBERT) encoder runs to fine-tune from; a *ForSequenceClassification checkpoint of
any of them becomes a classifier run (task classify, its labels in the metadata).

export writes config.json, model.safetensors (or shards and an index above --shard_size_mb),
the tokenizer files and, for a language model, generation_config.json: what transformers'
AutoModelForCausalLM (encoders: AutoModel; classifiers: AutoModelForSequenceClassification) and
AutoTokenizer load. Imported runs (and runs fine-tuned or distilled from them) export as their
family; LMs trained here export as Llama-style (swiglu + RoPE; a sliding window as Mistral) or
GPT-2-style (learned positions), with the tied-head scale d_model^-1/2 folded into the final
norm. A decoder classifier exports with transformers' head only: the last token's state and one
linear layer (model.pooling=last).

Failures (an unknown family, a missing or mis-shaped tensor, an unsupported dtype) are one line
on stderr and exit code 2. transformers and torch are never needed: only safetensors and
tokenizers.
"""
import argparse
import contextlib
import ctypes
import json
import os
import shutil
import sys
import time

import flax
import jax
import ml_collections
import numpy as np

from configs import common
from infer import loading
from model import checkpoint as checkpoint_lib
from model import sharding as sharding_lib
from model import tokenizer as tokenizer_lib
from model.config import ModelConfig
from model.task_kind import task_kind
from model.transformer import Transformer
from train.hf import export as hf_export
from train.hf import families
from train.hf import safetensors_reader
from train.hf.families import ConvertError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


# --- import ----------------------------------------------------------------------------------
def run_config(hf_cfg: dict, seq_len: int) -> ml_collections.ConfigDict:
  """A full run config (the locked schema) for an HF model: its architecture, a pretrain task."""
  keys = families.model_keys(hf_cfg)
  config = common.base_config()
  config.data.vocab_size = keys.pop("vocab_size")
  attention = keys.pop("attention", {})
  # Every key a family writes is one of configs/model_schema.py's: assigning any other fails.
  config.model.lock()
  config.model.update(keys)
  config.model.attention.update(attention)
  config.model.unlock()
  m = config.model
  if m.positions == "learned":
    seq_len = min(seq_len, m.max_len - m.position_offset)
  config.data.seq_len = seq_len
  config.preset = f"hf:{hf_cfg['model_type']}"
  config.optim.z_loss = 0.0
  if keys.get("num_classes"):   # a *ForSequenceClassification checkpoint: a classifier run
    config.task = "classify"
    config.eval.evaluators = ("classification",)
  return config


def _release_freed_memory():
  """Returns freed heap memory to the OS (glibc's malloc_trim): converted tensors of a few MB
  come from the heap, and their freed pages would otherwise stay resident until the end."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):   # not glibc: nothing to do
    pass


_BLOCK_BYTES = 4 << 20   # a tensor is read this many bytes of rows at a time


def _aligned_empty(shape) -> np.ndarray:
  """A float32 array at a 64-byte boundary: jax.device_put onto a CPU device then adopts its
  buffer instead of copying it (XLA's zero-copy rule), so a converted tensor is never on the
  host twice."""
  n = int(np.prod(shape))
  raw = np.empty(4 * n + 64, np.uint8)
  offset = (-raw.ctypes.data) % 64
  return raw[offset:offset + 4 * n].view(np.float32).reshape(shape)


def _convert_rows(reader, name: str, layout: str, shape: tuple) -> np.ndarray:
  """The parameter of `shape` from HF tensor `name`, filled a block of rows at a time: the
  host holds the parameter and one block, never the tensor as read beside its converted copy."""
  out = _aligned_empty(shape)
  rows = families.hf_shape(layout, shape)[0]
  cols = int(np.prod(shape)) // max(rows, 1)
  step = max(1, _BLOCK_BYTES // (4 * max(cols, 1)))
  for start in range(0, rows, step):
    stop = min(start + step, rows)
    block = reader.read_rows(name, start, stop).reshape(stop - start, -1)
    if layout == "same":
      out.reshape(rows, -1)[start:stop] = block
    elif layout == "linear":       # rows of [out, in] are columns of the kernel [in, out...]
      out.reshape(shape[0], -1)[:, start:stop] = block.T
    else:                          # rows of [out, in] index the last axis of [in..., out]
      out.reshape(-1, shape[-1])[:, start:stop] = block.T
  return out


def _place(reader, family, config, mesh):
  """({path: array} of every parameter, each put into its sharding as soon as it is read and
  converted; {leaf name: checksum} of them, computed on the host copy), ModelConfig.
  Besides the placed parameters the host holds one block of a tensor (the layouts of
  families.Entry) or, for the few entries converted whole (GPT-2's fused q/k/v, biases),
  that entry's tensors; on a CPU device a placed parameter is its host copy (_aligned_empty)."""
  model_cfg = ModelConfig.from_config(config.model, config.data.vocab_size)
  model = Transformer(model_cfg)
  abstract = flax.traverse_util.flatten_dict(loading.abstract_params(model, mesh), sep="/")
  m = config.model.to_dict()
  m["vocab_size"] = config.data.vocab_size
  placed, checksums = {}, {}
  for entry in families.entries(family, m):
    names = []
    for name in entry.hf:
      stored = reader.resolve(name)
      if stored is None:
        raise ConvertError(f"tensor {name} is missing from the checkpoint ({family}: expected "
                           f"for {', '.join(entry.ours)})")
      names.append(stored)
    wants = [abstract.get(path) for path in entry.ours]
    if None in wants:
      raise ConvertError(f"{family}: tensor {names[0]} maps to "
                         f"{entry.ours[wants.index(None)]}, which the model does not have")
    if entry.layout and len(names) == 1 and len(wants) == 1:
      want, hf_shape = wants[0], reader.shape(names[0])
      if hf_shape != families.hf_shape(entry.layout, tuple(want.shape)):
        raise ConvertError(
            f"tensor {names[0]} has shape {list(hf_shape)}, which does not fit "
            f"{entry.ours[0]} {list(want.shape)} of the model config.json describes")
      value = _convert_rows(reader, names[0], entry.layout, tuple(want.shape))
      checksums[f"params/{entry.ours[0]}"] = checkpoint_lib.host_checksum(value)
      placed[entry.ours[0]] = jax.device_put(value, want.sharding).block_until_ready()
      del value
      _release_freed_memory()
      continue
    hf_arrays = [reader.read(n) for n in names]
    try:
      values = entry.to_ours(hf_arrays)
    except ValueError:   # a reshape that cannot fit: the tensor's shape is wrong
      values = [np.empty(0)] * len(entry.ours)
    first_shape = list(hf_arrays[0].shape)
    del hf_arrays   # a transposed copy no longer needs the tensor as read
    for i, (path, want) in enumerate(zip(entry.ours, wants)):
      if tuple(values[i].shape) != tuple(want.shape):
        raise ConvertError(
            f"tensor {names[0]} has shape {first_shape}, which does not fit "
            f"{path} {list(want.shape)} of the model config.json describes")
      value = _aligned_empty(tuple(want.shape))
      value[...] = values[i]
      values[i] = None
      checksums[f"params/{path}"] = checkpoint_lib.host_checksum(value)
      placed[path] = jax.device_put(value, want.sharding).block_until_ready()
      del value
    _release_freed_memory()
  missing = sorted(set(abstract) - set(placed))
  if missing:
    raise ConvertError(f"{family}: no tensor for parameter {missing[0]}"
                       + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
  return flax.traverse_util.unflatten_dict(placed, sep="/"), checksums, model_cfg


def _unused(reader, family, m) -> list[str]:
  used = {reader.resolve(n) for e in families.entries(family, m) for n in e.hf}
  return sorted(n for n in reader.files if n not in used and not families.ignored(family, n))


def _adapt_to_checkpoint(config, reader, family) -> list[str]:
  """Config changes for what the checkpoint holds: a BERT saved without its pooler (e.g. from
  BertForMaskedLM) has none. Returns notes for the summary."""
  if (family == "bert" and config.model.pooler != "none"
      and reader.resolve("bert.pooler.dense.weight") is None):
    config.model.pooler = "none"
    return ["no bert.pooler.* tensors: model.pooler=none (a classifier reads the [CLS] state "
            "directly)"]
  return []


def _check_import_paths(hf_dir: str, workdir: str) -> str:
  """hf_dir's config.json path; ConvertError unless hf_dir has it and tokenizer.json and
  workdir is new or empty."""
  config_path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(config_path):
    raise ConvertError(f"--hf_dir={hf_dir}: no config.json")
  if os.path.exists(workdir) and os.listdir(workdir):
    raise ConvertError(f"--workdir={workdir} exists and is not empty; choose a new one")
  if not os.path.exists(os.path.join(hf_dir, "tokenizer.json")):
    raise ConvertError(f"--hf_dir={hf_dir}: no tokenizer.json (save the fast tokenizer with "
                       "transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))")
  return config_path


def import_hf(hf_dir: str, workdir: str, seq_len: int = 1024, mesh=None) -> dict:
  """Writes the run for the HF model in hf_dir; returns a summary (timings, sizes)."""
  t0 = time.perf_counter()
  hf_dir, workdir = loading.resolve_path(hf_dir), loading.resolve_path(workdir)
  config_path = _check_import_paths(hf_dir, workdir)
  with open(config_path) as f:
    hf_cfg = json.load(f)
  family = families.family_of(hf_cfg)
  config = run_config(hf_cfg, seq_len)
  reader = safetensors_reader.SafetensorsReader(hf_dir)
  notes = _adapt_to_checkpoint(config, reader, family)
  mesh = mesh or sharding_lib.make_mesh(config.mesh)
  params, checksums, model_cfg = _place(reader, family, config, mesh)
  m = dict(config.model.to_dict(), vocab_size=config.data.vocab_size)
  unused = _unused(reader, family, m)
  if unused:
    raise ConvertError(f"{family}: checkpoint tensor {unused[0]} is not used by the model"
                       + (f" (and {len(unused) - 1} more)" if len(unused) > 1 else "")
                       + "; the config.json does not describe these weights")
  t_read = time.perf_counter() - t0

  with _partial_folder(workdir) as tmp:
    os.makedirs(os.path.join(tmp, "tokenizer"))
    for name in TOKENIZER_FILES + ("generation_config.json",):
      if os.path.exists(os.path.join(hf_dir, name)):
        shutil.copy(os.path.join(hf_dir, name), os.path.join(tmp, "tokenizer", name))
    tokenizer = tokenizer_lib.HFTokenizer(os.path.join(tmp, "tokenizer", "tokenizer.json"))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    final_tokenizer = os.path.join(workdir, "tokenizer", "tokenizer.json")
    meta = {"config": json.loads(config.to_json_best_effort()),
            "tokenizer_path": final_tokenizer, "vocab_size": tokenizer.vocab_size,
            "tokenizer": tokenizer.record(), "params": n_params,
            "dataset": f"imported from {hf_dir}",
            "imported_from": {"hf_dir": hf_dir, "family": family,
                              "architectures": hf_cfg.get("architectures"),
                              "checkpoint_bytes": reader.bytes, "notes": notes}}
    if config.model.num_classes:
      meta["labels"] = {str(k): v for k, v in (hf_cfg.get("id2label") or {}).items()}
    # Written at most the largest parameter (or 64 MiB) at a time: Orbax's default would hold
    # a second, compressed copy of every parameter while writing.
    largest = max(x.nbytes for x in jax.tree.leaves(params))
    checkpointer = checkpoint_lib.Checkpointer(tmp, every=1, keep=1, async_save=False,
                                               save_limit_bytes=max(largest, 64 << 20))
    checkpointer.save(0, {"params": params}, None, meta, force=True, checksums=checksums)
    checkpointer.close()
    with open(os.path.join(tmp, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  return {"family": family, "task": config.task, "params": n_params,
          "checkpoint_bytes": reader.bytes, "read_and_place_s": round(t_read, 2),
          "total_s": round(time.perf_counter() - t0, 2), "workdir": workdir,
          **({"notes": notes} if notes else {})}


@contextlib.contextmanager
def _partial_folder(final: str):
  """A fresh folder beside `final` to write into; it becomes `final` (replacing an empty one)
  when the block succeeds and is removed when it fails, so no half-written folder is left."""
  tmp = f"{final}.partial-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
    if os.path.exists(final):
      os.rmdir(final)
    os.rename(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# --- export ----------------------------------------------------------------------------------
def export_hf(workdir: str, hf_dir: str, shard_size_mb: int = 4096) -> dict:
  """Writes the run at workdir as a Hugging Face model folder; returns a summary."""
  t0 = time.perf_counter()
  run = loading.open_run(workdir, prefer_best=True)
  if run.quantization != "none":
    raise ConvertError(f"--workdir={workdir} is a quantized run; export the float run")
  kind = task_kind(run.meta["config"])
  if kind not in ("pretrain", "classify"):
    raise ConvertError(f"--workdir={workdir} is a {kind} run; language models (task pretrain) "
                       "export as *ForCausalLM (encoders as *Model), classifiers as "
                       "*ForSequenceClassification")
  hf_dir = loading.resolve_path(hf_dir)
  if os.path.exists(hf_dir) and os.listdir(hf_dir):
    raise ConvertError(f"--hf_dir={hf_dir} exists and is not empty; choose a new one")
  m = dict(run.meta["config"]["model"])   # every key: open_run brought it up to date
  m["num_classes"] = m["num_classes"] if kind == "classify" else 0
  imported = run.meta.get("imported_from", {}).get("family")
  family = imported or hf_export.export_family(m)
  hf_export.check_exportable(family, m)
  vocab = run.meta["config"]["data"]["vocab_size"]
  m["vocab_size"] = vocab
  tensors = _hf_tensors(run, family, m)

  with _partial_folder(hf_dir) as tmp:
    tok = run.tokenizer()
    extra = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id":
             getattr(tok, "_id", lambda k: tok.pad_id)("pad_token")}
    cfg = hf_export.hf_config(family, m, vocab, extra, run.meta.get("labels"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(cfg, f, indent=2)
    if family in families.DECODERS and not m["num_classes"]:   # it generates
      with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({k: v for k, v in extra.items() if v is not None}, f, indent=2)
    _write_tokenizer(tok, run, tmp)
    n_shards = hf_export.write_safetensors(tensors, tmp, shard_size_mb)
  return {"family": family, "architecture": cfg["architectures"][0], "tensors": len(tensors),
          "shards": n_shards,
          "seconds": round(time.perf_counter() - t0, 2), "hf_dir": hf_dir}


def _hf_tensors(run, family: str, m: dict) -> dict:
  """{HF tensor name: float32 array} of the run's parameters in `family`'s layout."""
  model = Transformer(run.model_config(scan_layers=False))   # export names layers one by one
  params = flax.traverse_util.flatten_dict(loading.restore_params(run, model), sep="/")
  params = {k: np.asarray(jax.device_get(v)) for k, v in params.items()}
  if (m["tied_head_rescale"] and m["tie_embeddings"]
      and not m["num_classes"] and "final_norm/scale" in params):
    # logits = E (norm(x) * d^-1/2): the scale folds into the final norm's weight.
    params["final_norm/scale"] = params["final_norm/scale"] * np.float32(m["d_model"] ** -0.5)
  # A base encoder (BertModel) is saved without its prefix, as transformers saves it.
  strip = families.PREFIX[family] if family in families.ENCODERS and not m["num_classes"] else ""
  tensors = {}
  for entry in families.entries(family, m):
    for name, value in zip(entry.hf, entry.to_hf([params[p] for p in entry.ours])):
      name = name[len(strip):] if strip and name.startswith(strip) else name
      tensors[name] = np.ascontiguousarray(value, np.float32)
  return tensors


def _write_tokenizer(tok, run, out: str):
  """The run's tokenizer as HF files: an imported one as it came; the sentencepiece model of a
  run trained here as tokenizer.model with a LlamaTokenizer config (loading it needs the
  sentencepiece package beside transformers)."""
  if isinstance(tok, tokenizer_lib.HFTokenizer):
    source = os.path.dirname(tok.path)
    for name in TOKENIZER_FILES:
      if os.path.exists(os.path.join(source, name)):
        shutil.copy(os.path.join(source, name), os.path.join(out, name))
    return
  shutil.copy(tok.path, os.path.join(out, "tokenizer.model"))
  config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True,
            "add_eos_token": False, "legacy": False, "model_max_length":
            run.meta["config"]["data"]["seq_len"]}
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)


# --- CLI ---------------------------------------------------------------------------------------
def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m train.hf.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="HF folder -> run")
  imp.add_argument("--hf_dir", required=True)
  imp.add_argument("--workdir", required=True)
  imp.add_argument("--seq_len", type=int, default=1024, help="data.seq_len of the run")
  exp = sub.add_parser("export", help="run -> HF folder")
  exp.add_argument("--workdir", required=True)
  exp.add_argument("--hf_dir", required=True)
  exp.add_argument("--shard_size_mb", type=int, default=4096)
  args = parser.parse_args(argv)
  from model import log_setup
  log_setup.quiet_libraries()
  try:
    if args.command == "import":
      summary = import_hf(args.hf_dir, args.workdir, args.seq_len)
    else:
      summary = export_hf(args.workdir, args.hf_dir, args.shard_size_mb)
  except (ConvertError, loading.LoadError, tokenizer_lib.DataError) as e:
    print(f"train.hf.convert {args.command}: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
