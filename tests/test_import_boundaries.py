"""Tensors only where tensors are: torch belongs to the executor (and the in-process
engine built on it). Importing the gateway, the scheduler, anything in shared/, or the CLI
and launcher that start those processes must not load it: it costs each process seconds
and hundreds of MB for nothing. And the executor never makes scheduling decisions: it
imports nothing of the scheduler (what both read, `EngineConfig` and its
`SchedulingLimits`, lives in the engine package and shared/).

Each package is imported with all its modules in a fresh interpreter, since an import
made earlier in the test session would hide the culprit; the first module after whose
import torch is loaded is named.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TORCH_FREE = [
    "pagedserve.services.gateway",
    "pagedserve.services.scheduler",
    "pagedserve.shared",
    "pagedserve.services.cli",
    "pagedserve.services.launcher",
]

# Prints the modules it imported, one a line, and exits 1 right after the first import
# that left the forbidden module (argv[2]) or one of its submodules in sys.modules (that
# module's name is then the last line).
IMPORT_ALL = """
import importlib, pkgutil, sys
root = importlib.import_module(sys.argv[1])
forbidden = sys.argv[2]
names = [root.__name__]
if hasattr(root, "__path__"):
    names += [info.name for info in pkgutil.walk_packages(root.__path__, root.__name__ + ".")]
for name in names:
    importlib.import_module(name)
    print(name)
    if any(loaded == forbidden or loaded.startswith(forbidden + ".") for loaded in sys.modules):
        raise SystemExit(1)
"""


def _import_all(package: str, forbidden: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, package, forbidden], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("package", TORCH_FREE)
def test_importing_loads_no_torch(package: str) -> None:
    result = _import_all(package, "torch")
    imported = result.stdout.split()
    assert result.returncode != 1, f"importing {imported[-1]} loads torch"
    assert result.returncode == 0, result.stderr


def test_the_executor_imports_nothing_of_the_scheduler() -> None:
    result = _import_all("pagedserve.services.executor", "pagedserve.services.scheduler")
    imported = result.stdout.split()
    assert result.returncode != 1, f"importing {imported[-1]} imports the scheduler"
    assert result.returncode == 0, result.stderr
    assert "pagedserve.services.executor.model_runner" in imported  # it walked the whole package


def test_the_boundary_check_catches_what_it_is_for() -> None:
    result = _import_all("pagedserve.services.engine", "pagedserve.services.scheduler")
    assert result.returncode == 1 and result.stdout.split()[-1] == "pagedserve.services.engine.llm_engine"


# A bare top-level `services`, `shared` or `kernels` import would resolve against whatever
# package of that name is installed (Hugging Face's `kernels` is one): every import of ours
# goes through `pagedserve.` (pagedserve/__init__.py says why).
BARE_IMPORT = re.compile(r"^\s*(?:from|import)\s+(?:services|shared|kernels)\b", re.MULTILINE)
BARE_MODULE_STRING = re.compile(r"""["'](?:services|shared|kernels)\.[a-z_]+""")


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    suffixes = {".py", ".toml", ".yml", ".yaml", ".md", ".sh", ".cfg"}
    names = {"Dockerfile", "Makefile"}
    paths = [ROOT / line for line in listed.splitlines()]
    return [p for p in paths if (p.suffix in suffixes or p.name in names) and p.is_file() and not p.is_symlink()]


def test_no_file_imports_a_bare_top_level_folder() -> None:
    offenders = []
    for path in _tracked_text_files():
        text = path.read_text(errors="replace")
        for pattern in (BARE_IMPORT, BARE_MODULE_STRING):
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {match.group(0).strip()}")
    assert not offenders, "import through `pagedserve.`:\n" + "\n".join(offenders)


def test_the_lint_catches_what_it_is_for() -> None:
    assert BARE_IMPORT.search("from kernels import cpu_ops\n")
    assert BARE_IMPORT.search("    import services.cli\n")
    assert BARE_MODULE_STRING.search("[sys.executable, '-m', 'shared" + ".transport']")
    assert not BARE_IMPORT.search("from pagedserve.kernels import cpu_ops\n")
    assert not BARE_MODULE_STRING.search('"pagedserve.services.cli"')
