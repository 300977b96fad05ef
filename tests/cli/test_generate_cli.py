"""`pagedserve generate` as a user runs it: JSON lines on success, one clear error line and
a non-zero exit (no traceback) on bad input."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from transformers import AutoTokenizer

from pagedserve.services.launcher import pagedserve_command
from pagedserve.shared.model_source import default_model_source
from tests.engine.hf_reference import hf_greedy

pytestmark = pytest.mark.slow


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*pagedserve_command(), "generate", *args], capture_output=True, text=True, timeout=300)


DOCS = Path(__file__).resolve().parents[2] / "docs" / "getting-started.md"


def documented_example() -> tuple[list[str], dict]:
    """The `pagedserve generate` example of docs/getting-started.md: its arguments and the
    JSON line shown under it."""
    lines = DOCS.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("pagedserve generate ") and "--json" in line)
    return shlex.split(lines[index])[2:], json.loads(lines[index + 1].removeprefix("# "))


def test_the_documented_example_prints_hf_greedy_tokens_as_json(hf_model_float64) -> None:  # type: ignore[no-untyped-def]
    """The docs' example, run as written but in float64, prints HF's float64 greedy
    tokens; the token ids and text the docs show are those too."""
    args, shown = documented_example()
    ok = run(*args, "--dtype", "float64", "--max-tokens", "16")
    assert ok.returncode == 0, ok.stderr
    line = json.loads(ok.stdout.strip().splitlines()[-1])
    prompt = args[-1]
    tokenizer = AutoTokenizer.from_pretrained(default_model_source().directory, gguf_file=default_model_source().gguf_file)
    templated = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    prompt_ids = templated["input_ids"] if hasattr(templated, "keys") else templated
    [expected] = hf_greedy(hf_model_float64, [list(prompt_ids)], 16)
    assert line["prompt"] == prompt and line["token_ids"] == expected
    assert line["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert shown == line, "docs/getting-started.md shows another output than the command prints"


def test_bad_inputs_are_one_error_line(tmp_path: Path) -> None:

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
