r"""Reliability drills: break a tiny training run on purpose and check it fails or recovers as
docs/launch.md promises.

  python -m launch.drill                    # every drill (5-7 min on 2 CPU cores)
  python -m launch.drill --fast             # only those no other test repeats (~2 min)
  python -m launch.drill --only=corrupt_checkpoint,unknown_key --keep_dir=/tmp/drills

Every drill runs `python -m train.main` in subprocesses with a tiny model on a corpus generated
in a temporary folder (no network, no shared data, no GPU), then prints one row: drill, what is
expected, what was observed, PASS or FAIL; the exit code is 1 if any drill fails. The corpus
holds one malformed JSONL line, so the reference run (data.bad_lines=skip) is itself the skip
drill. Bad-input drills run against a copy of the finished reference run and also check that its
checkpoints are byte-for-byte unchanged afterwards.
"""
import dataclasses
import hashlib
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = (sys.executable, "-m", "train.main")
NUM_STEPS, EVERY = 30, 10
BAD_LINE = 7          # the malformed line of corpus/more.jsonl
TINY = {              # a 1-layer model on 32-token rows: a run is mostly start-up and compile
    "data.use_licensedcode": False, "data.vocab_size": 384, "data.seq_len": 32,
    "data.batch_size": 8, "data.validation_fraction": 0.1, "data.prefetch": 2,
    "data.bad_lines": "skip", "model.num_layers": 1, "model.d_model": 32, "model.num_heads": 2,
    "model.num_kv_heads": 1, "model.head_dim": 16, "model.mlp_dim": 64,
    "optim.warmup_steps": 5, "train.num_steps": NUM_STEPS, "train.log_every": 1,
    "train.eval_every": NUM_STEPS, "train.eval_batches": 2, "train.checkpoint_every": EVERY,
}
_WORDS = ("agreement party licensor licensee shall grant right license software term notice "
          "written consent breach damages liability warranty confidential obligation payment "
          "fee royalty territory court governing law arbitration clause section assignment "
          "property patent copyright use copy modify distribute permission condition").split()

_ONLY = flags.DEFINE_list("only", None, "Run only these drills (names as in the table).")
_FAST = flags.DEFINE_bool("fast", False, "Leave out the drills other tests already run "
                          "(tests/test_train_e2e.py: bad flags, mesh, missing folder, non-finite "
                          "loss, SIGTERM) and the non-finite skip policy.")
_KEEP_DIR = flags.DEFINE_string("keep_dir", None, "Work here and keep the runs (default: a "
                                "temporary folder, deleted).")


def write_corpus(root: pathlib.Path) -> pathlib.Path:
  """60 .txt documents and a 60-line JSONL file whose line BAD_LINE is malformed."""
  root.mkdir(parents=True)
  rng = random.Random(0)

  def doc():
    return " ".join(" ".join(rng.choices(_WORDS, k=rng.randint(6, 15))).capitalize() + "."
                    for _ in range(rng.randint(3, 11)))
  for i in range(60):
    (root / f"doc_{i:03d}.txt").write_text(doc(), encoding="utf-8")
  lines = [json.dumps({"text": doc()}) for _ in range(60)]
  lines[BAD_LINE - 1] = '{"text": "a record cut off mid-write'
  (root / "more.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  return root


def losses(workdir) -> dict:
  """{step: train loss}; where a resumed run re-logged a step, its value wins."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def checkpoint_steps(workdir) -> list:
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def digest(folder) -> str:
  """A hash of every file's path and bytes under `folder`."""
  h = hashlib.sha256()
  for path in sorted(pathlib.Path(folder).rglob("*")):
    if path.is_file():
      h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
  return h.hexdigest()[:16]


class Lab:
  """What the drills share: the corpus, the dataset cache and the reference run."""

  def __init__(self, root):
    self.root = pathlib.Path(root)
    self.corpus = write_corpus(self.root / "corpus")
    self.data_dir = self.root / "data_cache"
    self._reference = None
    self._victim = None
    self.env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                    XLA_FLAGS="--xla_force_host_platform_device_count=1")
    self.env.pop("JAX_COORDINATOR_ADDRESS", None)

  def args(self, workdir, corpus=None, **overrides) -> list:
    config = {**TINY, "data.extra_dirs": f"('{corpus or self.corpus}',)",
              "data.data_dir": str(self.data_dir), **overrides}
    return (["--config=configs/legal_pretrain.py:tiny", f"--workdir={workdir}"] +
            [f"--config.{k}={v}" for k, v in config.items()])

  def run(self, args) -> subprocess.CompletedProcess:
    return subprocess.run([*TRAIN, *args], cwd=REPO, env=self.env, capture_output=True,
                          text=True, timeout=900)

  def start(self, args, log_path) -> subprocess.Popen:
    with open(log_path, "w") as log:   # a file, not a pipe: a full pipe would block the run
      return subprocess.Popen([*TRAIN, *args], cwd=REPO, env=self.env,
                              stdout=subprocess.DEVNULL, stderr=log)

  def workdir(self, name) -> pathlib.Path:
    return self.root / "runs" / name

  @property
  def reference(self):
    """(workdir, stderr) of an uninterrupted run; every comparison of losses is against it."""
    if self._reference is None:   # run once, even when it fails
      workdir = self.workdir("reference")
      self._reference = workdir, self.run(self.args(workdir))
    workdir, result = self._reference
    if result.returncode:
      raise RuntimeError(f"the reference run failed: {error_line(result.stderr)}")
    return workdir, result.stderr

  @property
  def victim(self):
    """A finished run the bad-input drills point at; their errors must leave it intact."""
    if self._victim is None:
      self._victim = self.workdir("victim")
      shutil.copytree(self.reference[0], self._victim)
    return self._victim


