"""Attention ablation sweep for launch/sweep.py: a base training config and a grid over it.

  python -m launch.sweep --config=configs/ablate_attention.py:tiny --sweep_dir=runs/ablate_tiny

The same file is also a train.main config: `get_config("tiny:base")` returns just the base
training config, so every grid point is reproducible by hand as
`python -m train.main --config=configs/ablate_attention.py:tiny:base --config.<key>=<value> ...`
(launch/sweep.py prints exactly that command for each point).

Sweep fields (all read by launch/sweep.py):
  base:        the full training config every point starts from.
  grid:        ((dotted key, (values...)), ...) - the Cartesian product of the values.
  relevant_if: ((key, condition key, (condition values...)), ...) - `key` has an effect only when
               `condition key` takes one of the values; elsewhere it keeps the base value, and
               points that become identical are run once.
  exclude:     (((key, value), ...), ...) - a point matching every pair of one rule is dropped.
  points:      ((( key, value), ...), ...) - explicit extra points, added after the grid.
Pairs of tuples rather than dicts: ConfigDict field names cannot contain dots.

Presets: `tiny` (every point a short run on 2 CPU cores; the whole grid in minutes,
docs/results/ablations.md) and
`small` (the default; a workstation-sized model, hours per point).
"""
import ml_collections

from configs import legal_pretrain


def get_config(arg: str = "small") -> ml_collections.ConfigDict:
  preset, _, part = (arg or "small").partition(":")
  if preset not in PRESETS or part not in ("", "base"):
    raise ValueError(f"configs/ablate_attention.py: unknown preset {arg!r}; expected one of "
                     f"{sorted(PRESETS)}, optionally followed by ':base' (the training config)")
  sweep = PRESETS[preset]()
  sweep.preset = preset
  return sweep.base if part == "base" else sweep


def _attention_grid(windows) -> tuple:
  return (("model.attention.kind", ("full", "local", "blocked")),
          ("model.attention.window", tuple(windows)),
          ("model.positions", ("rope", "learned")))


def _sweep(base, windows) -> ml_collections.ConfigDict:
  sweep = ml_collections.ConfigDict()
  sweep.preset = ""
  sweep.base = base
  sweep.grid = _attention_grid(windows)
  # The window only changes what `local` computes; for other kernels it is left at its default.
  sweep.relevant_if = (("model.attention.window", "model.attention.kind", ("local",)),)
  sweep.exclude = ()
  sweep.points = ()
  return sweep


def _tiny():
  base = legal_pretrain.get_config("tiny")
  # 200 steps keep every point near a minute; validation every 50 steps draws the curves.
  base.train.update(num_steps=200, eval_every=50, checkpoint_every=100)
  return _sweep(base, windows=(32, 64))


def _small():
  base = legal_pretrain.get_config("small")
  base.data.seq_len = 1024
  base.train.update(num_steps=5000, eval_every=500, checkpoint_every=500)
  return _sweep(base, windows=(128, 256))


PRESETS = {"tiny": _tiny, "small": _small}
