"""The import rule, checked on the source: every import points down.

No two modules import each other, directly or around a loop; the framework-neutral core loads
no framework; the torch side never loads JAX; layers and models know nothing of training; the
XLA:CPU speed-ups know nothing of the layers they speed up.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flaxnets", "torch_ref", "parity", "benchmarks")
NEUTRAL = ("flaxnets.registry", "flaxnets.recipes", "flaxnets.fit", "flaxnets.runs", "flaxnets.summary",
           "flaxnets.data", "flaxnets.metrics", "flaxnets.plots")
FRAMEWORKS = ("jax", "jaxlib", "flax", "optax", "orbax", "torch", "torchvision")


def _modules() -> dict[str, Path]:
    """Every module of the project's packages by dotted name."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``name`` imports anywhere in its source (lazy imports too)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_module_imports_another_around_a_loop():
    graph = _graph()
    assert len(graph) > 30  # the walk found the project's modules
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_loop_finder_finds_a_loop():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _rule_breaks(source_prefixes: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    graph = _graph()
    return [f"{m} imports {n}" for m, deps in sorted(graph.items()) for n in sorted(deps)
            if m.startswith(source_prefixes) and n.startswith(forbidden)]


def test_layers_and_models_know_nothing_of_training():
    training = ("flaxnets.fit", "flaxnets.engine", "flaxnets.recipes", "flaxnets.runs",
                "flaxnets.checkpoint", "flaxnets.data", "parity", "benchmarks")
    assert _rule_breaks(("flaxnets.layers", "flaxnets.models", "flaxnets.functional", "flaxnets.xla_cpu",
                         "torch_ref.layers", "torch_ref.models"), training) == []


def test_the_cpu_speedups_sit_apart_from_the_layers_they_speed_up():
    assert _rule_breaks(("flaxnets.xla_cpu",), ("flaxnets.layers", "flaxnets.models")) == []


def test_the_neutral_core_and_the_torch_side_import_no_jax_module():
    jax_side = ("flaxnets.engine", "flaxnets.layers", "flaxnets.models", "flaxnets.xla_cpu",
                "flaxnets.introspect", "flaxnets.checkpoint", "flaxnets.functional", "parity")
    assert _rule_breaks(NEUTRAL + ("torch_ref",), jax_side) == []
    assert _rule_breaks(NEUTRAL, ("torch_ref",)) == []


def _loaded_frameworks(*modules: str) -> list[str]:
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted({{k.split('.')[0] for k in sys.modules}} & {set(FRAMEWORKS)!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def test_importing_the_neutral_core_loads_no_framework():
    assert _loaded_frameworks(*NEUTRAL) == []


@pytest.mark.parametrize("module", ["torch_ref", "torch_ref.engine", "torch_ref.introspect"])
def test_importing_the_torch_engine_loads_no_jax(module):
    assert _loaded_frameworks(module, "torch_ref.models.lenet", "torch_ref.models.densenet") == ["torch"]
