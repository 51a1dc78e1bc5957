"""Shared plain helpers of the tests (the fixtures are in conftest.py).

Model / sharding / checkpoint tests: tiny configs, meshes, batches. End-to-end tests: REPO, env,
run_main, base_args (a tiny `python -m train.main` command line), losses / checkpoint_steps of a
workdir, start_and_interrupt, write_corpus. Fine-tuning tests: _sentiment_config, _summary_file,
CharTokenizer (rows that read back exactly), fine_tune_parts (the factory's model and task).

Random initialisation through jax.random compiles slowly on small CPU machines, so tests that
only need *some* parameter values fill the abstract (eval_shape'd) parameter tree with numpy
draws instead; tests that need the real initialiser (sharding, checkpoints) use create_state.
"""
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from configs import common, sentiment_finetune
from model import sharding as sharding_lib
from model import tokenizer as tokenizer_lib
from model.config import ModelConfig

# Tolerances used throughout, stated once.
F32_RTOL, F32_ATOL = 1e-5, 1e-5
BF16_RTOL, BF16_ATOL = 2e-2, 2e-2


def tiny_model_cfg(**overrides) -> ModelConfig:
  """2 layers, d_model 32, 4 query heads over 2 KV heads, vocab 64."""
  base = dict(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
              mlp_dim=64)
  base.update(overrides)
  cfg = ModelConfig(**base)
  cfg.validate()
  return cfg


def numpy_params(model, tokens, seed: int = 0):
  """A float32 parameter tree of the model's real structure, drawn with numpy (no compile)."""
  abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:          # RMSNorm scales: around 1
      x = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    elif "'embedding'" in name:  # token table: N(0, 1) rows, as the real init
      x = rng.standard_normal(leaf.shape)
    else:                        # projections and the position table
      x = 0.2 * rng.standard_normal(leaf.shape)
    return np.asarray(x, leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, abstract)


def mesh_from(devices, shape, context: int = 1) -> Mesh:
  """A mesh of exactly `devices`, in order: `shape` = (data, fsdp, tensor) sizes."""
  data, fsdp, tensor = shape
  return Mesh(np.asarray(devices).reshape(data, fsdp, context, tensor), sharding_lib.MESH_AXES)


def optim_cfg(**overrides):
  c = common.base_config().optim
  c.update(warmup_steps=0, lr=1e-2)
  c.update(**overrides)
  return c


