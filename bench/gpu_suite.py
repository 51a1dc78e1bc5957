r"""One command for the first GPU this project meets: `python -m bench.gpu_suite [--out=FILE]`.

Writes one Markdown table (stdout, and --out) with four sections, each reusing what the project
already measures with (nothing here has its own model or step):
  train      the train step at configs/bench_step.py:gpu (1.4B-class, seq 2048, batch 4, bf16)
             against the in-run plain-JAX reference step (bench/step_time.run_benchmark):
             ms/step, tokens/s, MFU, and the ratio;
  attention  the kernels the model dispatches to (model/attention `full` and `local`, packed and
             unpacked; on GPU `auto` is cuDNN for plain bf16 rows, and `cudnn` is also forced)
             against the float32 reference kernel (model/attention/reference.py): forward output
             and the gradients of q, k, v, max |error| / max |reference| within bf16 tolerances;
  blocked    attention alone, forward + backward, at 8k / 16k / 32k tokens per sequence: time
             and compiled memory of `blocked` next to `full` (cuDNN) and `full` with XLA's dense
             kernel; then the longest sequence (8k, 16k, 32k, 64k) whose real train step compiles
             within the device's memory and runs at the 1.4B shape with `blocked` attention;
  inference  (bench/gpu_inference.py) a model served through infer/loading.py
             (--student=WORKDIR: any run, e.g. the distilled student; without it a randomly
             initialised model of configs/bench_step.py:cpu's shape) as f32 / bf16 / int8
             (infer/ptq.py) at batch 1 and 32 (bench/latency.measure), on the GPU and the
             CPU, and KV-cache decode tokens/s.

Where no GPU exists it prints one line and exits 0. `--platform=cpu --tiny` runs every section
on tiny shapes on the CPU: the tests do, so everything except the device itself is tested. A
time budget (--budget_s, default 420 s) skips what would not finish in time, with a row saying so.
"""
import dataclasses
import functools
import os
import sys
import time
import traceback

# Before jax starts its GPU client: JAX's default pool is 75% of the device, and the train
# section holds two 1.4B-param optimizer states plus a step's activations at once.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
from absl import app, flags  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from bench import gpu_inference, gpu_table
from model import errors
from model import log_setup

FWD_TOL, GRAD_TOL = 2e-2, 4e-2   # bf16 inputs: max |err| / max |reference|

_FLAGS = {}


def _define_flags():
  _FLAGS.update(
      platform=flags.DEFINE_enum("platform", "gpu", ["gpu", "cpu"], "Device to measure on."),
      tiny=flags.DEFINE_bool("tiny", False, "Tiny shapes (seconds on a CPU; for tests)."),
      out=flags.DEFINE_string("out", None, "Also write the Markdown table here."),
      student=flags.DEFINE_string("student", None, "A run's workdir to serve (infer/loading.py); "
                                  "default: a random-init model of bench_step.py:cpu's shape."),
      sections=flags.DEFINE_list("sections", ["train", "attention", "blocked", "inference"],
                                 "Sections to run, in order."),
      budget_s=flags.DEFINE_float("budget_s", 420.0, "Skip what starts after this many seconds."),
  )


@dataclasses.dataclass(frozen=True)
class Shapes:
  bench_preset: str          # configs/bench_step.py preset of the blocked section's train step
  steps: int
  rounds: int
  attn: tuple                # batch, length, heads, kv heads, head dim
  window: int
  block: int
  long_lengths: tuple        # blocked section: attention-only lengths
  long_heads: tuple          # heads, head dim
  train_lengths: tuple       # longest trainable sequence at the bench preset's shape
  serve_preset: str          # configs/bench_step.py preset served without --student
  serve_seq: int
  decode_prompt: int
  decode_new: int
  train_presets: tuple       # configs/bench_step.py presets the train section times


GPU = Shapes("gpu", 5, 3, (2, 2048, 16, 8, 128), 512, 128, (8192, 16384, 32768), (16, 128),
             (8192, 16384, 32768, 65536), "cpu", 512, 128, 128, ("anchor", "gpu"))
TINY = Shapes("tiny", 1, 1, (1, 32, 2, 1, 8), 8, 8, (32,), (2, 8), (32, 64), "tiny", 16, 4, 4,
             ("tiny",))


# --- train ----------------------------------------------------------------------------------
# The plain-JAX anchor (a ~90-line step: f32 params, bf16 compute, AdamW, cuDNN attention, no
# remat or sharding) at bench_step:anchor's shape, 8 x 2048 tokens, on one H100 SXM.
ANCHOR = {"preset": "anchor", "card": "H100", "ms": 261.5, "mfu": 0.575, "gib": 53.0}


