"""Tensors only where tensors are: torch belongs to the executor (and the in-process
engine built on it). Importing the gateway, the scheduler, anything in shared/, or the CLI
and launcher that start those processes must not load it: it costs each process seconds
and hundreds of MB for nothing.

Each package is imported with all its modules in a fresh interpreter, since an import
made earlier in the test session would hide the culprit; the first module after whose
import torch is loaded is named.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TORCH_FREE = ["services.gateway", "services.scheduler", "shared", "services.cli", "services.launcher"]

# Prints the modules it imported, one a line, and exits 1 right after the first import
# that left torch in sys.modules (that module's name is then the last line).
IMPORT_ALL = """
import importlib, pkgutil, sys
root = importlib.import_module(sys.argv[1])
names = [root.__name__]
if hasattr(root, "__path__"):
    names += [info.name for info in pkgutil.walk_packages(root.__path__, root.__name__ + ".")]
for name in names:
    importlib.import_module(name)
    print(name)
    if "torch" in sys.modules:
        raise SystemExit(1)
"""


@pytest.mark.parametrize("package", TORCH_FREE)
def test_importing_loads_no_torch(package: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, package], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    imported = result.stdout.split()
    assert result.returncode != 1, f"importing {imported[-1]} loads torch"
    assert result.returncode == 0, result.stderr
