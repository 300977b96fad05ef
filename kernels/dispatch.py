"""Pick the kernel implementation for a tensor's device: Triton on CUDA, the C decode
kernel plus torch ops on CPU (`kernels/cpu_ops.py`), plain torch ops elsewhere. Each
implements `PagedAttentionOps` (`kernels/paged_attention_ops.py`): a torch implementation
(the reference), a C decode kernel with torch ops for the rest (CPU path) and Triton
kernels (CUDA path).

Triton is imported lazily so CPU-only installs never need it; tests may force the Triton
path on CPU (under TRITON_INTERPRET=1) with `use_triton=True`.
"""

from __future__ import annotations

import torch

from pagedserve.kernels import cpu_ops, torch_ops
from pagedserve.kernels.paged_attention_ops import PagedAttentionOps


def kernel_module(device: torch.device, use_triton: bool | None = None) -> PagedAttentionOps:
    """The module implementing `PagedAttentionOps` for `device`.

    `use_triton=False` on CPU means the CPU serving path (cpu_ops), not the bare reference."""
    if use_triton is None:
        use_triton = device.type == "cuda"
    if use_triton:
        from pagedserve.kernels import triton_ops

        return triton_ops
    return cpu_ops if device.type == "cpu" else torch_ops
