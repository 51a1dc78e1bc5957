"""README.md's shell commands name modules, flags and config keys that exist.

Every command in README.md's ```bash / ```sh / ```shell / ```console blocks is read the way a
shell would split it: `\\` continuations joined, `&&` / `||` / `;` / `|` / `&` chains cut into
simple commands, `$ ` prompts, `VAR=value` prefixes, `nohup` and redirections dropped. Then, per
simple command (one test each, named after its README line):

- `python -m <module> ...` (any python: `python`, `python3`, `.venv/bin/python`) of a project
  package: the module exists (importlib.util.find_spec, without running it); every `--flag`,
  `--flag=value`, `--flag value` and `--noflag` is a flag the module defines, and a positional
  argument is a subcommand the module takes (absl modules: the flags registered once the module
  has run as __main__ with `--help`, so flags defined under `if __name__ == "__main__"` count;
  argparse modules: every parser and subparser it built); `--config=FILE[:PRESET]` loads and
  every `--config.a.b=v` override is parsed exactly as train.main parses it (ml_collections'
  config flag: the key exists, the value has the key's type). launch.local's arguments after
  `--` are checked as the module it forwards to (train.main).
- `python -m pytest`: the paths exist and the markers of `-m` are registered with pytest.
- `pip install`: the `-r` files exist, and an `-e` folder has a pyproject.toml or setup.py.
- The programs in SKIPPED (git, bash, cd, hf, curl, ...) and non-project modules (`python -m
  venv`) are skipped with the reason; any other program fails the test until it is listed.

It also runs the cheap ones: every project module's `--help` (absl's `--help` prints the usage
and exits 1 by design, so that is accepted when the usage was printed; anything else must exit
0), and `python -m train.main --config=FILE[:PRESET] --print_config` for each distinct config
file the README uses. The module runs happen in one helper process that imports the heavy
libraries once and forks a child per run (`python -m` is `runpy.run_module(..., "__main__")`).
"""
import argparse
import dataclasses
import difflib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PROJECT_PACKAGES = ("configs", "model", "train", "eval", "infer", "bench", "launch")
SHELL_LANGS = ("bash", "sh", "shell", "console")

# Programs whose commands are not checked, and why.
SKIPPED = {
    "git": "version control, not this project's code",
    "bash": "runs a script (its own checks are its tests)",
    "sh": "runs a script (its own checks are its tests)",
    "cd": "shell builtin",
    "export": "shell builtin",
    "source": "shell builtin",
    **{tool: "shell utility" for tool in ("cat", "head", "tail", "tee", "grep", "ls", "mkdir",
                                            "echo", "wc")},
    "curl": "talks to a running server",
    "hf": "Hugging Face CLI, needs the network",
    "huggingface-cli": "Hugging Face CLI, needs the network",
    "tfds": "TFDS CLI, needs the network",
    "kubectl": "cluster CLI",
    "sbatch": "cluster CLI",
    "gcloud": "cluster CLI",
    "mlflow": "MLflow UI, an optional package",
    "wandb": "W&B CLI, an optional package",
    "tensorboard": "TensorBoard UI",
}
# Absl modules that take positional arguments: the first one must be one of these.
SUBCOMMANDS = {
    "launch.cluster": ("tpu-pod", "gke", "slurm", "local"),
    "eval.rubric": ("export", "report"),
}
# Modules that pass everything after `--` to another module (the flag naming it, its default).
FORWARDS = {"launch.local": ("module", "train.main")}
PREFIXES = ("nohup", "time", "env", "exec")
CHAIN = {"&&", "||", ";", "|", "&"}


@dataclasses.dataclass
class Command:
  line: int          # README line where the command starts
  index: int         # place in its `&&` chain, from 0
  argv: list         # the simple command, without env assignments / prefixes / redirections
  text: str          # the whole logical line, as written

  @property
  def label(self) -> str:
    program = os.path.basename(self.argv[0]) if self.argv else ""
    if len(self.argv) > 2 and self.argv[1] == "-m":
      program = self.argv[2]
    return f"L{self.line}.{self.index}-{program}"


# --- reading commands out of Markdown ---------------------------------------------------------

