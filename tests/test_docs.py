"""The documentation cannot rot silently: the MkDocs site builds with `--strict` (a broken
link or anchor, a page missing from the nav, a bad config: each is a warning, so a failure),
the README stays a front door (at most 200 lines) whose relative links all resolve, and the
module map in docs/architecture.md names exactly the modules that exist.

`mkdocs` comes with the `test` extra; the build runs in a subprocess into a temporary
directory (`--site-dir`), so nothing is written into the checkout (`site/` is ignored anyway).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200

# [text](target) and ![alt](target); the target ends at whitespace or the closing paren.
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Code spans and fenced blocks hold examples, not links.
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")


def relative_links(markdown: str) -> list[str]:
    text = _CODE_SPAN.sub("", _FENCE.sub("", markdown))
    targets = [match.group(1) for match in _LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_mkdocs_build_is_strict_clean(tmp_path: Path) -> None:
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (site / "index.html").is_file()
    assert (site / "architecture" / "index.html").is_file()
    # The plot reaches the site through the docs/img link to benchmarks/vs_llamacpp.png.
    assert (site / "img" / "vs_llamacpp.png").stat().st_size > 0


def test_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"


def test_readme_relative_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = relative_links(readme)
    assert len(links) >= 10, f"expected the README to link into docs/, found only {links}"
    missing = [link for link in links if not (ROOT / link.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_relative_links_finds_only_relative_targets() -> None:
    sample = (
        "[a](docs/a.md) ![p](benchmarks/p.png) [b](https://x.org) [c](#anchor) "
        "[d](docs/b.md#part) `[e](not/a/link.md)`\n```\n[f](fenced.md)\n```\n"
    )
    assert relative_links(sample) == ["docs/a.md", "benchmarks/p.png", "docs/b.md#part"]


def _module_map_paths() -> set[str]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `((?:services|shared|kernels)/[^`]+)` \|", section, re.MULTILINE))


def test_module_map_names_every_module() -> None:
    """Every module of services/, shared/ and kernels/ (Python and C) has its row in the
    module map, and every row names a file that exists."""
    sources = {
        path.relative_to(ROOT).as_posix()
        for folder in ("services", "shared", "kernels")
        for path in (ROOT / folder).rglob("*")
        if path.suffix in {".py", ".c", ".h"} and "__pycache__" not in path.parts
    }
    listed = _module_map_paths()
    assert sorted(sources - listed) == [], "modules missing from docs/architecture.md's module map"
    assert sorted(listed - sources) == [], "module map rows naming files that do not exist"
