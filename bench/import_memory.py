r"""Peak host memory of `train.hf.convert import` against the checkpoint's size.

  python -m bench.import_memory --d_model=768 --layers=8 --vocab=32000 [--dtype=bfloat16]

Writes a random Llama-shaped checkpoint (model.safetensors + config.json + a small
tokenizer.json; with --builder=transformers through LlamaForCausalLM.save_pretrained, which
needs requirements-hf.txt, else with safetensors directly: the same tensors and names), then
imports it in a fresh subprocess that records its resident memory (RSS sampled every 5 ms and
the kernel's high-water mark VmHWM, reset just before import_hf). Prints one Markdown row:
checkpoint MB, the baseline RSS (the interpreter with JAX, Orbax and the converter imported,
after one trace and compile of a tiny model: JAX loads tens of MB of modules lazily on its first,
whatever the model; "cold" = before that), peak RSS, peak - baseline, (peak - baseline) /
checkpoint, and the import's seconds. tests/test_convert_memory.py runs the same child on a
small model and asserts the ratio.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _tokenizer(out: str, vocab: int):
  """A byte-level BPE whose ids fit the model's vocabulary (the import needs tokenizer.json)."""
  import tokenizers
  from tokenizers import models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator(["The licensee shall indemnify the licensor."] * 10, trainers.BpeTrainer(
      vocab_size=min(vocab, 300), special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(os.path.join(out, "tokenizer.json"))
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
               "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}, f)


def llama_config(d_model: int, layers: int, vocab: int, mlp: int | None = None) -> dict:
  heads = max(d_model // 64, 1)
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
          "hidden_size": d_model, "intermediate_size": mlp or int(8 * d_model / 3) // 64 * 64,
          "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
          "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
          "rope_theta": 10000.0, "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}


def write_checkpoint(out: str, cfg: dict, dtype: str = "float32", builder: str = "numpy"):
  """A random checkpoint of `cfg` (an HF Llama config.json dict) in `out`."""
  os.makedirs(out, exist_ok=True)
  if builder == "transformers":
    import torch
    import transformers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True,
                                                    max_shard_size="100GB")
  else:
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
              "lm_head.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
      p = f"model.layers.{i}."
      shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                     **{p + f"self_attn.{n}_proj.weight": (d, d) for n in "qkvo"},
                     p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                     p + "mlp.down_proj.weight": (d, f)})
    tensors = {k: (rng.standard_normal(s, np.float32) * 0.02).astype(np_dtype)
               for k, s in shapes.items()}
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as fh:
      json.dump(cfg, fh, indent=2)
  _tokenizer(out, cfg["vocab_size"])


def child(hf_dir: str, workdir: str) -> dict:
  """Runs in the measuring subprocess: import_hf with RSS sampled around it."""
  import gc
  import jax
  import jax.numpy as jnp
  from configs import common
  from infer import loading
  from model.config import ModelConfig
  from model.transformer import Transformer
  from train.hf import convert
  jax.devices()
  gc.collect()
  cold = rss_mb()
  # Warm-up: JAX loads modules lazily on its first trace and compile (tens of MB, whatever
  # the model): part of a ready interpreter, not of this checkpoint's cost.
  tiny = common.base_config().model
  tiny.update(num_layers=1, d_model=8, num_heads=1, num_kv_heads=1, head_dim=8, mlp_dim=8)
  loading.abstract_params(Transformer(ModelConfig.from_config(tiny, 256)))
  jax.jit(lambda x: x + 1)(jnp.zeros(4)).block_until_ready()
  gc.collect()
  baseline = rss_mb()
  try:   # reset VmHWM to the current RSS (Linux >= 4.0), so it covers the import alone
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass
  peak = [baseline]
  done = threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], rss_mb())
      time.sleep(0.005)
  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  t0 = time.perf_counter()
  summary = convert.import_hf(hf_dir, workdir, seq_len=128)
  seconds = time.perf_counter() - t0
  done.set()
  thread.join()
  # VmHWM: this process's peak RSS. Not ru_maxrss, which Linux carries over from the process
  # that exec'd this one (a test runner of a few GB would be the "peak").
  with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
  peak_mb = max(peak[0], hwm)
  ckpt = summary["checkpoint_bytes"] / 2**20
  return {"checkpoint_mb": round(ckpt, 1), "cold_mb": round(cold, 1),
          "baseline_mb": round(baseline, 1),
          "peak_mb": round(peak_mb, 1), "added_mb": round(peak_mb - baseline, 1),
          "ratio": round((peak_mb - baseline) / ckpt, 3),
          "ratio_cold": round((peak_mb - cold) / ckpt, 3), "import_s": round(seconds, 2),
          "read_and_place_s": summary["read_and_place_s"], "params": summary["params"]}


def measure(hf_dir: str, workdir: str, env: dict | None = None) -> dict:
  """child() in a fresh interpreter (one CPU device: XLA_FLAGS of the caller left out)."""
  env = dict(env or os.environ)
  env.pop("XLA_FLAGS", None)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)   # the tests' shared cache: a user's fresh process
  env.setdefault("JAX_PLATFORMS", "cpu")
  out = subprocess.run([sys.executable, "-m", "bench.import_memory", "--child",
                        f"--hf_dir={hf_dir}", f"--workdir={workdir}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1800)
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m bench.import_memory", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--d_model", type=int, default=768)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--builder", default="numpy", choices=("numpy", "transformers"))
  p.add_argument("--keep", default="", help="write the checkpoint and run here (kept)")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--hf_dir", help=argparse.SUPPRESS)
  p.add_argument("--workdir", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    from model import log_setup
    log_setup.quiet_libraries()
    print(json.dumps(child(args.hf_dir, args.workdir)))
    return 0
  root = args.keep or tempfile.mkdtemp(prefix="import_memory_")
  try:
    hf_dir = os.path.join(root, "hf")
    cfg = llama_config(args.d_model, args.layers, args.vocab)
    # Written in a subprocess too, so torch's memory never meets the measurement.
    subprocess.run([sys.executable, "-c",
                    "import json, sys; from bench.import_memory import write_checkpoint; "
                    "write_checkpoint(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], "
                    "sys.argv[4])", hf_dir, json.dumps(cfg), args.dtype, args.builder],
                   cwd=REPO, check=True)
    row = measure(hf_dir, os.path.join(root, "run"))
    print("| checkpoint | params | baseline RSS (cold) | peak RSS | peak - baseline | ratio "
          "(from cold) | import |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {row['checkpoint_mb']} MB ({args.dtype}) | {row['params'] / 1e6:.1f}M | "
          f"{row['baseline_mb']} MB ({row['cold_mb']} MB) | {row['peak_mb']} MB | "
          f"{row['added_mb']} MB | **{row['ratio']}x** ({row['ratio_cold']}x) | "
          f"{row['import_s']} s |")
    print(json.dumps(row))
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
