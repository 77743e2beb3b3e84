"""The layout's import rules, read from the source with ast (nothing is imported):

  * no import cycle between modules (function-level imports count too);
  * pallas_kernels imports nothing of moejax, configs, experiments or benchmarks;
  * moejax imports nothing of configs, experiments, benchmarks or scripts;
  * the generic layers (moejax outside moejax/papers/) import no paper package;
  * nothing edits sys.path in the library, the kernels, the configs, the
    experiments, the tests or run.py.
docs/design.md shows these rules as a table.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("moejax", "pallas_kernels", "configs", "experiments", "benchmarks", "tests")


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _python_files(top: str) -> list[str]:
  out = []
  for folder, _, files in os.walk(os.path.join(ROOT, top)):
    out += [os.path.join(folder, f) for f in files if f.endswith(".py")]
  return sorted(out)


def _modules() -> dict[str, str]:
  """Every module of the project's packages: dotted name -> file."""
  return {_module_name(p): p for top in PACKAGES for p in _python_files(top)}


MODULES = _modules()


def _is_package(name: str) -> bool:
  return MODULES.get(name, "").endswith("__init__.py")


def imports_of(path: str) -> set[str]:
  """The project modules a file imports, anywhere in it."""
  name = _module_name(path)
  package = name if _is_package(name) else name.rpartition(".")[0]
  tree = ast.parse(open(path).read(), path)
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod.
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                 for a in node.names]
    else:
      continue
    for target in targets:
      while target and target not in MODULES:  # `import a.b.c` of a name inside a module
        target = target.rpartition(".")[0]
      if target and target != name:
        found.add(target)
  return found


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def _top(name: str) -> str:
  return name.split(".")[0]


def test_the_import_parser_sees_known_edges():
  """The checks below are only as good as the parser: spot-check real imports."""
  assert "moejax.extensions" in GRAPH["moejax.model.sublayers"]
  assert "moejax.papers.l3.lookup" in GRAPH["moejax.papers.l3.config"]
  assert "pallas_kernels.row_gather" in GRAPH["pallas_kernels.moe_ffn"]
  assert "moejax.model.layer_plan" in GRAPH["moejax.papers.l3.config"]


def _cycles(graph: dict) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_cycle_finder_finds_a_cycle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
  assert _cycles(GRAPH) == []


@pytest.mark.parametrize("layer,forbidden", [
    ("pallas_kernels", ("moejax", "configs", "experiments", "benchmarks", "tests")),
    ("moejax", ("configs", "experiments", "benchmarks", "scripts", "tests")),
    ("configs", ("experiments", "benchmarks", "tests")),
    ("experiments", ("benchmarks", "tests")),
])
def test_imports_run_down_the_layers(layer, forbidden):
  bad = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if _top(m) == layer
               for t in targets if _top(t) in forbidden)
  assert bad == []


def test_generic_layers_know_no_paper():
  bad = sorted(f"{m} -> {t}" for m, targets in GRAPH.items()
               if _top(m) == "moejax" and not m.startswith("moejax.papers")
               for t in targets if t.startswith("moejax.papers"))
  assert bad == []


def _edits_sys_path(path: str) -> bool:
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Attribute) and node.attr == "path" and \
        isinstance(node.value, ast.Name) and node.value.id == "sys":
      return True
  return False


def test_no_sys_path_edits():
  files = [p for top in ("moejax", "pallas_kernels", "configs", "experiments", "tests")
           for p in _python_files(top)] + [os.path.join(ROOT, "run.py")]
  assert sorted(os.path.relpath(p, ROOT) for p in files if _edits_sys_path(p)) == []
