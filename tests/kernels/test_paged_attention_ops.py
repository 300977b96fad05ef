"""Tests for `kernels/paged_attention_ops.py`: every kernel implementation matches the
`PagedAttentionOps` Protocol signature by signature (names, kinds, annotations, defaults,
return type), which `runtime_checkable`'s name-only check would not catch, and choosing an
implementation never imports Triton unless the Triton path is asked for."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

from pagedserve.kernels import cpu_ops, torch_ops
from pagedserve.kernels.paged_attention_ops import PagedAttentionOps
from pagedserve.kernels.dispatch import kernel_module

_REPO_ROOT = Path(__file__).resolve().parents[2]


def _protocol_members() -> list[str]:
    return sorted(
        name
        for name, member in vars(PagedAttentionOps).items()
        if inspect.isfunction(member) and not name.startswith("_")
    )


def _signature_mismatches(ops: ModuleType, name: str) -> list[str]:
    """How `ops.<name>` departs from `PagedAttentionOps.<name>`: the Protocol's parameters
    (less `self`) must come first, in order, identical; an implementation may add only
    keyword-only parameters with defaults, which callers coding to the Protocol never pass."""
    wanted = inspect.signature(getattr(PagedAttentionOps, name), eval_str=True)
    wanted_params = list(wanted.parameters.values())[1:]  # drop self
    implementation: Callable[..., object] | None = getattr(ops, name, None)
    if implementation is None:
        return [f"{ops.__name__} has no {name}"]
    found = inspect.signature(implementation, eval_str=True)
    found_params = list(found.parameters.values())
    problems = [
        f"{ops.__name__}.{name} parameter {i}: {have} where the Protocol has {want}"
        for i, (want, have) in enumerate(zip(wanted_params, found_params))
        if want != have
    ]
    if len(found_params) < len(wanted_params):
        problems.append(f"{ops.__name__}.{name} lacks {[p.name for p in wanted_params[len(found_params):]]}")
    for extra in found_params[len(wanted_params) :]:
        if extra.kind is not inspect.Parameter.KEYWORD_ONLY or extra.default is inspect.Parameter.empty:
            problems.append(f"{ops.__name__}.{name} adds {extra}, not a keyword-only parameter with a default")
    if found.return_annotation != wanted.return_annotation:
        problems.append(
            f"{ops.__name__}.{name} returns {found.return_annotation}, not {wanted.return_annotation}"
        )
    return problems


def test_protocol_lists_the_three_ops() -> None:
    assert _protocol_members() == ["paged_decode_attention", "paged_prefill_attention", "reshape_and_cache"]


@pytest.mark.parametrize("implementation", ["torch_ops", "cpu_ops", "triton_ops"])
def test_implementation_matches_the_protocol(implementation: str) -> None:
    if implementation == "triton_ops":
        from pagedserve.kernels import triton_ops as ops  # TRITON_INTERPRET is set by tests/conftest.py
    else:
        ops = {"torch_ops": torch_ops, "cpu_ops": cpu_ops}[implementation]
    problems = [problem for name in _protocol_members() for problem in _signature_mismatches(ops, name)]
    assert problems == []


def test_signature_check_catches_a_departure() -> None:
    """The check above is not vacuous: swapped parameters, a missing one, an extra
    positional one and a different return type are all reported."""
    wrong = ModuleType("wrong_ops")

    def reshape_and_cache(
        value: torch.Tensor,
        key: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None: ...

    def paged_decode_attention(
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor: ...

    def paged_prefill_attention(
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_tables: torch.Tensor,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
        max_query_len: int,
        max_seq_len: int,
        tile_tokens: int = 64,
    ) -> None: ...

    for function in (reshape_and_cache, paged_decode_attention, paged_prefill_attention):
        setattr(wrong, function.__name__, function)
    assert len(_signature_mismatches(wrong, "reshape_and_cache")) == 2  # key and value swapped
    assert "lacks ['max_seq_len', 'sliding_window']" in " ".join(_signature_mismatches(wrong, "paged_decode_attention"))
    prefill_problems = " ".join(_signature_mismatches(wrong, "paged_prefill_attention"))
    assert "tile_tokens: int = 64 where the Protocol has sliding_window" in prefill_problems and "returns None" in prefill_problems


def test_dispatch_returns_protocol_implementations() -> None:
    assert kernel_module(torch.device("cpu")) is cpu_ops
    assert kernel_module(torch.device("meta")) is torch_ops


def test_cpu_path_never_imports_triton() -> None:
    """CPU-only installs have no Triton: importing `kernels` and choosing the CPU path
    must not import it, nor our Triton modules (run in a fresh interpreter, as this one
    has them loaded; whatever `import torch` itself loads does not count)."""
    script = (
        "import sys, torch\n"
        "def tritonish(): return {m for m in sys.modules if m.split('.')[0] == 'triton' or 'triton_' in m}\n"
        "preloaded = tritonish()\n"
        "from pagedserve.kernels.dispatch import kernel_module\n"
        "kernel_module(torch.device('cpu'))\n"
        "assert tritonish() == preloaded, sorted(tritonish() - preloaded)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=_REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