def logical_lines(markdown: str):
  """(line number, text) of each command line inside shell code fences, continuations joined."""
  out, lang, pending, start = [], None, None, 0
  for number, raw in enumerate(markdown.splitlines(), 1):
    stripped = raw.strip()
    if stripped.startswith("```"):
      if lang is None:
        info = stripped[3:].strip().split()
        lang = info[0].lower() if info else ""
      else:
        lang, pending = None, None
      continue
    if lang not in SHELL_LANGS:
      continue
    line = raw.rstrip()
    if pending is None:
      text = line.lstrip()
      if text.startswith("$ "):
        text = text[2:]
      elif lang == "console":
        continue            # output lines of a console transcript
      if not text or text.startswith("#"):
        continue
      pending, start = "", number
    else:
      text = line.lstrip()
    if text.endswith("\\") and not text.endswith("\\\\"):
      pending += text[:-1] + " "
      continue
    out.append((start, pending + text))
    pending = None
  return out


def _tokens(text: str):
  lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  lexer.commenters = ""
  tokens = []
  try:
    for token in lexer:
      if token.startswith("#"):
        break                # a comment runs to the end of the line
      tokens.append(token)
  except ValueError as e:
    raise ValueError(f"cannot split {text!r}: {e}") from None
  return tokens


def simple_commands(text: str):
  """The simple commands of one logical line, each an argv list."""
  commands, current, skip_next = [], [], False
  for token in _tokens(text):
    if skip_next:
      skip_next = False
      continue
    if token in CHAIN:
      commands.append(current)
      current = []
    elif set(token) <= set("<>&"):          # a redirection: drop it and its target
      if current and current[-1].isdigit():
        current.pop()
      skip_next = not token.endswith("&") or token == ">&"
    else:
      current.append(token)
  commands.append(current)
  out = []
  for argv in commands:
    while argv and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]) or argv[0] in PREFIXES):
      argv = argv[1:]
    if argv:
      out.append(argv)
  return out


def commands_in(markdown: str):
  commands = []
  for line, text in logical_lines(markdown):
    for index, argv in enumerate(simple_commands(text)):
      commands.append(Command(line, index, argv, text))
  return commands


def is_python(program: str) -> bool:
  return re.fullmatch(r"python(\d+(\.\d+)?)?", os.path.basename(program)) is not None


def python_module(argv):
  """(module, arguments) of `python -m module args`, else None."""
  if not argv or not is_python(argv[0]):
    return None
  args = argv[1:]
  while args and args[0] != "-m" and args[0].startswith("-"):
    args = args[2:] if args[0] in ("-X", "-W") else args[1:]
  if len(args) >= 2 and args[0] == "-m":
    return args[1], args[2:]
  return None


def is_project(module: str) -> bool:
  return module.split(".")[0] in PROJECT_PACKAGES


