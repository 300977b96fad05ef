"""The wheel, installed the way a user installs it: non-editable, into a fresh venv, run
from a directory that is not the checkout.

What it guards: the project installs one import package, `pagedserve`, and nothing else at
the top of site-packages, so it lives beside Hugging Face's `kernels` (which transformers
imports) and any other distribution's top-level `services` or `shared` without shadowing
them or being shadowed. The editable install of the checkout (.venv) cannot show that: its
finder maps `pagedserve` to the source tree, and the checkout on `sys.path` hides what a
wheel would miss (a C source, a data file).

The fresh venv gets the project's dependencies without downloading them: a `.pth` file in
its site-packages names .venv's site-packages as one more path entry. `site` processes the
`.pth` files only of the directories it adds itself, so .venv's own `.pth` files (among
them the editable finder that maps `pagedserve` to the checkout) stay inert there, and
`pagedserve` can only come from the wheel (the test checks both).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pagedserve.services.launcher import free_port
from tests.cluster import port_open, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# What the build reads: the package folder (its links included) and the folders it links to.
SOURCES = ("pyproject.toml", "pagedserve", "services", "shared", "kernels")
PROMPT = "The capital of France is"
MAX_TOKENS = 6


@dataclass
class InstalledWheel:
    wheel: Path
    venv: Path
    python: Path
    script: Path
    workdir: Path  # a directory outside the checkout, the cwd of every command
    env: dict[str, str]

    def run(self, *argv: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=timeout_s)


def build_wheel(out_dir: Path, tmp: Path) -> Path:
    """`pip wheel` from a copy of the sources: the checkout's own build/ folder may hold
    files of an older layout that setuptools would pack again. No build isolation: the
    build backend (setuptools) is .venv's, and the test must not need the network."""
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(path, source / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out_dir), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    wheels = list(out_dir.glob("pagedserve-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def write_stub_package(site_packages: Path, name: str) -> None:
    """An unrelated distribution's top-level package that happens to share a folder name
    with the checkout: a regular package, which a namespace package must never shadow."""
    package = site_packages / name
    package.mkdir()
    (package / "__init__.py").write_text(f"STUB = {name!r}\n")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InstalledWheel]:
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(tmp / "dist", tmp)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # Installed before .venv's site-packages is linked in: pip then sees no `pagedserve`
    # already installed and has nothing of .venv's to uninstall.
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    site_packages = Path(subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True,
    ).strip())
    (site_packages / "project_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    write_stub_package(site_packages, "services")
    write_stub_package(site_packages, "shared")
    workdir = tmp / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REDIS_URL", "VIRTUAL_ENV")}
    env |= {"PYTHONUNBUFFERED": "1", "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}
    yield InstalledWheel(wheel, venv, python, venv / "bin" / "pagedserve", workdir, env)


def test_the_wheel_holds_only_the_pagedserve_package(installed: InstalledWheel) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    dist_info = {name for name in top_level if name.endswith(".dist-info")}
    assert top_level - dist_info == {"pagedserve"}, sorted(top_level)
    assert [name.split("-")[0] for name in dist_info] == ["pagedserve"], dist_info
    # Package data: the C kernels are compiled on first use from the installed sources.
    c_sources = {Path(name).name for name in names if name.startswith("pagedserve/kernels/csrc/") and name.endswith(".c")}
    assert c_sources == {path.name for path in (REPO / "kernels" / "csrc").glob("*.c")}
    assert "pagedserve/services/gateway/admin_page.html" in names  # the /admin page, package data too
    # The links were followed: the wheel holds the files, under pagedserve/.
    for module in ("services/cli.py", "shared/messages.py", "kernels/dispatch.py"):
        assert f"pagedserve/{module}" in names, module
    entry_points = zipfile.ZipFile(installed.wheel).read(f"{dist_info.pop()}/entry_points.txt").decode()
    assert "pagedserve = pagedserve.services.cli:main" in entry_points


def test_imports_resolve_to_the_venv_beside_same_named_packages(installed: InstalledWheel) -> None:
    probe = (
        "import json, sys, kernels, services, shared, pagedserve, pagedserve.services.cli, pagedserve.kernels.dispatch\n"
        "from pagedserve import LLMEngine, SamplingParams\n"
        "print(json.dumps({'pagedserve': pagedserve.__file__, 'cli': pagedserve.services.cli.__file__,"
        " 'kernels': kernels.__file__, 'services': getattr(services, 'STUB', None), 'shared': getattr(shared, 'STUB', None),"
        " 'dispatch': pagedserve.kernels.dispatch.__file__, 'editable_finders': [type(f).__name__ for f in sys.meta_path"
        " if 'editable' in type(f).__module__.lower()]}))"
    )
    result = installed.run(str(installed.python), "-c", probe)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    venv = installed.venv.resolve()
    for key in ("pagedserve", "cli", "dispatch"):
        assert Path(found[key]).resolve().is_relative_to(venv), (key, found[key])
    assert found["editable_finders"] == [], ".venv's editable finder must stay out of the fresh venv"
    # Hugging Face's kernels (transformers needs it), from .venv's site-packages, and the stubs.
    assert Path(found["kernels"]).resolve().is_relative_to(Path(sysconfig.get_path("purelib")).resolve())
    assert (found["services"], found["shared"]) == ("services", "shared")


def test_generate_runs_from_the_wheel(installed: InstalledWheel) -> None:
    result = installed.run(
        str(installed.script), "generate", "--json", "--ignore-eos", "--max-tokens", str(MAX_TOKENS), PROMPT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = result.stdout.splitlines()
    completion = json.loads(line)
    assert completion["prompt"] == PROMPT
    assert len(completion["token_ids"]) == MAX_TOKENS and completion["text"].strip()


def test_up_serves_a_streamed_completion_from_the_wheel(installed: InstalledWheel) -> None:
    port = free_port()
    log_path = installed.workdir / "up.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(installed.script), "up", "--port", str(port), "--kv-cache-memory", str(128 << 20)],
            cwd=installed.workdir, env=installed.env, stdout=log, stderr=subprocess.STDOUT, text=True,
        )
        try:
            def healthy() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(f"pagedserve up exited with {process.returncode}:\n{log_path.read_text()[-5000:]}")
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False
            wait_until(healthy, 300, "the gateway's /health", interval_s=0.25)

            body = {
                "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True},
            }
            chunks: list[dict] = []
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120) as response:
                assert response.status_code == 200, response.read()
                assert response.headers["content-type"].startswith("text/event-stream")
                lines = [line for line in response.iter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
            text = "".join(choice["text"] for chunk in chunks for choice in chunk["choices"])
            usage = [chunk["usage"] for chunk in chunks if chunk.get("usage")]
            assert len([c for c in chunks if c["choices"]]) >= 2, "streamed, not one piece"
            assert text.strip()
            assert usage and usage[-1]["completion_tokens"] <= MAX_TOKENS and usage[-1]["prompt_tokens"] > 0

            # The admin page is package data, read from the installed package.
            admin = httpx.get(f"http://127.0.0.1:{port}/admin", timeout=10)
            assert admin.status_code == 200 and "/admin/scheduler" in admin.text
        finally:
            process.terminate()
            code = process.wait(timeout=60)
    output = log_path.read_text()
    assert code == 0, output[-5000:]
    assert not port_open(port), "up stops the gateway with itself"
    assert "Traceback" not in output, output[-5000:]
