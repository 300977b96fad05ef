"""Compile the C kernels of `kernels/csrc/` on first use and load them with ctypes.

Why at run time, like torch's own JIT extensions: `-march=native` code for the CPU it runs
on, and no build step in the install. A C compiler is the only requirement (scripts/setup.sh
and docker/Dockerfile install gcc where it is missing); a build takes well under a second.

Why plain C through ctypes rather than a torch C++ extension: the kernels need nothing from
torch but data pointers, and a C file compiles in a fraction of a second where one including
torch's headers takes about a minute. ctypes releases the GIL during the call.

Libraries are cached on disk, named by a hash of everything that decides the binary (source,
compiler, flags, CPU), so a machine compiles each once. Concurrent processes build into
private temporary files and rename them into place, so none ever loads a half-written file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"

log = logging.getLogger(__name__)

# (compile flags, link flags), tried in order. The first vectorises expf through glibc's
# libmvec (-ffast-math lets the compiler call it); the second is for C libraries without
# libmvec. Compiling and linking are separate steps on purpose: linking with -ffast-math
# adds crtfastmath.o, whose constructor turns on flush-to-zero for the whole process the
# moment the library loads, silently changing every float computation around it.
FLAG_SETS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"), ("-shared", "-fopenmp", "-lmvec", "-lm")),
    (("-O3", "-march=native", "-fopenmp", "-fPIC"), ("-shared", "-fopenmp", "-lm")),
)


class NativeBuildError(RuntimeError):
    """No C compiler, or every flag set failed to compile or load the library."""


def _unsafe_because(folder: Path) -> str | None:
    """Why `folder` may not hold libraries this process loads (anyone who can write there
    chooses the code it runs), or None: it must be ours and writable by nobody else."""
    info = folder.stat()
    if info.st_uid != os.getuid():
        return f"it belongs to uid {info.st_uid}, not to this user (uid {os.getuid()})"
    if info.st_mode & 0o022:
        return f"others may write to it (mode {info.st_mode & 0o777:o})"
    return None


def cache_dir() -> Path:
    """$PAGEDSERVE_CACHE_DIR, else $XDG_CACHE_HOME/pagedserve/kernels, else ~/.cache/...;
    a per-user temporary folder where none of those can be written. A folder another user
    owns, or others may write to, is refused: the libraries in it are loaded and run."""
    configured = os.environ.get("PAGEDSERVE_CACHE_DIR")
    if configured:
        try:
            Path(configured).mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise NativeBuildError(f"PAGEDSERVE_CACHE_DIR={configured} cannot be created: {error}") from error
        unsafe = _unsafe_because(Path(configured))
        if unsafe is not None:
            raise NativeBuildError(f"PAGEDSERVE_CACHE_DIR={configured} is not safe to load kernels from: {unsafe}")
        return Path(configured)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    for candidate in (base / "pagedserve" / "kernels", Path(tempfile.gettempdir()) / f"pagedserve-kernels-{os.getuid()}"):
        try:
            candidate.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            continue
        unsafe = _unsafe_because(candidate)
        if unsafe is not None:  # e.g. /tmp/pagedserve-kernels-<uid> made by someone else first
            log.warning("not loading kernels from %s: %s", candidate, unsafe)
            continue
        if os.access(candidate, os.W_OK):
            return candidate
    raise NativeBuildError(f"no writable folder of this user's for built kernels; set PAGEDSERVE_CACHE_DIR (tried {base})")


def find_compiler() -> str:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise NativeBuildError("no C compiler found: install gcc or set CC")
    return compiler


@functools.cache
def _compiler_identity(compiler: str) -> str:
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        raise NativeBuildError(f"C compiler '{compiler}' does not run: {error}") from error
    return result.stdout


def _cpu_identity() -> str:
    """The CPU's feature flags (what -march=native compiles for), where Linux reports them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def library_path(source: Path, compiler: str, flags: tuple[tuple[str, ...], tuple[str, ...]]) -> Path:
    digest = hashlib.sha256()
    compile_flags, link_flags = flags
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # what sources #include
    for part in (source.read_bytes(), headers, compiler.encode(), _compiler_identity(compiler).encode(),
                 " ".join(compile_flags).encode(), " ".join(link_flags).encode(),
                 platform.machine().encode(), _cpu_identity().encode()):
        digest.update(part)
        digest.update(b"\0")
    return cache_dir() / f"{source.stem}-{digest.hexdigest()[:16]}.so"


def _run(command: list[str], source: Path) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise NativeBuildError(f"{' '.join(command)} failed on {source.name}:\n{result.stderr.strip()}")


def _compile(
    compiler: str, source: Path, target: Path, flags: tuple[tuple[str, ...], tuple[str, ...]]
) -> None:
    compile_flags, link_flags = flags
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}-", suffix=".so")
    os.close(handle)
    obj = temporary[: -len(".so")] + ".o"
    try:
        _run([compiler, *compile_flags, "-c", str(source), "-o", obj], source)
        # Libraries after the object: the linker resolves symbols left to right.
        _run([compiler, obj, "-o", temporary, *link_flags], source)
        os.replace(temporary, target)
    finally:
        for leftover in (temporary, obj):
            if os.path.exists(leftover):
                os.unlink(leftover)


def build_library(source: Path) -> ctypes.CDLL:
    """Compile `source` (or reuse its cached build) and load it; the first flag set that
    both compiles and loads wins."""
    compiler = find_compiler()
    errors = []
    for flags in FLAG_SETS:
        path = library_path(source, compiler, flags)
        try:
            if not path.exists():
                _compile(compiler, source, path, flags)
            return ctypes.CDLL(str(path))
        except (NativeBuildError, OSError) as error:
            errors.append(str(error))
    raise NativeBuildError("could not build a native kernel library:\n" + "\n".join(errors))


@functools.cache
def load_library(name: str) -> ctypes.CDLL:
    """`kernels/csrc/<name>.c`, built once per process (and once per machine on disk)."""
    return build_library(SOURCE_DIR / f"{name}.c")


def load_function(
    name: str, symbol: str, argtypes: Sequence[Any], restype: Any, logger: logging.Logger, falls_back: str
) -> ctypes._CFuncPtr | None:
    """`symbol` of `kernels/csrc/<name>.c` with its C signature set, or None where the
    library cannot be built, after one warning that says what `falls_back` to torch ops
    (callers cache the answer, so the warning comes once per process)."""
    try:
        function = getattr(load_library(name), symbol)
    except NativeBuildError as error:
        logger.warning("%s falls back to torch ops: %s", falls_back, error)
        return None
    function.argtypes = list(argtypes)
    function.restype = restype
    return function
