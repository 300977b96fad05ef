"""Data crosses process boundaries only as msgspec Structs: no module in services/ or
shared/ may import pickle or its relatives, call eval/exec, or use the pickle-based
pyzmq and torch helpers (any of them would let a peer that can reach a socket, or a
crafted file, run code in the service). Checked on the syntax tree, so comments and
strings that mention them do not count, and `model.eval()` is not `eval(...)`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("services", "shared")

FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}
FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_METHODS = {"recv_pyobj", "send_pyobj", "recv_serialized", "send_serialized"}  # pyzmq's pickle helpers


def violations(source: str, filename: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {alias.name}" for alias in node.names if alias.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in FORBIDDEN_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_BUILTINS:
                found.append(f"{where}: {func.id}(...)")
            elif isinstance(func, ast.Attribute) and func.attr in FORBIDDEN_METHODS:
                found.append(f"{where}: .{func.attr}(...)")
            elif isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name) and func.value.id in ("torch", "yaml"):
                # torch.load unpickles unless weights_only=True; yaml.load builds objects
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords)
                if not (func.value.id == "torch" and safe):
                    found.append(f"{where}: {func.value.id}.load(...)")
    return found


def python_files() -> list[Path]:
    files = sorted(path for folder in SCANNED for path in (REPO / folder).rglob("*.py"))
    assert len(files) > 20, files  # the scan is really looking at the tree
    return files


def test_no_unsafe_deserialization_in_services_or_shared() -> None:
    found = [v for path in python_files() for v in violations(path.read_text(), str(path.relative_to(REPO)))]
    assert found == [], "unsafe deserialization or dynamic code:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "import marshal as m",
        "from pickle import loads",
        "from dill import loads",
        "eval(payload)",
        "exec(code)",
        "sock.recv_pyobj()",
        "torch.load(path)",
        "torch.load(path, weights_only=False)",
        "yaml.load(stream)",
    ],
)
def test_the_checker_catches(source: str) -> None:
    assert violations(source, "example.py"), source


@pytest.mark.parametrize("source", ["model.eval()", "x = 'pickle'  # eval(x)", "torch.load(path, weights_only=True)", "msgspec.msgpack.decode(b)"])
def test_the_checker_allows(source: str) -> None:
    assert violations(source, "example.py") == []