def train_section(table, shapes, device):
  """The project's step at each of shapes.train_presets; the anchor's shape against the
  anchor's published step (tokens/s compared only on the anchor's own card type)."""
  from bench import step_time
  from configs import bench_step
  results = {}
  for preset in shapes.train_presets:
    res = step_time.run_benchmark(bench_step.get_config(preset), steps=shapes.steps,
                                  rounds=shapes.rounds, warmup=1, devices=[device],
                                  reference=False)
    r = res["project"]
    peak = res["device_peak_bytes"] or r["xla_bytes"]
    table.add("train", f"project step, bench_step:{preset} ({r['params'] / 1e6:.0f}M params, "
              f"batch {res['batch_size']} x {res['seq_len']})", r["median_ms"],
              f"{r['tokens_per_s']:,.0f} tokens/s", peak,
              f"MFU {100 * r['mfu']:.1f}%")
    if preset == ANCHOR["preset"]:
      anchor_rows(table, r, device.device_kind)
    results[preset] = res
  return results


def anchor_rows(table, project: dict, device_kind: str):
  """The anchor's published row and the project's step against it."""
  a = ANCHOR
  tokens_per_s = 8 * 2048 / a["ms"] * 1e3
  table.add("train", f"anchor step (plain JAX, published, one {a['card']})", a["ms"],
            f"{tokens_per_s:,.0f} tokens/s", a["gib"] * 2**30, f"MFU {100 * a['mfu']:.1f}%")
  mfu_ok = project["mfu"] >= a["mfu"]
  same_card = a["card"].lower() in device_kind.lower()
  speed = project["tokens_per_s"] / tokens_per_s
  result = (f"MFU {100 * project['mfu']:.1f}% vs {100 * a['mfu']:.1f}% "
            f"({'ok' if mfu_ok else 'BELOW'}); tokens/s {speed:.3f}x ")
  result += (("(ok)" if speed >= 1.0 else "(SLOWER)") if same_card else
             f"(not comparable: {device_kind}, the anchor ran on an {a['card']})")
  table.add("train", "project / anchor", result=result)