def last_line(text: str) -> str:
  lines = [line for line in text.strip().splitlines() if line.strip()]
  return lines[-1][:240] if lines else "(no output)"


def error_line(text: str) -> str:
  """The last `error: ...` line train.main printed, else the last line."""
  errors = [line for line in text.splitlines() if line.startswith("error: ")]
  return errors[-1][:240] if errors else last_line(text)


@dataclasses.dataclass(frozen=True)
class Drill:
  name: str
  expected: str
  check: object          # Lab -> (observed, passed)
  fast: bool = True      # False: another test covers it, or it is slow; left out by --fast


DRILLS = []


def drill(name: str, expected: str, fast: bool = True):
  def register(check):
    DRILLS.append(Drill(name, expected, check, fast))
    return check
  return register


def _error_row(result, code: int, needles):
  """Exit `code` and a one-line error containing every needle, no traceback."""
  line = error_line(result.stderr)
  passed = (result.returncode == code and "Traceback" not in result.stderr and
            all(n in line for n in needles))
  return f"exit {result.returncode}: {line}", passed


def _expect_error(lab: Lab, code: int, needles, *, corpus=None, **overrides):
  """Runs against the victim: the error of _error_row, and its checkpoints left unchanged."""
  before = digest(lab.victim / "checkpoints")
  observed, passed = _error_row(lab.run(lab.args(lab.victim, corpus, **overrides)), code,
                                needles)
  if digest(lab.victim / "checkpoints") != before:
    return f"{observed}; CHECKPOINTS CHANGED", False
  return observed, passed


def _folder(lab: Lab, name: str, files: dict) -> pathlib.Path:
  folder = lab.root / "inputs" / name
  folder.mkdir(parents=True)
  for file_name, data in files.items():
    (folder / file_name).write_bytes(data)
  return folder


def _resumed_identically(lab: Lab, workdir, at: int):
  """Reruns `workdir`'s command to the end: it must resume from `at` and log the reference
  run's losses exactly."""
  result = lab.run(lab.args(workdir))
  resumed = f"resumed from step {at}" in result.stderr
  same = result.returncode == 0 and losses(workdir) == losses(lab.reference[0])
  return (f"rerun: exit {result.returncode}, {'resumed' if resumed else 'did not resume'} from "
          f"step {at}, losses {'identical to' if same else 'DIFFERENT from'} the reference",
          resumed and same)


def _interrupt(lab: Lab, name: str, ready, sig):
  """Starts a run and sends `sig` once `ready(workdir)` holds; (workdir, exit code, log)."""
  workdir = lab.workdir(name)
  workdir.mkdir(parents=True)
  log = workdir.parent / f"{name}.log"
  proc = lab.start(lab.args(workdir), log)
  deadline = time.time() + 600
  while not ready(workdir):
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      raise RuntimeError("the run ended before it could be interrupted: "
                         f"{last_line(log.read_text())}")
    time.sleep(0.001)
  proc.send_signal(sig)
  return workdir, proc.wait(timeout=600), log.read_text()


@drill("malformed_jsonl_skip", f"data.bad_lines=skip: warning names more.jsonl:{BAD_LINE}, "
       "counts 1 skipped line, run finishes")
def _malformed_skip(lab):
  log = lab.reference[1]
  named = f"more.jsonl:{BAD_LINE}: malformed JSON line" in log
  counted = "skipped 1 bad JSONL lines" in log
  return (f"exit 0; warning names the line: {named}; count logged: {counted}", named and counted)