def lm_batch(batch: int, seq_len: int, vocab: int, seed: int = 0, packed: bool = True) -> dict:
  """int32 tokens/segment_ids/positions; with `packed`, rows hold 2-3 documents and padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, size=(batch, seq_len), dtype=np.int32)
  segs = np.ones((batch, seq_len), np.int32)
  pos = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy()
  if packed:
    for r in range(batch):
      cuts = sorted(rng.choice(np.arange(2, seq_len - 2), size=2, replace=False))
      bounds = [0, *cuts, seq_len]
      for d, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        segs[r, a:b] = d + 1
        pos[r, a:b] = np.arange(b - a)
      if r % 2:   # trailing padding on odd rows
        segs[r, -2:] = 0
        pos[r, -2:] = 0
        tokens[r, -2:] = 0
  return {"tokens": tokens, "segment_ids": segs, "positions": pos}


def replace_cfg(cfg: ModelConfig, **changes) -> ModelConfig:
  return dataclasses.replace(cfg, **changes)


class PieceTokenizer:
  """A fixed piece list decoded like sentencepiece: a piece's leading space is its word-start
  marker, dropped at the start of the text (decode of " the" alone is "the")."""

  def __init__(self, pieces):
    self.pieces = list(pieces)
    self.vocab_size = len(self.pieces)

  def decode(self, ids):
    text = "".join(self.pieces[i] for i in ids)
    return text[1:] if text.startswith(" ") else text


# ---- End-to-end runs of `python -m train.main` in subprocesses, on a tiny generated corpus.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 60       # base_args' train.num_steps
CKPT_EVERY = 10      # base_args' train.checkpoint_every

_WORDS = ("agreement party licensor licensee shall hereby grant right license software term "
          "termination notice written consent breach damages liability warranty indemnify "
          "confidential information obligation payment fee royalty territory exclusive court "
          "governing law arbitration dispute clause section amendment assignment successor "
          "property intellectual patent copyright trademark use copy modify distribute "
          "sublicense permission condition limitation without with under pursuant effective "
          "date year month day provided however notwithstanding subject thereto herein").split()


def write_corpus(root, bad_line=None):
  """60 small deterministic pseudo-legal .txt documents and a 60-line more.jsonl; with
  `bad_line`, that line (1-based) of more.jsonl is a record cut off mid-write."""
  rng = np.random.default_rng(0)

  def doc():
    sentences = [" ".join(rng.choice(_WORDS, rng.integers(6, 16))).capitalize() + "."
                 for _ in range(rng.integers(3, 12))]
    return " ".join(sentences)
  for i in range(60):
    (root / f"doc_{i:03d}.txt").write_text(doc(), encoding="utf-8")
  lines = [json.dumps({"text": doc()}) for _ in range(60)]
  if bad_line:
    lines[bad_line - 1] = '{"text": "a record cut off mid-write'
  with open(root / "more.jsonl", "w", encoding="utf-8") as f:
    f.writelines(line + "\n" for line in lines)
  return root


def base_args(corpus, data_dir, workdir, **overrides):
  """A tiny model (1 layer, 32-token rows) trained NUM_STEPS steps on `corpus`."""
  flags = {
      "data.use_licensedcode": False, "data.extra_dirs": f"('{corpus}',)",
      "data.data_dir": str(data_dir), "data.vocab_size": 384, "data.seq_len": 32,
      "data.batch_size": 8, "data.validation_fraction": 0.1, "data.prefetch": 2,
      "model.num_layers": 1, "model.d_model": 32, "model.num_heads": 2, "model.num_kv_heads": 1,
      "model.head_dim": 16, "model.mlp_dim": 64, "optim.warmup_steps": 5,
      "train.num_steps": NUM_STEPS, "train.log_every": 1, "train.eval_every": 20,
      "train.eval_batches": 2, "train.checkpoint_every": CKPT_EVERY,
  }
  flags.update(overrides)
  return (["--config=configs/legal_pretrain.py:tiny", f"--workdir={workdir}"] +
          [f"--config.{k}={v}" for k, v in flags.items()])


def xla_flags(devices: int) -> str:
  """The test process's XLA_FLAGS (conftest.py: no LLVM optimisation) with `devices` fake CPU
  devices, for a child process."""
  flags = re.sub(r"\s*--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  return f"{flags} --xla_force_host_platform_device_count={devices}".strip()


def env(devices=1):
  e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", XLA_FLAGS=xla_flags(devices))
  e.pop("JAX_COORDINATOR_ADDRESS", None)
  return e


def run_main(args, devices=1, timeout=600):
  return subprocess.run([sys.executable, "-m", "train.main", *args], cwd=REPO, env=env(devices),
                        capture_output=True, text=True, timeout=timeout)


def losses(workdir, split="train", key="loss"):
  """{step: loss} (or another logged `key`); a resumed run re-logs steps after its
  checkpoint: the last entry wins."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if row["split"] == split:
        out[row["step"]] = row[key]
  return out


