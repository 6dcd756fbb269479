"""The package's layering: no import cycles, no module importing one above it, and the
leaf packages (metrics, models, pruning, data) knowing nothing of the pipeline.

Read from the source with `ast` (every import, also those inside functions), so the test
sees what a reader sees and needs no import side effects.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "prunebias_jax"

# Bottom to top; a module may import modules of a lower rank, and of its own package.
RANKS = {
  "choices": 0,
  "errors": 0,
  "faults": 0,
  "files": 1,
  "monitor": 2,
  "metrics": 2,
  "models": 2,
  "parallel": 2,
  "checkpoint": 2,
  "compilecache": 1,
  "distributed": 2,
  "pruning": 3,
  "data": 3,
  "train": 4,
  "quantization": 4,
  "config": 5,
  "workdir": 6,
  "records": 6,
  "provenance": 6,
  "report": 7,
  "stages": 7,
  "claims": 2,
  "history": 3,
  "cellfiles": 7,
  "units": 8,
  "experiment": 9,
  "audit": 8,
  "load": 8,
  "main": 10,
  "sweep": 11,
}
PLOTTING = ("matplotlib", "PIL")


def _unit(module: str) -> str:
  """'prunebias_jax.metrics.bias' → 'metrics' (the top-level module or package)."""
  return module.split(".")[1] if module.count(".") else ""


def _imports(path: Path) -> set[str]:
  """Every module imported by `path`, as dotted names (from-imports of the package's own
  modules, e.g. `from prunebias_jax import records`, count as importing that module)."""
  tree = ast.parse(path.read_text())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      out.add(node.module)
      if node.module == "prunebias_jax":
        out.update(f"prunebias_jax.{alias.name}" for alias in node.names)
  return out


def _modules() -> dict[str, Path]:
  found = {}
  for path in PACKAGE.rglob("*.py"):
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    found[".".join(parts)] = path
  return found


def test_every_top_level_module_has_a_rank():
  units = {_unit(m) for m in _modules()} - {""}
  assert units == set(RANKS), f"rank the new modules: {sorted(units ^ set(RANKS))}"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_only_point_down(module):
  unit = _unit(module)
  if not unit:
    return
  for imported in _imports(_modules()[module]):
    if not imported.startswith("prunebias_jax.") or _unit(imported) == unit:
      continue
    target = _unit(imported)
    assert RANKS[target] < RANKS[unit], (
      f"{module} imports {imported} (rank {RANKS[target]} ≥ {RANKS[unit]})"
    )


def test_no_import_cycles():
  modules = _modules()
  graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
  # A package's __init__ importing its own submodules is the usual re-export, not a cycle.
  for m in graph:
    graph[m] = {i for i in graph[m] if not i.startswith(m + ".")}
  state: dict[str, int] = {}

  def visit(m: str, stack: list[str]) -> None:
    state[m] = 1
    for nxt in graph[m]:
      if state.get(nxt) == 1:
        raise AssertionError("import cycle: " + " → ".join(stack + [m, nxt]))
      if nxt not in state:
        visit(nxt, stack + [m])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [])


def test_metrics_import_neither_files_nor_plotting():
  for module, path in _modules().items():
    if _unit(module) != "metrics":
      continue
    for imported in _imports(path):
      assert not imported.startswith(("prunebias_jax.files", "prunebias_jax.report")), module
      assert not imported.startswith(PLOTTING), f"{module} imports {imported}"


def test_leaf_packages_know_nothing_of_the_pipeline():
  pipeline = ("stages", "records", "report", "workdir", "experiment", "config", "main")
  for module, path in _modules().items():
    if _unit(module) not in ("metrics", "models", "pruning", "data"):
      continue
    for imported in _imports(path):
      assert _unit(imported) not in pipeline or not imported.startswith("prunebias_jax."), (
        f"{module} imports {imported}"
      )


def test_no_class_is_a_pipeline():
  """Orchestration lives in free functions over values; a class longer than ~150 lines is a
  sign that state is being set up across methods again."""
  for module, path in _modules().items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ClassDef):
        length = node.end_lineno - node.lineno + 1
        assert length <= 150, f"{module}.{node.name} has {length} lines"


def test_experiment_run_fits_on_one_screen():
  tree = ast.parse((PACKAGE / "experiment.py").read_text())
  (run,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run"]
  assert run.end_lineno - run.lineno + 1 <= 70


def test_the_config_package_imports_no_jax():
  """A bad config value is one line before JAX, Flax, Orbax, Qwix or TFDS is imported: the
  config package and the configs load in a fresh interpreter with none of them."""
  import subprocess
  import sys

  heavy = ("jax", "flax", "optax", "orbax", "qwix", "tensorflow_datasets", "scipy")
  code = (
    "import sys; from configs.default import get_config; from prunebias_jax.config import "
    "resolve_config, validate_config; validate_config(resolve_config(get_config())); "
    f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
  )
  root = PACKAGE.parent
  out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]", out.stdout


def test_the_choices_are_the_registries_names():
  """The validator's names (`choices`, importable without JAX) are the implementations'."""
  from prunebias_jax import choices
  from prunebias_jax.models import available_models
  from prunebias_jax.quantization import SCHEMES

  assert available_models() == choices.MODELS
  assert tuple(SCHEMES) == choices.QUANTIZATION_SCHEMES
  assert tuple(n for n, s in SCHEMES.items() if s.static) == choices.STATIC_SCHEMES
