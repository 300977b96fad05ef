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


@pytest.mark.parametrize("module", _BENCHMARKS)
def test_benchmark_help_as_a_script(module: str) -> None:
    """One process each: a script's own folder heads sys.path, which is what can break."""
    command = [sys.executable, f"benchmarks/{module}.py", "--help"]
    result = subprocess.run(command, cwd=_REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command[1:])} exited {result.returncode}:\n{result.stderr}"
    assert result.stdout.startswith("usage: ")
    assert _description(module) in result.stdout


# `python -m benchmarks.X --help` for every X in one process (the repository root heads
# sys.path for all of them alike, so one process checks what ten would): each prints its
# help between markers, or the traceback that stopped it.
_RUN_EVERY_MODULE = """
import contextlib, io, runpy, sys, traceback
for module in sys.argv[1:]:
    sys.argv = [module, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module(f"benchmarks.{module}", run_name="__main__", alter_sys=True)
        code = "returned"
    except SystemExit as exit:
        code = exit.code
    except BaseException:
        code = traceback.format_exc()
    print(f"=== {module} exit={code!r}")
    print(out.getvalue())
"""


def test_every_benchmark_help_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _RUN_EVERY_MODULE, *_BENCHMARKS], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    sections = result.stdout.split("=== ")[1:]
    assert [section.split(" ", 1)[0] for section in sections] == _BENCHMARKS
    for module, section in zip(_BENCHMARKS, sections):
        header, _, help_text = section.partition("\n")
        assert header == f"{module} exit=0", f"python -m benchmarks.{module} --help: {section[:3000]}"
        assert help_text.startswith("usage: ") and _description(module) in help_text, module
