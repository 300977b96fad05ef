"""Paged-KV kernels: a torch implementation (the reference), a C decode kernel with torch ops
for the rest (CPU path) and Triton kernels (CUDA path), each implementing
`PagedAttentionOps`, chosen per device by `kernel_module`."""

from kernels.dispatch import kernel_module
from kernels.paged_attention_ops import PagedAttentionOps

__all__ = ["PagedAttentionOps", "kernel_module"]