@drill("malformed_jsonl_fail", f"data.bad_lines=fail: exit 2 naming more.jsonl:{BAD_LINE}")
def _malformed_fail(lab):
  return _expect_error(lab, 2, [f"more.jsonl:{BAD_LINE}: malformed JSON"],
                       **{"data.bad_lines": "fail"})


@drill("unknown_key", "exit 2 naming the key", fast=False)
def _unknown_key(lab):
  return _expect_error(lab, 2, ["no_such_key"], **{"model.no_such_key": 1})


@drill("wrong_type", "exit 2 naming the key", fast=False)
def _wrong_type(lab):
  return _expect_error(lab, 2, ["num_steps"], **{"train.num_steps": "abc"})


@drill("mesh_mismatch", "exit 2: the mesh does not multiply to the device count",
       fast=False)
def _mesh_mismatch(lab):
  return _expect_error(lab, 2, ["config.mesh", "1 devices"], **{"mesh.data": 3})


@drill("missing_data_folder", "exit 2 naming the folder", fast=False)
def _missing_folder(lab):
  return _expect_error(lab, 2, ["/no/such/folder", "not an existing folder"],
                       corpus="/no/such/folder")


@drill("empty_data_folder", "exit 2: the folder has no documents")
def _empty_folder(lab):
  folder = _folder(lab, "empty", {"notes.md": b"not a document"})
  return _expect_error(lab, 2, [str(folder), "has no"], corpus=folder)


@drill("non_utf8_text", "exit 2 naming the file")
def _non_utf8(lab):
  folder = _folder(lab, "latin1", {"contract.txt": "Café de Flore, licensor.".encode("latin-1")})
  return _expect_error(lab, 2, ["contract.txt", "not valid UTF-8"], corpus=folder)


@drill("empty_corpus", "exit 2: no non-empty documents")
def _empty_corpus(lab):
  folder = _folder(lab, "blank", {"a.txt": b"  \n", "b.jsonl": b'{"text": " "}\n'})
  return _expect_error(lab, 2, ["empty corpus"], corpus=folder)


@drill("vocab_mismatch", "resume with another data.vocab_size: exit 2 naming the embedding")
def _vocab_mismatch(lab):
  return _expect_error(lab, 2, ["embedding", "vocab_size"], **{"data.vocab_size": 512})


@drill("disk_full", "exit 2 before training: workdir, free and needed bytes")
def _disk_full(lab):
  # ~1e13 parameters: no disk holds 4 checkpoints of them.
  return _expect_error(lab, 2, ["bytes free but the run needs"],
                       **{"model.d_model": 2**20, "model.mlp_dim": 2**22})


@drill("unwritable_workdir", "exit 2 naming the workdir")
def _unwritable(lab):
  blocker = lab.root / "a_file"
  blocker.write_text("a file where the run's parent folder should be")
  result = lab.run(lab.args(blocker / "run"))
  return _error_row(result, 2, [str(blocker / "run"), "not writable"])


# Step 1's update with this learning rate makes every later gradient non-finite.
_DIVERGE = {"optim.lr": 1e30, "optim.warmup_steps": 0, "optim.clip_norm": 0.0,
            "train.checkpoint_every": 1, "train.num_steps": 20}


@drill("nonfinite_loss", "exit 3 at step 2; only the finite step-1 checkpoint exists",
       fast=False)
def _nonfinite(lab):
  workdir = lab.workdir("nonfinite")
  observed, passed = _error_row(lab.run(lab.args(workdir, **_DIVERGE)), 3,
                                ["non-finite loss at step 2"])
  steps = checkpoint_steps(workdir)
  return f"{observed}; checkpoints {steps}", passed and steps == [1]


@drill("nonfinite_skip", "config.train.nonfinite=skip: each skipped step is logged; N in a "
       "row still stop the run (exit 3)", fast=False)
def _nonfinite_skip(lab):
  result = lab.run(lab.args(lab.workdir("nonfinite_skip"), **_DIVERGE,
                            **{"train.nonfinite": "skip"}))
  observed, passed = _error_row(result, 3, ["steps in a row"])
  limit = re.search(r"non-finite loss at (\d+) steps in a row", result.stderr)
  skipped = re.findall(r"step (\d+): non-finite loss .* update skipped", result.stderr)
  # Steps 2 .. N (N - 1 of them) are skipped with a warning; the next, the N-th in a row, stops.
  expected = [str(s) for s in range(2, int(limit.group(1)) + 1)] if limit else None
  return (f"{observed}; {len(skipped)} skipped steps logged",
          passed and skipped == expected)