# --- attention equality ---------------------------------------------------------------------
def attention_check(kernel, kind, packed, implementation, shapes, device, seed=0):
  """(forward error, gradient error) of `kernel` against the reference, both relative to the
  reference's largest magnitude; bf16 inputs, the reference in float32."""
  from bench.step_time import packed_layout
  from model.attention import masks, reference
  b, t, h, kv, d = shapes.attn
  rng = np.random.default_rng(seed)
  q, k, v, g = (jnp.asarray(rng.standard_normal(s, np.float32), jnp.bfloat16)
                for s in ((b, t, h, d), (b, t, kv, d), (b, t, kv, d), (b, t, h, d)))
  spec = masks.MaskSpec(causal=True, window=shapes.window if kind == "local" else None)
  if packed:
    # 2-4 documents in every row, so each row has a document boundary to mask.
    seg, pos = (jnp.asarray(x) for x in packed_layout(rng, b, t, min_docs=2))
    mi = masks.MaskInputs(q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg)
  else:
    mi = masks.MaskInputs()
  fn = functools.partial(kernel, spec=spec, implementation=implementation,
                         block_size=shapes.block)
  ref = functools.partial(reference.attend, spec=spec)

  # Inputs go in as jit arguments: closed over, they are constants XLA folds at compile time
  # (seconds per dot at the GPU shapes, growing with the sequence).
  def fwd_bwd(f):
    def run(q, k, v, g, mi):
      def loss(q, k, v):
        out = f(q, k, v, mask_inputs=mi)
        return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32)), out
      (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
      return out, grads
    return jax.jit(run)

  with jax.default_device(device):
    out, grads = fwd_bwd(fn)(q, k, v, g, mi)
    r_out, r_grads = fwd_bwd(ref)(q, k, v, g, mi)

  def rel(a, r):
    a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
    return float(np.max(np.abs(a - r)) / max(float(np.max(np.abs(r))), 1e-6))
  return rel(out, r_out), max(rel(a, r) for a, r in zip(grads, r_grads))


def _attention_path(kind, packed, implementation, device, shapes) -> str:
  """Which kernel the dispatch picks (on this device, for bf16)."""
  if kind == "blocked":
    return "online softmax over key blocks"
  if kind == "local":
    if implementation == "xla":
      return "XLA"
    on_gpu = device.platform == "gpu"
    return "cuDNN" if implementation == "cudnn" or (on_gpu and not packed) else "windowed blocks"
  from model.attention import full, masks
  b, t = shapes.attn[:2]
  rows = jnp.ones((b, t), jnp.int32) if packed else None
  mi = masks.MaskInputs(q_pos=rows, kv_pos=rows, q_seg=rows, kv_seg=rows)
  kernel = full.choose(implementation, jnp.bfloat16, masks.MaskSpec(causal=True), mi, t, t,
                       shapes.block, backend=device.platform)
  names = {"cudnn": "cuDNN", "flash": "flash", "causal_blocks": "causal_blocks",
           "xla": "XLA dense + mask" if packed else "XLA"}
  return names[kernel]


def attention_section(table, shapes, device, kernels=None):
  """Rows per kind x packed x implementation; returns False where any check failed."""
  from model import attention
  kernels = kernels or {kind: attention.get_kernel(kind) for kind in ("full", "local")}
  impls = ("auto", "cudnn") if device.platform == "gpu" else ("auto",)
  all_ok = True
  for kind, kernel in kernels.items():
    for packed in (False, True):
      for impl in impls:
        case = (f"{kind}, {'packed' if packed else 'unpacked'}, implementation={impl} "
                f"({_attention_path(kind, packed, impl, device, shapes)}), "
                f"{'x'.join(map(str, shapes.attn))} bf16")
        try:
          fwd, grad = attention_check(kernel, kind, packed, impl, shapes, device)
        except Exception as e:  # pylint: disable=broad-except
          table.add("attention", case, result=f"not supported: {gpu_table.one_line(e)}")
          continue
        ok = fwd <= FWD_TOL and grad <= GRAD_TOL
        all_ok &= ok
        table.add("attention", case, result=f"{'equal' if ok else 'FAIL'}: fwd err {fwd:.2e}, "
                  f"grad err {grad:.2e} (tol {FWD_TOL:g} / {GRAD_TOL:g})")
  return all_ok


# --- blocked vs full, long sequences --------------------------------------------------------
def attention_long(kind, implementation, length, shapes, device):
  """(ms, compiled bytes) of attention fwd + bwd at `length`, batch 1; ms None if it would not
  fit the device."""
  from model import attention
  from model.attention import masks
  heads, dim = shapes.long_heads
  kernel = functools.partial(attention.get_kernel(kind), spec=masks.MaskSpec(causal=True),
                             mask_inputs=masks.MaskInputs(), implementation=implementation,
                             block_size=shapes.block)
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(kernel(q, k, v).astype(jnp.float32)),
                          argnums=(0, 1, 2)))
  x = jax.device_put(jnp.ones((1, length, heads, dim), jnp.bfloat16) * 0.01, device)
  compiled = grad.lower(x, x, x).compile()
  nbytes = gpu_table.compiled_bytes(compiled)
  limit = gpu_table.device_limit(device)
  if limit is not None and nbytes is not None and nbytes > limit:
    return None, nbytes
  return gpu_table.time_ms(compiled, (x, x, x)), nbytes


def blocked_section(table, shapes, device, deadline):
  variants = (("blocked", "auto"), ("full", "auto"), ("full", "xla"))
  for length in shapes.long_lengths:
    for kind, impl in variants:
      path = _attention_path(kind, False, impl, device, shapes)
      case = (f"{kind} ({path}) fwd+bwd, seq {length}, "
              f"{shapes.long_heads[0]} heads x {shapes.long_heads[1]}")
      if time.monotonic() > deadline:
        table.add("blocked", case, result="skipped: time budget")
        continue
      try:
        ms, nbytes = attention_long(kind, impl, length, shapes, device)
        result = "ok" if ms is not None else "does not fit the device (compiled size)"
        table.add("blocked", case, ms, f"{length / ms * 1e3:,.0f} tokens/s" if ms else "",
                  nbytes, result)
      except Exception as e:  # pylint: disable=broad-except
        table.add("blocked", case,
                  result="OOM" if gpu_table.is_oom(e) else gpu_table.one_line(e))
  longest_trainable(table, shapes, device, deadline)


