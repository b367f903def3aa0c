"""The layering rules, enforced: core -> nothing of loralab and no transformers; metrics -> no torch;
engine -> no transformers at import time. Each check runs in a fresh interpreter."""
import pkgutil
import subprocess
import sys

import pytest

import loralab


def _modules(pkg: str) -> list[str]:
    mod = __import__(pkg, fromlist=["_"])
    return [pkg] + [f"{pkg}.{m.name}" for m in pkgutil.iter_modules(mod.__path__)]


def _imported_after(module: str) -> set[str]:
    code = f"import sys, importlib; importlib.import_module({module!r}); print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("module", _modules("loralab.core"))
def test_core_imports_no_other_loralab_and_no_transformers(module):
    mods = _imported_after(module)
    assert not any(m == "transformers" or m.startswith("transformers.") for m in mods), module
    others = {m for m in mods if m.startswith("loralab.") and not m.startswith("loralab.core")}
    assert not others, f"{module} imports {sorted(others)}"


@pytest.mark.parametrize("module", _modules("loralab.metrics"))
def test_metrics_import_no_torch(module):
    mods = _imported_after(module)
    assert "torch" not in mods, module
    assert "transformers" not in mods, module


@pytest.mark.parametrize("module", _modules("loralab.engine"))
def test_engine_imports_no_transformers(module):
    mods = _imported_after(module)
    assert "transformers" not in mods, module
    assert not any(m.startswith("loralab.tasks") for m in mods), module


@pytest.mark.parametrize("module", _modules("loralab.analysis"))
def test_analysis_imports_no_transformers_nor_engine(module):
    mods = _imported_after(module)
    assert not any(m == "transformers" or m.startswith(("transformers.", "loralab.engine", "loralab.tasks"))
                   for m in mods), module


@pytest.mark.parametrize("module", _modules("loralab.report"))
def test_report_imports_no_torch(module):
    mods = _imported_after(module)
    assert "torch" not in mods and "transformers" not in mods, module


def _graph() -> dict[str, set[str]]:
    """loralab module -> the loralab modules it imports anywhere in its source (function bodies too)."""
    import ast
    from pathlib import Path

    root = Path(loralab.__file__).parent
    names = {".".join(("loralab", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): p
             for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        deps: set[str] = set()
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in names:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("loralab"):
                    deps.add(target)
        graph[name] = deps
    return graph


def test_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            # a package's __init__ importing its own submodule is not a cycle of concern
            real = [m for m in component if not any(o.startswith(m + ".") for o in component)]
            if len(real) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"
    assert "loralab.engine.config" in graph and "loralab.core.quant" in graph  # the graph is the real one
