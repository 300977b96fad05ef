"""`pagedserve generate` as a user runs it: JSON lines on success, one clear error line and
a non-zero exit (no traceback) on bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pagedserve.services.launcher import pagedserve_command

pytestmark = pytest.mark.slow


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*pagedserve_command(), "generate", *args], capture_output=True, text=True, timeout=300)


def test_json_output_and_bad_inputs(tmp_path: Path) -> None:
    ok = run("--json", "--max-tokens", "4", "--ignore-eos", "The capital of France is")
    assert ok.returncode == 0, ok.stderr
    line = json.loads(ok.stdout.strip().splitlines()[-1])
    assert line["prompt"] == "The capital of France is" and len(line["token_ids"]) == 4 and line["text"]

    garbage = tmp_path / "broken.gguf"
    garbage.write_text("not a gguf file")
    too_long = " ".join(["word"] * 9000)
    cases = {
        "missing model": (["--model", str(tmp_path / "missing.gguf"), "hi"], "no model at"),
        "unreadable gguf": (["--model", str(garbage), "hi"], "GGUF"),
        "prompt beyond the context": (["--max-tokens", "4", too_long], "8,192"),
    }
    for name, (args, expected) in cases.items():
        result = run(*args)
        assert result.returncode != 0, name
        assert "Traceback" not in result.stderr, f"{name}:\n{result.stderr}"
        errors = [l for l in result.stderr.splitlines() if l.startswith("pagedserve generate: error:")]
        assert len(errors) == 1 and expected in errors[0], f"{name}:\n{result.stderr}"
