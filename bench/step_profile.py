r"""Where a train step's time goes: each part of the model timed alone, forward + backward.

  python -m bench.step_profile --config=configs/bench_step.py:cpu [--repeats=3] [--json_out=p.json]

The step is cut into the parts below, each compiled and timed on its own at the config's
shapes (value and gradient of a scalar of its output, w.r.t. its params and inputs; results:
docs/results/step_time.md):

  attention kernel    the kernel alone (q, k, v -> out), x num_layers
  attention rest      norm + q/k/v/out projections + RoPE around it (sublayer - kernel), x layers
  mlp                 norm + the MLP sublayer, x num_layers
  head + loss         final norm, LM head (logits over the vocabulary) and the task's loss
                      (fused over row chunks with optim.loss_chunk > 0)
  embedding           the token gather and its gradient (a scatter-add)
  optimizer           clipping + AdamW update of the whole param tree
  step                the project's real compiled train step (train/step.py)

`other` = step - the sum of the parts: what exists only in the whole program (copies between
parts, the gradient sums and divisions, metrics), or what the parts cost less in isolation.
Each part also reports XLA's FLOP count and the FLOP/s it reached: a part far below the matmul
parts' rate is spending its time outside the matmuls.
"""
import json
import statistics

from absl import app, flags
from ml_collections import config_flags
import jax
import jax.numpy as jnp
import numpy as np

from bench import latency, step_time
from model import attention as attention_lib
from model import errors
from model import layers
from model import sharding as sharding_lib
from model.attention import masks
from model.config import ModelConfig
from model.transformer import MultiHeadAttention
from train import build
from train import step as step_lib
from model import log_setup


def _define_flags():
  global _CONFIG, _REPEATS, _JSON, _PARTS
  _CONFIG = config_flags.DEFINE_config_file(
      "config", "configs/bench_step.py", "Benchmark config, e.g. configs/bench_step.py:cpu",
      lock_config=True)
  _REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per part (median reported).")
  _JSON = flags.DEFINE_string("json_out", None, "Also write the results here as JSON.")
  _PARTS = flags.DEFINE_list("parts", [], "Only these parts (default: all).")


def time_compiled(fn, args, repeats: int, options=None) -> tuple[float, float]:
  """(median seconds, XLA flops) of jit(fn)(*args): compiled once (with XLA `options`, as the
  train step is), one untimed call first."""
  compiled = jax.jit(fn).lower(*args).compile(compiler_options=options or None)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", float("nan")))
  return statistics.median(latency.call_seconds(compiled, args, iters=repeats)), flops


def _grad_of_sum(apply):
  """(params, *inputs) -> gradients of sum(apply(params, *inputs)) w.r.t. params and inputs."""
  def f(params, *inputs):
    return jax.grad(lambda p, xs: jnp.sum(apply(p, *xs).astype(jnp.float32)),
                    argnums=(0, 1))(params, inputs)
  return f


