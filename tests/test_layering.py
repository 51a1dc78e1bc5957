"""The package layering (README "Layout and layering"), checked by parsing every import.

Bottom to top: model/ (with the tokenizer, data errors and checkpoint I/O) -> eval/ (pure
evaluators) -> infer/ -> train/ -> bench/ and launch/. A module imports only from its own layer
or below; configs/ is plain data beside them and imports only itself. Entry points (`main.py`)
may wire layers together from above but are never imported as a library.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYER = {"configs": 0, "model": 1, "eval": 2, "infer": 3, "train": 4, "bench": 5, "launch": 5}


def _imports(path: pathlib.Path):
  """(line, imported module) of every absolute import in `path`, lazy ones inside functions too."""
  tree = ast.parse(path.read_text(encoding="utf-8"))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      yield node.lineno, node.module
      for alias in node.names:   # `from train import main` imports train.main
        yield node.lineno, f"{node.module}.{alias.name}"


def _project_files():
  for package in LAYER:
    yield from sorted((ROOT / package).rglob("*.py"))


def _cross_package_imports():
  """(file, line, source package, imported module, its package) of every import from one
  project package into another, entry points (main.py) left out."""
  for path in _project_files():
    if path.name == "main.py":
      continue
    src = path.relative_to(ROOT).parts[0]
    for line, module in _imports(path):
      dst = module.split(".")[0]
      if dst in LAYER and dst != src:
        yield path.relative_to(ROOT), line, src, module, dst


def test_every_top_level_package_has_a_layer():
  packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()} - {"tests"}
  assert packages <= set(LAYER), f"packages without a layer: {packages - set(LAYER)}"


def test_no_module_imports_from_a_layer_above_it():
  problems = [f"{path}:{line} imports {module} ({src} is below {dst})"
              for path, line, src, module, dst in _cross_package_imports()
              if LAYER[dst] > LAYER[src] or src == "configs"]
  assert not problems, "\n".join(problems)


def test_no_two_packages_import_each_other():
  edges = {}
  for path, line, src, _, dst in _cross_package_imports():
    edges.setdefault((src, dst), f"{path}:{line}")
  cycles = [f"{a} <-> {b} ({edges[(a, b)]} / {edges[(b, a)]})"
            for (a, b) in edges if (b, a) in edges and a < b]
  assert not cycles, "\n".join(cycles)


def test_entry_points_are_not_imported_as_libraries():
  mains = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in _project_files()
           if p.name == "main.py"}
  problems = [f"{path.relative_to(ROOT)}:{line} imports {module}"
              for path in _project_files() for line, module in _imports(path) if module in mains]
  assert not problems, "\n".join(problems)



def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_cycles() -> list[list[str]]:
  """Every circle of imports among the modules of one package (main.py entry points too, lazy
  imports inside functions too), as the modules on it: a cycle-free graph has none."""
  modules = {_module_name(p): p for p in _project_files()}
  graph = {}
  for name, path in modules.items():
    found = [(line, m) for line, m in _imports(path) if m in modules and m != name]
    # `from pkg import mod` needs pkg/__init__ only to find mod: an edge to mod, not to pkg.
    deps = {m for line, m in found
            if not any(other.startswith(m + ".") and at == line for at, other in found)}
    graph[name] = {m for m in deps if m.split(".")[0] == name.split(".")[0]}
  cycles, state = [], {}    # state: 1 on the current path, 2 done

  def visit(node, path):
    state[node] = 1
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        cycles.append(path[path.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  return cycles


def test_no_import_circle_inside_a_package():
  cycles = _import_cycles()
  assert not cycles, "\n".join(" -> ".join(c) for c in cycles)

@pytest.mark.parametrize("bad, expected", [
    ("from train import loop\n", "imports train.loop (model is below train)"),
    ("import bench.step_time\n", "imports bench.step_time (model is below bench)"),
])
def test_the_check_catches_an_upward_import(tmp_path, monkeypatch, bad, expected):
  """The rule must be able to fail: a model/ module importing upward is reported."""
  fake_root = tmp_path / "repo"
  (fake_root / "model").mkdir(parents=True)
  (fake_root / "model" / "__init__.py").write_text("")
  (fake_root / "model" / "bad.py").write_text(bad)
  monkeypatch.setattr(__import__(__name__), "ROOT", fake_root)
  with pytest.raises(AssertionError, match=expected.replace("(", r"\(").replace(")", r"\)")):
    test_no_module_imports_from_a_layer_above_it()


def test_the_cycle_check_catches_a_lazy_import_circle(tmp_path, monkeypatch):
  """Two modules of one package importing each other, one of them inside a function."""
  fake_root = tmp_path / "repo"
  (fake_root / "infer").mkdir(parents=True)
  (fake_root / "infer" / "__init__.py").write_text("")
  (fake_root / "infer" / "a.py").write_text("from infer import b\n")
  (fake_root / "infer" / "b.py").write_text("def f():\n  from infer import a\n")
  monkeypatch.setattr(__import__(__name__), "ROOT", fake_root)
  assert _import_cycles() == [["infer.a", "infer.b", "infer.a"]]
