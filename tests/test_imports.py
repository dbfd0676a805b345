"""The library's imports point one way: no circle between sycoca_jax modules, and nothing above it.

Read from the source with `ast` (every import, top-level or inside a function), so an import deferred into a
function to dodge a circle still counts as an arrow.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "sycoca_jax"
# Repository folders the library must never import: config files and tests sit above it.
ABOVE = ("configs", "tests")


def _modules() -> dict[str, str]:
  """Dotted module name -> file, for every .py under sycoca_jax/ (a package is its __init__.py)."""
  out = {}
  for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        out[".".join(parts)] = path
  return out


def _imported(module: str, path: str, known: set[str]) -> set[str]:
  """Every module `module` imports: `import a.b` -> a.b; `from a import b` -> a.b if that is a module, else a."""
  is_package = path.endswith("__init__.py")
  out = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
      for alias in node.names:
        out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
  return out


def import_graph() -> dict[str, set[str]]:
  """sycoca_jax module -> the modules it imports (sycoca_jax's own, and any of ABOVE)."""
  modules = _modules()
  known = set(modules)
  graph = {}
  for module, path in modules.items():
    graph[module] = {m for m in _imported(module, path, known) - {module}
                     if m in known or m.split(".")[0] in ABOVE}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
  """One import circle as [a, b, ..., a], or [] when there is none (depth-first search)."""
  state: dict[str, int] = {}  # 1: on the current path, 2: finished
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    path.pop()
    state[node] = 2
    return []

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return []


def test_finds_a_circle_when_there_is_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []


def test_library_imports_have_no_circle():
  cycle = find_cycle(import_graph())
  assert not cycle, "import circle: " + " -> ".join(cycle)


def test_library_never_imports_configs_or_tests():
  upward = {m: sorted(i for i in imports if i.split(".")[0] in ABOVE) for m, imports in import_graph().items()}
  assert not {m: i for m, i in upward.items() if i}