@drill("kill9_mid_save", f"kill -9 while step {2 * EVERY} is being written: it is never "
       f"restored; the rerun resumes from step {EVERY} with identical losses")
def _kill_mid_save(lab):
  step = 2 * EVERY
  tmp = f"{step}.orbax-checkpoint-tmp"
  workdir, code, _ = _interrupt(lab, "kill9", lambda w: (w / "checkpoints").is_dir() and any(
      n.startswith(tmp) for n in os.listdir(w / "checkpoints")), signal.SIGKILL)
  mid_save = step not in checkpoint_steps(workdir)
  observed, passed = _resumed_identically(lab, workdir, EVERY)
  return (f"exit {code} with step {step} {'half-written' if mid_save else 'ALREADY COMPLETE'}; "
          f"{observed}", code == -signal.SIGKILL and mid_save and passed)


@drill("corrupt_checkpoint", f"latest step {NUM_STEPS} truncated: warning names it, restores "
       f"step {NUM_STEPS - EVERY}, identical losses, damaged step set aside")
def _corrupt(lab):
  workdir = lab.workdir("corrupt")
  shutil.copytree(lab.reference[0], workdir)
  arrays = [p for p in (workdir / "checkpoints" / str(NUM_STEPS) / "state").rglob("*")
            if p.is_file() and p.parent.name == "d"]
  largest = max(arrays, key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])
  result = lab.run(lab.args(workdir))
  warned = f"checkpoint step {NUM_STEPS} in" in result.stderr and "unusable" in result.stderr
  fell_back = f"restored step {NUM_STEPS - EVERY} instead of {NUM_STEPS}" in result.stderr
  same = result.returncode == 0 and losses(workdir) == losses(lab.reference[0])
  set_aside = any(n.startswith(f"{NUM_STEPS}.unusable")
                  for n in os.listdir(workdir / "checkpoints"))
  return (f"exit {result.returncode}; warning: {warned}; fell back: {fell_back}; losses "
          f"{'identical' if same else 'DIFFERENT'}; set aside: {set_aside}",
          warned and fell_back and same and set_aside)


@drill("sigterm_preemption", f"SIGTERM after step {EVERY}'s checkpoint: checkpoint, exit 0; the "
       "rerun resumes with identical losses", fast=False)
def _sigterm(lab):
  workdir, code, log = _interrupt(lab, "sigterm", lambda w: EVERY in checkpoint_steps(w),
                                  signal.SIGTERM)
  at = checkpoint_steps(workdir)[-1]
  observed, passed = _resumed_identically(lab, workdir, at)
  preempted = f"preempted at step {at}" in log
  return (f"exit {code}, checkpoint at step {at}; {observed}",
          code == 0 and preempted and at < NUM_STEPS and passed)


def run_drills(root, names=None, fast: bool = False) -> list:
  """[(drill, observed, passed)] for the selected drills, in table order."""
  lab = Lab(root)
  rows = []
  for d in DRILLS:
    if (names and d.name not in names) or (fast and not d.fast):
      continue
    start = time.time()
    try:
      observed, passed = d.check(lab)
    except Exception as e:   # a broken drill is a failed drill, with its reason in the table
      observed, passed = f"{type(e).__name__}: {e}", False
    rows.append((d, observed, passed))
    print(f"{'PASS' if passed else 'FAIL'}  {d.name} ({time.time() - start:.0f}s): {observed}",
          flush=True)
  return rows


def table(rows) -> str:
  lines = ["| drill | expected | observed | result |", "| --- | --- | --- | --- |"]
  lines += [f"| {d.name} | {d.expected} | {observed.replace('|', '/')} | "
            f"{'pass' if passed else 'FAIL'} |" for d, observed, passed in rows]
  return "\n".join(lines)


def main(argv):
  del argv
  unknown = set(_ONLY.value or ()) - {d.name for d in DRILLS}
  if unknown:
    raise app.UsageError(f"unknown drills {sorted(unknown)}; expected some of "
                         f"{[d.name for d in DRILLS]}")
  root = _KEEP_DIR.value or tempfile.mkdtemp(prefix="drills_")
  try:
    rows = run_drills(root, _ONLY.value, _FAST.value)
  finally:
    if not _KEEP_DIR.value:
      shutil.rmtree(root, ignore_errors=True)
  print(table(rows))
  sys.exit(0 if all(passed for _, _, passed in rows) else 1)


if __name__ == "__main__":
  app.run(main)