def part_fns(config):
  """{name: (fn, args, multiplier)}: each part's value-and-gradient computation at the config's
  shapes; multiplier = how many times the step runs it (num_layers for per-block parts)."""
  c = ModelConfig.from_config(config.model, config.data.vocab_size)
  b, t = config.data.batch_size, config.data.seq_len
  dt = c.compute_dtype
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, t, c.d_model)), dt)
  tokens = jnp.asarray(rng.integers(0, c.vocab_size, (b, t)), jnp.int32)
  pos = masks.default_positions(b, t)
  mi = masks.MaskInputs()
  window = c.attention_window if c.attention_kind == "local" else None
  spec = masks.MaskSpec(causal=c.causal, window=window, num_global=c.attention_num_global)
  kernel = attention_lib.get_kernel(c.attention_kind)
  key = jax.random.PRNGKey(0)
  parts = {}

  def qkv(heads):
    return jnp.asarray(rng.standard_normal((b, t, heads, c.head_dim)), dt)
  q, k, v = qkv(c.num_heads), qkv(c.num_kv_heads), qkv(c.num_kv_heads)
  parts["attention kernel"] = (
      lambda q, k, v: jax.grad(lambda q, k, v: jnp.sum(kernel(
          q, k, v, spec=spec, mask_inputs=mi, implementation=c.attention_implementation,
          block_size=c.attention_block_size).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v),
      (q, k, v), c.num_layers)

  attn_norm, attn = layers.norm(c, "attn_norm"), MultiHeadAttention(c)
  attn_params = {"norm": attn_norm.init(key, x)["params"],
                 "attn": attn.init(key, x, mi, pos)["params"]}
  parts["attention sublayer"] = (_grad_of_sum(lambda p, x: attn.apply(
      {"params": p["attn"]}, attn_norm.apply({"params": p["norm"]}, x), mi, pos)),
      (attn_params, x), c.num_layers)

  mlp_norm = layers.norm(c, "mlp_norm")
  mlp = layers.Mlp(c.d_model, c.mlp_dim, c.mlp_activation, 0.0, dt, use_bias=c.mlp_bias)
  mlp_params = {"norm": mlp_norm.init(key, x)["params"], "mlp": mlp.init(key, x)["params"]}
  parts["mlp"] = (_grad_of_sum(lambda p, x: mlp.apply(
      {"params": p["mlp"]}, mlp_norm.apply({"params": p["norm"]}, x))), (mlp_params, x),
      c.num_layers)

  parts.update(_model_parts(config, tokens, x))
  return parts


def _model_parts(config, tokens, x) -> dict:
  """The parts that need the whole built model: head + loss, embedding, optimizer update."""
  parts = {}
  parts_ = build.build(config, sharding_lib.make_mesh(config.mesh, jax.devices()[:1]))
  params = parts_.init_state().params
  task, model = parts_.task, parts_.model
  batch = {"tokens": tokens}

  # Inputs are arguments, never closed-over constants (XLA would constant-fold them).
  def head_loss(p, x, batch):
    h = model.apply({"params": p}, x, method=lambda m, x: m.final_norm(x))
    return task.head_loss(p, h, batch, True)[0]
  head_params = {k_: params[k_] for k_ in ("embed", "final_norm", "lm_head") if k_ in params}
  parts["head + loss"] = (lambda p, x, batch: jax.grad(head_loss, argnums=(0, 1))(p, x, batch),
                          (head_params, x, batch), 1)

  def embed(p, tokens, x):
    return jnp.sum(model.apply({"params": p}, tokens, method=lambda m, t: m.embed(t))
                   .astype(jnp.float32) * x.astype(jnp.float32))
  parts["embedding"] = (jax.grad(embed), ({"embed": params["embed"]}, tokens, x), 1)

  grads = jax.tree.map(jnp.ones_like, params)
  opt_state = parts_.tx.init(params)

  def optimizer(grads, opt_state, params):
    import optax
    updates, opt_state = parts_.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  parts["optimizer"] = (optimizer, (grads, opt_state, params), 1)
  return parts


def run_profile(config, repeats: int = 3, only=()) -> dict:
  """{part: {ms, per_step_ms, flops, gflops_per_s}} plus the step and `other`."""
  out = {}
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
  options = step_lib.compiler_options(mesh, config.train.get("xla_cpu_dot_library", "xla"),
                                      config.model.dtype)
  for name, (fn, args, mult) in part_fns(config).items():
    if only and name not in only:
      continue
    sec, flops = time_compiled(fn, args, repeats, options)
    out[name] = {"ms": 1e3 * sec, "per_step_ms": 1e3 * sec * mult, "times": mult,
                 "flops": flops, "gflops_per_s": flops / sec / 1e9}
  if only and "step" not in only:
    return out
  batch = step_time.make_batch(config, packed=False, seed=config.seed)
  runner = step_time.build_project(config, batch, mesh)
  runner.run(1, timed=False)
  runner.run(repeats)
  step_ms = 1e3 * statistics.median(runner.times)
  cost = runner.compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", float("nan")))
  out["step"] = {"ms": step_ms, "per_step_ms": step_ms, "times": 1, "flops": flops,
                 "gflops_per_s": flops / step_ms / 1e6}
  return summarise(out)


def summarise(out: dict) -> dict:
  """Adds `attention rest` (sublayer - kernel) and `other` (step - the parts) to a profile."""
  out = dict(out)
  if "attention sublayer" in out and "attention kernel" in out:
    sub, ker = out["attention sublayer"], out["attention kernel"]
    ms = sub["ms"] - ker["ms"]
    flops = sub["flops"] - ker["flops"]
    out["attention rest"] = {"ms": ms, "per_step_ms": ms * sub["times"], "times": sub["times"],
                             "flops": flops, "gflops_per_s": flops / ms / 1e6 if ms > 0 else 0.0}
  leaves = ("attention kernel", "attention rest", "mlp", "head + loss", "embedding", "optimizer")
  if "step" in out and all(n in out for n in leaves):
    rest = out["step"]["ms"] - sum(out[n]["per_step_ms"] for n in leaves)
    out["other"] = {"ms": rest, "per_step_ms": rest, "times": 1, "flops": float("nan"),
                    "gflops_per_s": float("nan")}
  return out


def format_table(out: dict) -> str:
  order = ("attention kernel", "attention rest", "mlp", "head + loss", "embedding",
           "optimizer", "other", "step")
  step = out.get("step", {}).get("ms", float("nan"))
  lines = [f"{'part':18} {'ms once':>9} {'x':>2} {'ms/step':>9} {'share':>6} {'GFLOP':>8} "
           f"{'GFLOP/s':>8}"]
  for name in order:
    if name not in out:
      continue
    r = out[name]
    lines.append(f"{name:18} {r['ms']:9.1f} {r['times']:2d} {r['per_step_ms']:9.1f} "
                 f"{100 * r['per_step_ms'] / step:5.1f}% {r['flops'] * r['times'] / 1e9:8.2f} "
                 f"{r['gflops_per_s']:8.1f}")
  return "\n".join(lines)


def main(argv):
  log_setup.quiet_libraries()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  out = run_profile(config, _REPEATS.value, tuple(_PARTS.value))
  print(f"step profile: preset {config.preset}, batch {config.data.batch_size} x seq "
        f"{config.data.seq_len}, attention {config.model.attention.kind}, {config.model.dtype}, "
        f"{jax.devices()[0].platform}")
  print(format_table(summarise(out)))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  _define_flags()
  app.run(errors.exit_on_user_error(main))
