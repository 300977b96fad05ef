"""The documentation cannot rot silently: the MkDocs site builds with `--strict` (a broken
link or anchor, a page missing from the nav, a bad config: each is a warning, so a failure),
the README stays a front door (at most 200 lines) whose relative links all resolve, the
module map in docs/architecture.md names exactly the modules that exist, and the flag
tables of docs/configuration.md name exactly the flags each command takes.

`mkdocs` comes with the `test` extra; the build runs in a subprocess into a temporary
directory (`--site-dir`), so nothing is written into the checkout (`site/` is ignored anyway).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import defaultdict
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


def _flags_by_command() -> dict[str, set[str]]:
    from pagedserve.services.cli import build_parser  # loads no torch

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    takes: dict[str, set[str]] = defaultdict(set)
    for command, subparser in commands.choices.items():
        for action in subparser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help" and not option.startswith("--no-"):
                    takes[option].add(command)
    return takes


def test_configuration_page_names_every_flag_and_its_commands() -> None:
    """Each row of docs/configuration.md's flag tables: the flags in its first cell, the
    commands that take them in its third; together they must be the parser's."""
    documented: dict[str, set[str]] = {}
    for line in (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8").splitlines():
        if not line.startswith("| `--"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        for flag in re.findall(r"`(--[a-z0-9-]+)", cells[0]):
            if not flag.startswith("--no-"):
                documented[flag] = {command.strip() for command in cells[2].split(",")}
    takes = _flags_by_command()
    assert sorted(set(takes) - set(documented)) == [], "flags missing from docs/configuration.md"
    assert sorted(set(documented) - set(takes)) == [], "docs/configuration.md rows for flags no command takes"
    wrong = {flag: (sorted(documented[flag]), sorted(takes[flag])) for flag in takes if documented[flag] != takes[flag]}
    assert wrong == {}, "commands column (documented, actual) disagrees with the parser"
