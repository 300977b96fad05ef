"""Paged-KV kernels: a torch implementation (CPU path and reference) and Triton kernels
(CUDA path), chosen per device by `kernel_module`."""

from kernels.dispatch import kernel_module

__all__ = ["kernel_module"]
