"""Paged-KV kernels: a torch implementation (the reference), a C decode kernel with torch ops
for the rest (CPU path) and Triton kernels (CUDA path), chosen per device by `kernel_module`."""

from kernels.dispatch import kernel_module

__all__ = ["kernel_module"]
