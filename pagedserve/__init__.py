"""pagedserve: an LLM inference platform built around PagedAttention.

The public Python API, as vLLM's is::

    from pagedserve import LLMEngine, SamplingParams

Layout. The one import package is `pagedserve`; its three subpackages are the project's
top-level folders, linked here (`pagedserve/services -> ../services`, and so on):

- `pagedserve.services`: the processes (gateway, scheduler, executor), the in-process
  engine, the CLI and the launcher behind `pagedserve up`;
- `pagedserve.shared`: what more than one process uses (msgspec messages, step rules,
  ZeroMQ framing and CURVE keys, sampling parameters, tokenizer, model source). Nothing
  there imports torch (tests/test_import_boundaries.py);
- `pagedserve.kernels`: the paged-KV kernels (torch reference, C on CPU, Triton on CUDA),
  chosen per device by `pagedserve.kernels.dispatch.kernel_module`.

Why those folders have no `__init__.py`: they are namespace packages, so when the checkout
itself is on `sys.path` (`python -m pytest` or `python -m benchmarks...` from the repository
root) a folder named `kernels`, `services` or `shared` can never shadow a regular package
of that name (Hugging Face's `kernels`, which transformers imports, is one). Only
`pagedserve` is installed at the top of site-packages.

The names below load on first use (PEP 562): importing `pagedserve.shared` or the gateway
must not import torch, which the engine needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedserve.services.engine.llm_engine import Completion, CompletionOutput, LLMEngine
    from pagedserve.shared.sampling_params import SamplingParams

__all__ = ["Completion", "CompletionOutput", "LLMEngine", "SamplingParams"]

_EXPORTS = {
    "Completion": "pagedserve.services.engine.llm_engine",
    "CompletionOutput": "pagedserve.services.engine.llm_engine",
    "LLMEngine": "pagedserve.services.engine.llm_engine",
    "SamplingParams": "pagedserve.shared.sampling_params",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pagedserve' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
