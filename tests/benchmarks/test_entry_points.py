"""Every benchmark in `benchmarks/` runs both as a script (`python benchmarks/X.py`) and as a
module (`python -m benchmarks.X`) from the repository root.

Run as a script, a benchmark's folder heads sys.path, so a benchmark named like one of the
project's packages shadows it for every other benchmark (`benchmarks/kernels.py` once broke
`python benchmarks/memory.py` with a circular import). `--help` imports everything a
benchmark needs and exits before measuring anything, so it checks each entry point cheaply.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parents[2]
_BENCHMARKS = sorted(path.stem for path in (_REPO_ROOT / "benchmarks").glob("*.py") if path.stem != "__init__")


def _description(module: str) -> str:
    """The first line of a benchmark's docstring, which its `--help` prints (argparse's
    description)."""
    source = (_REPO_ROOT / "benchmarks" / f"{module}.py").read_text()
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring, f"benchmarks/{module}.py has no docstring to describe it in --help"
    return docstring.splitlines()[0]


def test_benchmarks_are_found() -> None:
    assert {"kernel_roofline", "memory", "offline_throughput", "transport_overhead"} <= set(_BENCHMARKS)


def test_no_benchmark_shadows_a_project_package() -> None:
    packages = {path.parent.name for path in _REPO_ROOT.glob("*/__init__.py")}
    assert not packages & set(_BENCHMARKS)


@pytest.mark.parametrize("how", ["script", "module"])
@pytest.mark.parametrize("module", _BENCHMARKS)
def test_benchmark_help(module: str, how: str) -> None:
    if how == "script":
        command = [sys.executable, f"benchmarks/{module}.py", "--help"]
    else:
        command = [sys.executable, "-m", f"benchmarks.{module}", "--help"]
    result = subprocess.run(command, cwd=_REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command[1:])} exited {result.returncode}:\n{result.stderr}"
    assert result.stdout.startswith("usage: ")
    assert _description(module) in result.stdout