def module_exists(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ImportError:       # a parent package is missing
    return False


def project_modules(commands):
  """Project modules the commands run (launch.local's forwarded module included)."""
  modules = []
  for command in commands:
    found = python_module(command.argv)
    if found and is_project(found[0]):
      modules.append(found[0])
      if found[0] in FORWARDS:
        modules.append(_forwarded_module(found[0], found[1]))
  return sorted(set(modules))


def _forwarded_module(module, args):
  flag, default = FORWARDS[module]
  for arg in args:
    if arg == "--":
      break
    if arg.startswith(f"--{flag}="):
      return arg.split("=", 1)[1]
  return default


def config_specs(commands):
  """{config file: the first FILE[:PRESET] the README gives it} over `--config=` values."""
  specs = {}
  for command in commands:
    for arg in command.argv:
      match = re.match(r"--config=([^:]+\.py)(:\S+)?$", arg)
      if match:
        specs.setdefault(match.group(1), match.group(0).split("=", 1)[1])
  return specs


# --- checking one command ---------------------------------------------------------------------

def _close(name, names):
  near = difflib.get_close_matches(name, list(names), n=1)
  return f" (did you mean --{near[0]}?)" if near else ""


def check_config(flag: str, spec: str, overrides) -> list:
  """Parse --FLAG=SPEC and its overrides exactly as train.main does; problems found."""
  from absl import flags
  from ml_collections.config_flags import config_flags
  path, _, preset = spec.partition(":")
  if not os.path.isfile(os.path.join(ROOT, path)):
    return [f"--{flag}={spec}: no file {path}"]
  full = os.path.join(ROOT, path) + (f":{preset}" if preset else "")
  argv = ["readme", f"--{flag}={full}"] + list(overrides)
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(flag, None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)   # ml_collections' load_module
      values(argv)
      values[flag].value.keys()
  except Exception as e:  # pylint: disable=broad-except
    message = " ".join(str(e).split()).replace(full, spec)
    return [f"--{flag}={spec} {' '.join(overrides)}: {type(e).__name__}: {message}"]
  return []


def check_absl(module, args, info, introspected) -> list:
  problems, positionals, configs, overrides = [], [], {}, {}
  flag_info = info["flags"]
  config_flags = {name for name, meta in flag_info.items() if meta["config"]}
  i = 0
  while i < len(args):
    arg = args[i]
    if arg == "--":
      if module in FORWARDS:
        target = _forwarded_module(module, args[:i])
        problems += check_python(target, args[i + 1:], introspected,
                                 where=f"after {module}'s --")
      else:
        problems.append(f"{module} takes no arguments after --")
      break
    if arg.startswith("-") and arg != "-":
      body = arg.lstrip("-")
      name, has_value, value = body.partition("=")
      negated = name[2:] if name.startswith("no") else None
      base = name.split(".")[0]
      if "." in name and (base in config_flags or
                          (negated and negated.split(".")[0] in config_flags)):
        base = base if base in config_flags else negated.split(".")[0]
        if not has_value and not negated and i + 1 < len(args) and \
            not args[i + 1].startswith("-"):
          arg, i = f"{arg}={args[i + 1]}", i + 1       # --config.a.b VALUE
        overrides.setdefault(base, []).append(arg)
      elif name in flag_info:
        if not flag_info[name]["bool"] and not has_value and i + 1 < len(args):
          value, i = args[i + 1], i + 1
        if flag_info[name]["config"]:
          configs[name] = value
      elif not (negated and flag_info.get(negated, {}).get("bool")):
        problems.append(f"--{name}: not a flag of {module}{_close(name, flag_info)}")
    else:
      positionals.append(arg)
    i += 1
  if module in SUBCOMMANDS:
    if not positionals or positionals[0] not in SUBCOMMANDS[module]:
      problems.append(f"{module} needs one of {', '.join(SUBCOMMANDS[module])} first; "
                      f"got {positionals[:1]}")
  elif positionals:
    problems.append(f"{module} takes no positional arguments; got {positionals}")
  for flag, flag_overrides in overrides.items():
    if flag not in configs:
      problems.append(f"{' '.join(flag_overrides)}: no --{flag}=FILE to override")
  for flag, spec in configs.items():
    problems += check_config(flag, spec, overrides.get(flag, []))
  return problems


def check_argparse(module, args, info) -> list:
  """Options and subcommands against the parsers the module built (exact names: argparse would
  also take an unambiguous prefix, but the README should spell the option out)."""
  problems, top = [], info["argparse"]
  options, slots, subcommand = dict(top["options"]), len(top["positionals"]), None
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith("-") and arg != "-":
      name = arg.split("=", 1)[0]
      if name not in options:
        where = f" {subcommand}" if subcommand else ""
        problems.append(f"{name}: not an option of {module}{where}"
                        f"{_close(name.lstrip('-'), [o.lstrip('-') for o in options])}")
      elif options[name] and "=" not in arg:
        i += 1                        # its value
    elif top["subcommands"] and subcommand is None:
      subcommand = arg
      if arg not in top["subcommands"]:
        problems.append(f"{module}: no subcommand {arg!r}; it has "
                        f"{', '.join(top['subcommands'])}")
        return problems
      options.update(top["subcommands"][arg]["options"])
      slots = len(top["subcommands"][arg]["positionals"])
    elif slots > 0:
      slots -= 1
    else:
      problems.append(f"{module}: unexpected argument {arg!r}")
    i += 1
  if top["subcommands"] and subcommand is None:
    problems.append(f"{module} needs a subcommand: {', '.join(top['subcommands'])}")
  return problems


def check_python(module, args, introspected, where="") -> list:
  prefix = f"{where}: " if where else ""
  if not module_exists(module):
    return [f"{prefix}no module {module} (python -m {module} would fail)"]
  info = introspected.get(module)
  if info is None:
    return [f"{prefix}{module} was not introspected"]
  if info.get("error"):
    return [f"{prefix}{module} could not run: {info['error']}"]
  if info["argparse"]:
    return [prefix + p for p in check_argparse(module, args, info)]
  return [prefix + p for p in check_absl(module, args, info, introspected)]


def check_pytest(args, markers) -> list:
  """Paths exist; every marker an `-m` expression names is registered (`markers`: pytest's
  own list, so pytest.ini, pyproject.toml and conftest.py registrations all count)."""
  problems = []
  takes_value = {"-n", "--dist", "-m", "-k", "-p", "--maxfail", "--durations", "-c"}
  i = 0
  while i < len(args):
    arg = args[i]
    if arg in takes_value:
      value = args[i + 1] if i + 1 < len(args) else ""
      if arg == "-m":
        for name in re.findall(r"[A-Za-z_]\w*", value):
          if name not in ("and", "or", "not") and name not in markers:
            problems.append(f"pytest -m {value!r}: marker {name!r} is not registered "
                            "(the expression would select every test)")
      i += 2
      continue
    if not arg.startswith("-") and not os.path.exists(os.path.join(ROOT, arg.split("::")[0])):
      problems.append(f"pytest: no path {arg}")
    i += 1
  return problems


def check_pip(args) -> list:
  problems = []
  for i, arg in enumerate(args):
    value = args[i + 1] if i + 1 < len(args) else ""
    if arg in ("-r", "--requirement") and not os.path.isfile(os.path.join(ROOT, value)):
      problems.append(f"pip install -r {value}: no such file")
    if arg in ("-e", "--editable"):
      folder = os.path.join(ROOT, re.sub(r"\[.*\]$", "", value))
      if not any(os.path.isfile(os.path.join(folder, f)) for f in ("pyproject.toml", "setup.py")):
        problems.append(f"pip install -e {value}: no pyproject.toml or setup.py there")
  return problems


def check_command(argv, introspected, markers=()) -> tuple:
  """(problems, skip reason or None) for one simple command; `markers`: pytest's markers."""
  program = os.path.basename(argv[0])
  found = python_module(argv)
  if found:
    module, args = found
    if module == "pytest":
      return check_pytest(args, markers), None
    if module == "pip":
      return check_pip(args), None
    if not is_project(module):
      return [], f"python -m {module}: not this project's module"
    return check_python(module, args, introspected), None
  if is_python(argv[0]):
    return [f"{' '.join(argv)}: only `python -m <module>` commands are checked; use one"], None
  if program in ("pip", "pip3"):
    return check_pip(argv[1:]), None
  if program in SKIPPED:
    return [], f"{program}: {SKIPPED[program]}"
  return [f"{program}: unknown program; add it to SKIPPED in {os.path.basename(__file__)} "
          "with the reason, or check it"], None


# --- running modules: one helper process, a fork per run --------------------------------------

# Imported once by the helper before it forks (what most modules import at start-up).
HEAVY = ("numpy", "jax", "jax.numpy", "flax.linen", "optax", "orbax.checkpoint", "grain",
         "ml_collections", "absl.app", "absl.flags", "absl.logging", "sentencepiece",
         "tensorflow_datasets", "qwix", "safetensors", "tokenizers")


def _run_job(module, argv, result_path):
  """In a forked child: run `python -m module argv`; write rc and the flags it defines."""
  parsers = []
  original_init = argparse.ArgumentParser.__init__

  def recording_init(self, *a, **k):
    original_init(self, *a, **k)
    parsers.append(self)

  argparse.ArgumentParser.__init__ = recording_init
  sys.argv = [module] + list(argv)
  rc, error = 0, None
  try:
    import runpy
    runpy.run_module(module, run_name="__main__", alter_sys=True)
  except SystemExit as e:
    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except BaseException as e:  # pylint: disable=broad-except
    import traceback
    traceback.print_exc()
    rc, error = 1, f"{type(e).__name__}: {e}"
  sys.stdout.flush()
  sys.stderr.flush()
  found = {}
  if "absl.flags" in sys.modules:
    from absl import flags
    for name in flags.FLAGS:
      flag = flags.FLAGS[name]
      found[name] = {"bool": bool(flag.boolean), "config": "Config" in type(flag).__name__}
  parsed = None
  if parsers:
    def describe(parser):
      options, positionals, subcommands = {}, [], {}
      for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
          subcommands = {name: describe(sub) for name, sub in action.choices.items()}
        elif action.option_strings:
          options.update({o: action.nargs != 0 for o in action.option_strings})
        else:
          positionals.append(action.dest)
      return {"options": options, "positionals": positionals, "subcommands": subcommands}
    subs = {id(p) for parser in parsers for a in parser._actions
            if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()}
    top = [p for p in parsers if id(p) not in subs]
    named = [p for p in top if module.rsplit(".", 1)[-1] in (p.prog or "")]
    parsed = describe((named or top)[0]) if top else None
  with open(result_path, "w") as f:
    json.dump({"rc": rc, "error": error, "flags": found, "argparse": parsed}, f)


def _driver(jobs_path, out_path, timeout_s=120):
  """Run every job of jobs_path ([[key, module, argv], ...]) in a forked child."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, ROOT)
  for name in HEAVY:
    try:
      importlib.import_module(name)
    except Exception:  # pylint: disable=broad-except
      pass
  with open(jobs_path) as f:
    jobs = json.load(f)
  results = {}
  work = tempfile.mkdtemp(prefix="readme_cmds_")
  for n, (key, module, argv) in enumerate(jobs):
    log, result = os.path.join(work, f"{n}.log"), os.path.join(work, f"{n}.json")
    started = time.time()
    pid = os.fork()
    if pid == 0:
      try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        _run_job(module, argv, result)
      finally:
        os._exit(0)
    while True:
      done, _ = os.waitpid(pid, os.WNOHANG)
      if done or time.time() - started > timeout_s:
        break
      time.sleep(0.02)
    if not done:
      os.kill(pid, 9)
      os.waitpid(pid, 0)
    output = open(log, errors="replace").read() if os.path.exists(log) else ""
    if os.path.exists(result):
      with open(result) as f:
        entry = json.load(f)
    else:
      entry = {"rc": None, "error": f"no result (timed out after {timeout_s} s?)", "flags": {},
               "argparse": None}
    entry["head"], entry["output"] = output[:500], output[-3000:]
    entry["seconds"] = round(time.time() - started, 2)
    results[key] = entry
  with open(out_path, "w") as f:
    json.dump(results, f)


def run_modules(jobs):
  """{key: result} for jobs [(key, module, argv)], run by one helper process."""
  work = tempfile.mkdtemp(prefix="readme_cmds_")
  jobs_path, out_path = os.path.join(work, "jobs.json"), os.path.join(work, "out.json")
  with open(jobs_path, "w") as f:
    json.dump([list(job) for job in jobs], f)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  done = subprocess.run([sys.executable, os.path.abspath(__file__), "--driver", jobs_path,
                         out_path], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(out_path) as f:
    return json.load(f)


def _help_ok(entry) -> bool:
  """--help printed the usage: exit 0, or absl's documented exit 1 after its usage text."""
  if entry["rc"] == 0:
    return not entry["error"]
  return entry["rc"] == 1 and "Try --helpfull" in entry["output"] and not entry["error"]


# --- the tests --------------------------------------------------------------------------------

with open(README, encoding="utf-8") as _f:
  COMMANDS = commands_in(_f.read())
SPECS = config_specs(COMMANDS)

SYNTHETIC_README = """\
Some prose.
```bash
$ python -m train.main --config=configs/legal_pretrain.py:tiny --workdir=runs/x \\
    --config.optim.lr=1e-3   # a comment
XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python -m train.main \\
    --config=configs/legal_pretrain.py:tiny --no_such_flag=1
python -m train.main --config=configs/legal_pretrain.py:tiny --config.optim.lrr=1e-3
python -m train.main --config=configs/legal_pretrain.py:tiny --config.train.num_steps=abc
python -m train.no_such_module --workdir=runs/x
python3 -m venv .venv && .venv/bin/pip install -r no-such-requirements.txt && git status
python -m infer.serve --workdir=runs/x --prot=8000
python -m launch.local --num_processes=2 -- --config=configs/legal_pretrain.py:tiny --wrokdir=r
python -m launch.cluster slrum --config=configs/legal_pretrain.py --workdir=runs/x
python -m pytest -q -m "not no_such_marker" tests
frobnicate --all
```
```python
python -m not.a.shell.block
```
"""


@pytest.fixture(scope="session")
def introspected():
  """{module: its flags, parsers and --help result} for the README's and the synthetic
  snippet's project modules, and {"print_config <file>": result} for each config file."""
  modules = set(project_modules(COMMANDS)) | set(project_modules(commands_in(SYNTHETIC_README)))
  jobs = [(module, module, ["--help"]) for module in sorted(modules) if module_exists(module)]
  jobs += [(f"print_config {path}", "train.main", [f"--config={spec}", "--print_config"])
           for path, spec in sorted(SPECS.items())]
  started = time.time()
  results = run_modules(jobs)
  results["_seconds"] = time.time() - started
  return results


@pytest.fixture(scope="session")
def markers(pytestconfig):
  """The registered marker names, as pytest itself knows them."""
  return {re.split(r"[(:]", line.strip(), maxsplit=1)[0].strip()
          for line in pytestconfig.getini("markers") if line.strip()}


def test_commands_found():
  modules = project_modules(COMMANDS)
  assert "train.main" in modules and len(COMMANDS) > 20, (len(COMMANDS), modules)


def test_parser_on_shell_syntax():
  commands = commands_in(SYNTHETIC_README)
  first, second = commands[0], commands[1]
  assert first.line == 3 and first.argv == [
      "python", "-m", "train.main", "--config=configs/legal_pretrain.py:tiny",
      "--workdir=runs/x", "--config.optim.lr=1e-3"]
  assert second.line == 5 and second.argv[:3] == [".venv/bin/python", "-m", "train.main"]
  chain = [c.argv[0] for c in commands if c.line == 10]
  assert chain == ["python3", ".venv/bin/pip", "git"]
  assert not any("not.a.shell.block" in c.text for c in commands)
  assert simple_commands("nohup python -m a --x=1 > log 2>&1 &") == [
      ["python", "-m", "a", "--x=1"]]
  assert simple_commands("A=1 B=2 python -m a | head -3") == [["python", "-m", "a"],
                                                                ["head", "-3"]]


def test_checker_catches_mistakes(introspected, markers):
  """Every wrong line of the synthetic README is reported; the right one is not."""
  found = {}
  for command in commands_in(SYNTHETIC_README):
    problems, skip = check_command(command.argv, introspected, markers)
    found.setdefault(command.line, []).extend(problems + ([f"skip: {skip}"] if skip else []))
  expect = {
      3: None,                                   # correct
      5: "--no_such_flag: not a flag of train.main",
      7: "lrr",                                  # a config key that does not exist
      8: "could not convert|invalid literal",    # a value of the wrong type
      9: "no module train.no_such_module",
      10: "no-such-requirements.txt: no such file",
      11: r"--prot: not a flag of infer.serve \(did you mean --port\?\)",
      12: "after launch.local's --: --wrokdir: not a flag of train.main",
      13: "launch.cluster needs one of tpu-pod",
      14: "marker 'no_such_marker' is not registered",
      15: "frobnicate: unknown program",
  }
  for line, pattern in expect.items():
    problems = [p for p in found[line] if not p.startswith("skip: ")]
    if pattern is None:
      assert not problems, (line, problems)
    else:
      assert any(re.search(pattern, p) for p in problems), (line, found[line])
  assert any("git: " in p for p in found[10])     # skipped, with its reason


@pytest.mark.parametrize("module", project_modules(COMMANDS))
def test_module_help(module, introspected):
  if not module_exists(module):
    pytest.fail(f"README runs python -m {module}, which does not exist")
  entry = introspected[module]
  assert _help_ok(entry), f"python -m {module} --help: exit {entry['rc']}\n{entry['output']}"


@pytest.mark.parametrize("path", sorted(SPECS))
def test_print_config(path, introspected):
  entry = introspected[f"print_config {path}"]
  assert entry["rc"] == 0 and not entry["error"] and " keys" in entry["head"], (
      f"python -m train.main --config={SPECS[path]} --print_config: exit {entry['rc']}\n"
      f"{entry['head']}\n...\n{entry['output']}")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.label)
def test_readme_command(command, introspected, markers):
  problems, skip = check_command(command.argv, introspected, markers)
  if skip and not problems:
    pytest.skip(skip)
  assert not problems, (f"README.md line {command.line}: {command.text}\n  " +
                        "\n  ".join(problems))


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--driver":
  _driver(sys.argv[2], sys.argv[3])
