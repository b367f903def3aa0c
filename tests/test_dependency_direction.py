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
