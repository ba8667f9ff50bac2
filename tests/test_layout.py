"""The package's dependency graph: the parts depend on nothing above them, and no module imports itself back.

Layers, bottom to top (a module may import from its own layer or below, never above):

    errors, registry, cache, checkpoint, device      leaves: no visrep imports but errors
    data, models, objectives                          the parts of the data path (data also uses cache)
    methods                                           presets and the template: compositions of the parts
    config                                            RunConfig, presets applied, validation of the parts
    runs                                              loading, rebuilding and building a run's model
    train, evaluate, rank, study, api, cli, demo      what users run

Every import is counted, also those written inside functions (they hide cycles as well as they avoid them).
"""
import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "visrep"
LEAVES = {"errors", "registry", "cache", "checkpoint", "device"}
PARTS_MAY_IMPORT = {"data": LEAVES, "models": {"errors", "registry"}, "objectives": {"errors", "registry"}}


def _module_name(path: Path) -> str:
    parts = ["visrep", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """module -> visrep modules it imports (any import statement, anywhere in the file)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    out = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from visrep.x import y`: y may be a module of package x, or a name in x
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            out[name] |= {t for t in targets if t.startswith("visrep") and t in modules and t != name}
    return out


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "visrep"


def test_the_parts_import_nothing_above_them():
    bad = []
    for module, targets in _imports().items():
        allowed = PARTS_MAY_IMPORT.get(_top(module))
        if _top(module) in LEAVES:
            allowed = {"errors"}
        if allowed is None:
            continue
        bad += [f"{module} -> {t}" for t in targets if _top(t) != _top(module) and _top(t) not in allowed]
    assert not bad, "imports from a higher layer:\n" + "\n".join(sorted(bad))


def test_no_import_cycle_between_modules():
    graph = _imports()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    # A package's __init__ may re-export its own modules, and those modules import each other through it.
    cycles = [c for c in cycles if len({_top(m) for m in c.split(" -> ")}) > 1]
    assert not cycles, "import cycles across packages:\n" + "\n".join(cycles)


def test_no_cycle_between_packages():
    """Package level: train uses evaluate (kNN, RankMe's formula), rank uses train (its fine-tuning truth), so
    train must not use rank; a loop of packages is a loop of responsibilities even when no module cycles."""
    edges = defaultdict(set)
    for module, targets in _imports().items():
        edges[_top(module)] |= {_top(t) for t in targets if _top(t) != _top(module)} - {"visrep"}
    loops = [f"{a} <-> {b}" for a in sorted(edges) for b in sorted(edges[a]) if a < b and a in edges.get(b, ())]
    assert not loops, "packages importing each other: " + ", ".join(loops)


@pytest.mark.parametrize("package", ["visrep.models", "visrep.objectives", "visrep.data", "visrep.methods"])
def test_a_lower_package_imports_alone_without_the_upper_ones(package):
    code = (f"import sys, {package}; "
            "print(' '.join(sorted({m.split('.')[1] for m in sys.modules if m.startswith('visrep.')})))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                timeout=120).stdout.split())
    assert not loaded & {"config", "runs", "train", "evaluate", "rank", "study", "api", "cli"}, loaded
