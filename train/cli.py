"""The --config / --workdir flags of train.main, shared with launch.cluster (which forwards them).

Importing this module defines the flags. `parse_flags` is absl's parser with every mistake in
a flag reported as one line on stderr (exit code 2): an unknown config key names the closest
existing one, a value of the wrong type names the key, the value and the type it expects.
`config_table` lists every key of the loaded config with its preset default.
"""
import difflib
import os
import re
import sys

from absl import flags
from ml_collections import config_dict
from ml_collections.config_flags import config_flags, config_path

from configs import model_schema

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file with get_config(preset), e.g. configs/legal_pretrain.py:tiny",
    lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.")

HINT = "--print_config lists every key"


def flatten(config, prefix=""):
  """(dotted key, value) of every leaf of a ConfigDict, sorted by key."""
  for key, value in config.items():
    if isinstance(value, config_dict.ConfigDict) and len(value):
      yield from flatten(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _show(value) -> str:
  return "{}" if isinstance(value, config_dict.ConfigDict) else repr(value)


def declared_help() -> dict[str, str]:
  """{"model.<key>": its help and allowed values} from the model's declared schema."""
  out = {}
  for prefix, keys in (("model.", model_schema.MODEL_KEYS),
                       ("model.attention.", model_schema.ATTENTION_KEYS)):
    for key in keys:
      choices = f" [{' | '.join(map(str, key.choices))}]" if key.choices else ""
      out[prefix + key.name] = key.help + choices
  return out


def config_table(flag_values=flags.FLAGS) -> str:
  """Every key of the parsed --config: the value the run uses, the preset's default and, for
  the model's declared keys, their help; `*` marks the keys set on the command line."""
  flag = flag_values["config"]
  source = config_flags.get_config_filename(flag)
  default = dict(flatten(flag.parser.parse(source)))
  overridden = set(config_flags.get_override_values(flag))
  helps = declared_help()
  rows = [(("*" if key in overridden else " "), key, _show(value), _show(default.get(key)),
           helps.get(key, "")) for key, value in flatten(flag.value)]
  widths = [max(len(row[i]) for row in rows + [("", "key", "value", "preset default")])
            for i in (1, 2, 3)]
  lines = [f"# --config={source}: {len(rows)} keys; * = set on the command line",
           f"  {'key':<{widths[0]}}  {'value':<{widths[1]}}  {'preset default':<{widths[2]}}"
           "  help (the model's declared keys)"]
  lines += [f"{mark} {key:<{widths[0]}}  {value:<{widths[1]}}  {dflt:<{widths[2]}}  {help_}"
            .rstrip() for mark, key, value, dflt, help_ in rows]
  return "\n".join(lines)


def print_config(flag_values=flags.FLAGS) -> None:
  try:
    print(config_table(flag_values), flush=True)
  except BrokenPipeError:   # `--print_config | head`: the reader has what it wanted
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def parse_flags(argv):
  """absl's parser; a bad flag ends in one line on stderr and exit code 2."""
  try:
    rest = flags.FLAGS(argv)
    if flags.FLAGS["config"].value is not None:
      flags.FLAGS["config"].value.keys()   # a config file that failed to load raises here
    return rest
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    print(f"error: {describe_flag_error(argv, e)}", file=sys.stderr)
    sys.exit(2)


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def _config_source(argv):
  """The value of the last --config=FILE[:PRESET] in argv, or None."""
  source = None
  for i, arg in enumerate(argv):
    if re.fullmatch(r"--?config", arg) and i + 1 < len(argv):
      source = argv[i + 1]
    elif re.match(r"--?config=", arg):
      source = arg.split("=", 1)[1]
  return source


def _overrides(argv):
  """(flag as written, dotted key, value or None) of each --config.KEY[=VALUE] in argv."""
  out = []
  for i, arg in enumerate(argv):
    match = re.match(r"--?(no)?config\.([^=]+)(=(.*))?$", arg, re.S)
    if match:
      value = match.group(4)
      if value is None and not match.group(1) and i + 1 < len(argv) and \
          not argv[i + 1].startswith("-"):
        value = argv[i + 1]
      out.append((f"--config.{match.group(2)}", match.group(2), value))
  return out


def _type_name(kind) -> str:
  return {int: "an int", float: "a float", bool: "a bool (True/False)", str: "a string",
          tuple: "a tuple, e.g. \"('a', 'b')\""}.get(kind, getattr(kind, "__name__", str(kind)))


def describe_flag_error(argv, error) -> str:
  """One line for a failed parse of `argv`: the config file, then each --config.KEY override
  checked against the loaded config, then absl's own message."""
  source = _config_source(argv)
  if source is not None:
    try:
      config = flags.FLAGS["config"].parser.parse(source)
      config.keys()   # a config file that failed to load raises here
    except Exception as e:  # pylint: disable=broad-except
      last = [line for line in str(e).strip().splitlines() if line.strip()]
      return f"--config={source}: cannot load the config: {_one_line(last[-1] if last else e)}"
    keys = [key for key, _ in flatten(config)]
    for flag, key, value in _overrides(argv):
      try:
        kind = config_path.get_type(key, config)
        default = config_path.get_value(key, config)
      except (AttributeError, KeyError, IndexError, ValueError):
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
        guess = f"; did you mean {close[0]}?" if close else ""
        return f"{flag}: unknown config key {key}{guess} ({HINT})"
      if f"{flag}=" in str(error):
        return (f"{flag}: cannot use {value!r} for {key}, which expects {_type_name(kind)} "
                f"(preset default {default!r})")
  message = _one_line(error)
  return message[0].lower() + message[1:] if message else type(error).__name__
