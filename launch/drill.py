r"""Reliability drills: break a tiny training run on purpose and check it fails or recovers as
docs/launch.md promises.

  python -m launch.drill                    # every drill (minutes on 2 CPU cores)
  python -m launch.drill --fast             # only those no other test repeats (faster)
  python -m launch.drill --only=corrupt_checkpoint,unknown_key --keep_dir=/tmp/drills

A drill is a pytest test marked `@pytest.mark.drill(name, expected)`: tests/test_drills.py holds
the drills no other test covers, tests/test_train_e2e.py marks the ones it already runs (bad
flags, the mesh, a missing folder, non-finite losses, SIGTERM). This command runs them with
pytest (`pytest -m drill tests/test_drills.py tests/test_train_e2e.py`, in this process) and
prints one row per drill: drill, what is expected, what was observed (the test's `observed`
property, else why it failed), PASS or FAIL; the exit code is 1 if any drill fails. It needs
pytest (requirements-test.txt).
"""
import dataclasses
import os
import shutil
import sys
import tempfile

from absl import app, flags

from model import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_COVERED = "tests/test_drills.py"       # the drills no other test repeats (--fast)
COVERED = "tests/test_train_e2e.py"        # tests that are also drills

_ONLY = flags.DEFINE_list("only", None, "Run only these drills (names as in the table).")
_FAST = flags.DEFINE_bool("fast", False, f"Run only {NOT_COVERED}: leave out the drills "
                          f"{COVERED} also runs (bad flags, mesh, missing folder, non-finite "
                          "loss and skip policy, SIGTERM).")
_KEEP_DIR = flags.DEFINE_string("keep_dir", None, "Work here (pytest's --basetemp; it must be "
                                "absent or empty) and keep the runs (default: a temporary "
                                "folder, deleted).")


@dataclasses.dataclass
class Row:
  name: str
  expected: str
  nodeid: str
  observed: str = ""
  failure: str = ""
  passed: bool | None = None    # None: no result yet (the test did not run to its call)
  seconds: float = 0.0


class DrillTable:
  """pytest plugin: keeps only the drill-marked tests (those named in `only`, if given) and
  collects one Row per drill from the test reports."""

  def __init__(self, only=None):
    self.only = set(only or ())
    self.rows = {}

  def pytest_collection_modifyitems(self, config, items):
    import pytest   # pylint: disable=import-outside-toplevel (only where pytest runs)
    markers = {item.nodeid: item.get_closest_marker("drill") for item in items}
    for nodeid, marker in markers.items():
      if marker and len(marker.args) != 2:
        raise pytest.UsageError(f"{nodeid}: expected @pytest.mark.drill(name, expected)")
    names = [m.args[0] for m in markers.values() if m]
    unknown = self.only - set(names)
    if unknown:
      raise pytest.UsageError(f"unknown drills {sorted(unknown)}; expected some of {names}")
    keep = [i for i in items if markers[i.nodeid] and
            (not self.only or markers[i.nodeid].args[0] in self.only)]
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep
    for item in keep:
      name, expected = markers[item.nodeid].args
      self.rows[item.nodeid] = Row(name, expected, item.nodeid)

  def pytest_runtest_logreport(self, report):
    row = self.rows.get(report.nodeid)
    if row is None:
      return
    row.seconds += report.duration
    observed = dict(report.user_properties).get("observed")
    if observed:
      row.observed = str(observed)
    if report.failed or report.skipped:
      row.passed = False
      crash = getattr(report.longrepr, "reprcrash", None)
      text = getattr(crash, "message", None) or str(report.longrepr)
      row.failure = row.failure or (("skipped: " if report.skipped else "") +
                                    text.strip().splitlines()[0][:240])
    elif report.when == "call" and row.passed is None:
      row.passed = True


def observed(row: Row) -> str:
  text = row.observed or ("" if row.failure else f"passed: {row.nodeid}")
  if row.failure:
    text = f"{text}; {row.failure}" if text else row.failure
  return text or "(did not run)"


def table(rows) -> str:
  lines = ["| drill | expected | observed | result |", "| --- | --- | --- | --- |"]
  lines += [f"| {r.name} | {r.expected} | {observed(r).replace('|', '/')} | "
            f"{'pass' if r.passed else 'FAIL'} |" for r in rows]
  return "\n".join(lines)


def run_drills(basetemp, only=None, fast: bool = False):
  """(pytest's exit code, [Row]) for the selected drills, in collection order."""
  try:
    import pytest   # pylint: disable=import-outside-toplevel
  except ImportError:
    sys.exit("error: the drills run under pytest: pip install -r requirements-test.txt")
  files = [NOT_COVERED] if fast and not only else [NOT_COVERED, COVERED]
  plugin = DrillTable(only)
  code = pytest.main(
      ["-q", "-m", "drill", "-p", "no:cacheprovider", f"--rootdir={REPO}",
       "-c", os.path.join(REPO, "pytest.ini"), f"--basetemp={basetemp}",
       *(os.path.join(REPO, f) for f in files)], plugins=[plugin])
  return int(code), list(plugin.rows.values())


def main(argv):
  del argv
  keep = _KEEP_DIR.value
  if keep and os.path.exists(keep) and (not os.path.isdir(keep) or os.listdir(keep)):
    raise app.UsageError(f"--keep_dir={keep} must be absent or an empty folder (pytest "
                         "empties its --basetemp)")
  root = os.path.abspath(keep) if keep else tempfile.mkdtemp(prefix="drills_")
  try:
    code, rows = run_drills(root, _ONLY.value, _FAST.value)
  finally:
    if not keep:
      shutil.rmtree(root, ignore_errors=True)
  if not rows:   # a usage error (pytest printed it) or nothing collected
    print(f"error: no drill ran (pytest exit code {code})", file=sys.stderr)
    sys.exit(2)
  print(table(rows))
  sys.exit(0 if code == 0 and all(r.passed for r in rows) else 1)


if __name__ == "__main__":
  app.run(errors.exit_on_user_error(main))