def longest_trainable(table, shapes, device, deadline):
  """The longest sequence (batch 1) whose real train step runs at the bench preset's shape
  with blocked attention and full remat; stops at the first that does not."""
  from bench import step_time
  from configs import bench_step
  best = None
  for length in shapes.train_lengths:
    config = bench_step.get_config(shapes.bench_preset)
    config.data.update(seq_len=length, batch_size=1)
    config.model.update(remat="full", max_len=max(config.model.max_len, length))
    config.model.attention.kind = "blocked"
    case = f"train step, bench_step:{shapes.bench_preset} shape, blocked, remat full, 1 x {length}"
    if time.monotonic() > deadline:
      table.add("blocked", case, result="skipped: time budget")
      break
    try:
      runner = step_time.build_project(config, step_time.make_batch(config, False),
                                       _one_device_mesh(config, device))
      runner.run(1, timed=False)
      runner.run(2)
      ms = 1e3 * float(np.median(runner.times))
      table.add("blocked", case, ms, f"{length / ms * 1e3:,.0f} tokens/s",
                gpu_table.compiled_bytes(runner.compiled),
                f"trains (loss {runner.losses[-1]:.3f})")
      best = length
      del runner
    except Exception as e:  # pylint: disable=broad-except
      table.add("blocked", case,
                result="OOM" if gpu_table.is_oom(e) else gpu_table.one_line(e))
      break
  table.add("blocked", f"longest sequence that trains at bench_step:{shapes.bench_preset}'s "
            "shape (blocked)", result=str(best) if best else "none of those tried")


def _one_device_mesh(config, device):
  from model import sharding as sharding_lib
  return sharding_lib.make_mesh(config.mesh, [device])


# --- the suite ------------------------------------------------------------------------------
def find_device(platform: str):
  """The first device of `platform`, or None where there is none."""
  try:
    devices = jax.devices(platform)
  except RuntimeError:
    return None
  return devices[0] if devices else None


def run_suite(platform="gpu", tiny=False, sections=("train", "attention", "blocked", "inference"),
              student=None, budget_s=420.0, echo=None) -> tuple[gpu_table.Table, dict]:
  shapes = TINY if tiny else GPU
  device = find_device(platform)
  if device is None:
    raise RuntimeError(f"no {platform} device")
  start = time.monotonic()
  deadline = start + budget_s
  table = gpu_table.Table(echo)
  info = {"device": f"{device.platform} {device.device_kind}",
          "shapes": "tiny" if tiny else "gpu", "jax": jax.__version__}
  serve_devices = [device] + ([d for d in [find_device("cpu")] if d] if platform != "cpu" else [])
  for section in sections:
    t0 = time.monotonic()
    if t0 > deadline:
      table.add(section, "(whole section)", result="skipped: time budget")
      continue
    try:
      if section == "train":
        info["train"] = train_section(table, shapes, device)
      elif section == "attention":
        info["attention_ok"] = attention_section(table, shapes, device)
      elif section == "blocked":
        blocked_section(table, shapes, device, deadline)
      elif section == "inference":
        gpu_inference.inference_section(table, shapes, serve_devices, student, deadline)
      else:
        raise ValueError(f"unknown section {section!r}")
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc(file=sys.stderr)
      table.add(section, "(section failed)", result=gpu_table.one_line(e))
    info[f"{section}_s"] = time.monotonic() - t0
  info["total_s"] = time.monotonic() - start
  return table, info


def report(table: gpu_table.Table, info: dict) -> str:
  head = (f"GPU suite on {info['device']} ({info['shapes']} shapes, jax {info['jax']}), "
          f"{info['total_s']:.0f} s; " +
          ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in info.items()
                    if k.endswith("_s") and k != "total_s"))
  return head + "\n\n" + table.markdown() + "\n"


def main(argv):
  log_setup.quiet_libraries()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  platform = _FLAGS["platform"].value
  if find_device(platform) is None:
    print(f"gpu_suite: no {platform.upper()} device here (JAX sees: "
          f"{', '.join(sorted({d.platform for d in jax.devices()}))}); nothing measured. "
          "Run it on a GPU host, or --platform=cpu --tiny to try the suite.")
    return 0
  table, info = run_suite(platform, _FLAGS["tiny"].value, _FLAGS["sections"].value,
                          _FLAGS["student"].value, _FLAGS["budget_s"].value,
                          # each row to stderr as it is measured: a run killed by an outer
                          # timeout still leaves what it measured
                          echo=lambda line: print(line, file=sys.stderr, flush=True))
  text = report(table, info)
  print(text)
  if _FLAGS["out"].value:
    with open(_FLAGS["out"].value, "w") as f:
      f.write(text)
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(errors.exit_on_user_error(main))