def checkpoint_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def start_and_interrupt(args, workdir, sig, ready=None, poll=0.02, devices=1):
  """Starts a run on `devices` fake CPU devices, sends `sig` once `ready()` holds (default: the
  step-2 * CKPT_EVERY checkpoint is complete); returns (exit code, stderr)."""
  if ready is None:
    ready = lambda: 2 * CKPT_EVERY in checkpoint_steps(workdir)  # noqa: E731
  log = os.path.join(workdir, "interrupted.log")   # a file, not a pipe: a full pipe blocks
  with open(log, "w") as err:
    proc = subprocess.Popen([sys.executable, "-m", "train.main", *args], cwd=REPO,
                            env=env(devices), stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 300
    while not ready():
      assert proc.poll() is None, f"run ended before it could be interrupted: {open(log).read()}"
      assert time.time() < deadline, "timed out waiting for the run to be ready to interrupt"
      time.sleep(poll)
    proc.send_signal(sig)
    proc.wait(timeout=300)
  with open(log) as f:
    return proc.returncode, f.read()


# ---- Fine-tuning on tiny generated data (the sentiment_files fixture: conftest.py).

POS = "great wonderful superb moving brilliant loved delightful".split()
NEG = "awful boring dreadful terrible waste hated dull".split()
FILLER = "the film story actor scene plot music camera ending director cast script".split()


def _review(rng, label):
  words = list(rng.choice(FILLER, rng.integers(8, 30))) + list(
      rng.choice(POS if label else NEG, 3))
  rng.shuffle(words)
  return " ".join(words)


def _sentiment_config(files, data_dir, **train):
  config = sentiment_finetune.get_config("tiny")
  config.data.train_file = str(files / "train.jsonl.gz")
  config.data.test_file = str(files / "test.jsonl")
  config.data.data_dir = str(data_dir)
  config.train.update(**train)
  return config


class CharTokenizer(tokenizer_lib.TokenizerBase):
  """One id per character (ord + 10) between bos 1 and eos 2, so rows can be read back
  exactly."""
  bos_id, eos_id = 1, 2

  def encode(self, text):
    return [ord(c) + 10 for c in text]


def _summary_file(path, n=80, seed=0):
  rng = np.random.default_rng(seed)
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      first = " ".join(rng.choice(FILLER, 5))
      rest = ". ".join(" ".join(rng.choice(FILLER + POS, 8)) for _ in range(rng.integers(2, 6)))
      f.write(json.dumps({"id": f"d{i}", "text": f"{first}. {rest}.", "summary": first,
                          "source": "x" if i % 2 else "y"}) + "\n")


# --- the HTTP server ------------------------------------------------------------------------------
@contextlib.contextmanager
def serving(loaded, **limits):
  """infer.serve's server for `loaded` on a free local port, in a thread, for the block."""
  import threading
  import portpicker
  from infer import serve
  server = serve.make_server(loaded, "127.0.0.1", portpicker.pick_unused_port(), **limits)
  thread = threading.Thread(target=server.serve_forever)
  thread.start()
  try:
    yield server
  finally:
    server.shutdown()
    server.server_close()
    thread.join()


def call(url: str, payload=None, *, method=None, data: bytes | None = None):
  """(status, JSON answer) of one request; `payload` is sent as JSON, `data` as is (POST when
  there is a body, else GET, unless `method` says otherwise)."""
  import urllib.error
  import urllib.request
  if payload is not None:
    data = json.dumps(payload).encode()
  request = urllib.request.Request(url, data=data, method=method,
                                   headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=120) as response:
      return response.status, json.load(response)
  except urllib.error.HTTPError as e:
    return e.code, json.load(e)


def fine_tune_parts(config):
  """(model, task, optimizer, mesh) from the factory, for a 10-step schedule."""
  import ml_collections
  from train import build
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.num_steps = 10
  parts = build.build(config)
  return parts.model, parts.task, parts.tx, parts.mesh


def train_tiny_lm(root, sentiment_files, seq_len: int, steps: int) -> str:
  """A 1-layer LM trained `steps` steps on the sentiment test corpus; its workdir."""
  from configs import legal_pretrain
  from train import run as run_lib
  lm = legal_pretrain.get_config("tiny")
  lm.data.update(use_licensedcode=False, extra_dirs=(str(sentiment_files),), vocab_size=512,
                 data_dir=str(root / "cache"), seq_len=seq_len, batch_size=8, max_docs=-1)
  lm.model.update(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16,
                  mlp_dim=64)
  lm.train.update(num_steps=steps, eval_every=steps, checkpoint_every=steps)
  run_lib.train(lm, str(root / "lm"))
  return str(root / "lm")


def random_weights(loaded, seed: int = 3):
  """`loaded` (a LoadedModel) with seeded random params: outputs that differ per prompt."""
  params = numpy_params(loaded.model, np.zeros((1, 8), np.int32), seed=seed)
  return dataclasses.replace(loaded, params=jax.device_put(params, jax.devices()[0]))


def wait_for_health(url: str, proc, seconds: float = 60.0):
  """Polls `url`/health until the server subprocess `proc` answers 200; fails the test with its
  stderr if it exits first, or after `seconds` (imports, loading and warm-up)."""
  import pytest
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    with contextlib.suppress(OSError):
      if call(url + "/health")[0] == 200:
        return
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    time.sleep(0.1)
  pytest.fail(f"the server did not answer /health within {seconds:.0f} s")
