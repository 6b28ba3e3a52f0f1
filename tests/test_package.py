"""The package's shape: every module imports on its own, and the import graph has no cycle."""

import ast
import concurrent.futures
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "sparsifiner_jax"


def package_modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
  """``{dotted module name: source path}`` for every module of the package (packages as their name)."""
  out = {}
  for path in sorted((root / PACKAGE).rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _resolve(name: str, modules: dict[str, pathlib.Path]) -> str | None:
  """The longest prefix of ``name`` that is one of ``modules``."""
  while name:
    if name in modules:
      return name
    name = name.rpartition(".")[0]
  return None


def import_graph(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  """Edges ``module -> modules of the package it imports`` from every import statement in its source
  (module level or inside functions). The parent packages Python imports implicitly are not edges."""
  graph = {}
  for name, path in modules.items():
    is_pkg = path.name == "__init__.py"
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:   # relative import
          anchor = name if is_pkg else name.rpartition(".")[0]
          for _ in range(node.level - 1):
            anchor = anchor.rpartition(".")[0]
          base = f"{anchor}.{base}".rstrip(".")
        # ``from a import b``: module ``a.b`` if there is one, else the name ``b`` defined in ``a``.
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
      for t in targets:
        dep = _resolve(t, modules) if t.split(".")[0] == PACKAGE else None
        if dep and dep != name:
          deps.add(dep)
    graph[name] = deps
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle ``[a, b, ..., a]`` of ``graph``, or None (depth-first search)."""
  state: dict[str, int] = {}   # 1: on the current path, 2: done
  stack: list[str] = []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == 1:
        return stack[stack.index(dep):] + [dep]
      if dep not in state:
        cycle = visit(dep)
        if cycle:
          return cycle
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_import_graph_has_no_cycle():
  graph = import_graph(package_modules())
  assert len(graph) > 30 and graph["sparsifiner_jax.train.trainer"], "the graph was not built"
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_detection_fails_on_an_added_cycle(tmp_path):
  # A copy of the package with one import added that closes a loop: the same check must report it.
  pkg = tmp_path / PACKAGE
  for name, path in package_modules().items():
    dst = tmp_path / path.relative_to(ROOT)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(path.read_text())
  leaf = pkg / "io" / "atomic.py"                       # imported by io.weights, which imports it back
  leaf.write_text(leaf.read_text() + "\nfrom sparsifiner_jax.io import weights  # noqa\n")
  cycle = find_cycle(import_graph(package_modules(tmp_path)))
  assert cycle is not None and "sparsifiner_jax.io.atomic" in cycle and "sparsifiner_jax.io.weights" in cycle


def _import_alone(module: str) -> tuple[str, int, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  return module, proc.returncode, proc.stderr[-2000:]


def test_every_module_imports_on_its_own():
  modules = sorted(package_modules())
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    results = list(pool.map(_import_alone, modules))
  failed = [f"{m}: {err.strip().splitlines()[-1] if err.strip() else rc}" for m, rc, err in results if rc]
  assert not failed, "\n".join(failed)


@pytest.mark.parametrize("path", ["README.md", "BENCHMARKS.md", "docs", "sparsifiner_jax", "configs",
                                  "benchmarks", "scripts"])
def test_no_reference_to_files_outside_the_repository(path):
  hits = []
  target = ROOT / path
  for f in ([target] if target.is_file() else sorted(target.rglob("*"))):
    if f.is_file() and f.suffix in (".py", ".md", ".cc", ".h", ".sh", ".sbatch"):
      text = f.read_text(errors="ignore")
      for needle in ("shared/spec", "SPARSIFINER.md", "BASELINES.md", "ENVIRONMENT.md", "STYLE.md"):
        if needle in text:
          hits.append(f"{f.relative_to(ROOT)}: {needle}")
  assert not hits, "\n".join(hits)


def test_renamed_modules_import_under_their_new_names():
  # Issue 28's renames: each module and function under its one name, the old names gone.
  import importlib

  cpu = importlib.import_module("sparsifiner_jax.attention.cpu")
  topk_mask = importlib.import_module("sparsifiner_jax.attention.pallas.topk_mask")
  common = importlib.import_module("sparsifiner_jax.attention.pallas.common")
  pallas_attention = importlib.import_module("sparsifiner_jax.attention.pallas.attention")
  selection = importlib.import_module("sparsifiner_jax.attention.selection")
  executors = importlib.import_module("sparsifiner_jax.attention.executors")
  patterns = importlib.import_module("sparsifiner_jax.attention.patterns")
  for module, name in [(cpu, "sparse_row_attention"), (cpu, "lowrank_topk_mask"),
                       (topk_mask, "lowrank_topk_packed"), (pallas_attention, "flash_attention"),
                       (common, "round_up"), (common, "next_pow2"), (selection, "predictor_mask"),
                       (executors, "gather_attention"), (patterns, "index_table")]:
    assert callable(getattr(module, name)), f"{module.__name__}.{name}"
  for module, old in [(cpu, "sparse_attention"), (topk_mask, "lowrank_topk_mask"),
                      (pallas_attention, "sparse_attention"), (executors, "sparse_attention"),
                      (patterns, "pack_rows")]:
    assert not hasattr(module, old), f"{module.__name__}.{old} is still defined"
  assert executors.EXECUTORS["gather"] is executors.gather_attention and "sparse" not in executors.EXECUTORS
  for gone in ("sparsifiner_jax.attention.kernels", "sparsifiner_jax.attention.pallas.mask"):
    with pytest.raises(ModuleNotFoundError):
      importlib.import_module(gone)


def top_level_modules(root: pathlib.Path = ROOT) -> list[str]:
  """The package's top-level modules (``*.py`` directly in it), ``__init__.py`` left out."""
  return sorted(p.stem for p in (root / PACKAGE).glob("*.py") if p.name != "__init__.py")


def test_at_most_eight_top_level_modules():
  # Issue 28: the command-line plumbing is one subpackage (cli/), the four documented commands stay.
  top = top_level_modules()
  assert len(top) <= 8, top
  for command in ("convert", "demo", "sweeps", "compile_for"):
    assert command in top, f"python -m {PACKAGE}.{command} is documented"


def test_top_level_count_fails_on_an_added_module(tmp_path):
  pkg = tmp_path / PACKAGE
  pkg.mkdir()
  for name in ("__init__", "a", "b", "c", "d", "e", "f", "g", "h", "i"):
    (pkg / f"{name}.py").write_text("")
  assert len(top_level_modules(tmp_path)) == 9


def test_cli_modules_moved_into_the_cli_package():
  # Issue 28: cli.py, command_line.py, errors.py and env.py live in sparsifiner_jax/cli/, no shims left.
  import importlib

  entry = importlib.import_module("sparsifiner_jax.cli.entry")
  parsing = importlib.import_module("sparsifiner_jax.cli.parsing")
  errors = importlib.import_module("sparsifiner_jax.cli.errors")
  env = importlib.import_module("sparsifiner_jax.cli.env")
  for module, name in [(entry, "run_main"), (entry, "load_config"), (parsing, "parse"), (parsing, "run"),
                       (errors, "report"), (env, "get")]:
    assert callable(getattr(module, name)), f"{module.__name__}.{name}"
  cli = importlib.import_module("sparsifiner_jax.cli")
  assert not hasattr(cli, "run_main") and not hasattr(cli, "USER_ERRORS"), "sparsifiner_jax.cli re-exports"
  for gone in ("sparsifiner_jax.command_line", "sparsifiner_jax.errors", "sparsifiner_jax.env"):
    with pytest.raises(ModuleNotFoundError):
      importlib.import_module(gone)
  assert not (ROOT / PACKAGE / "cli.py").exists()
