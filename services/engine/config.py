"""The engine's typed config: what a model runner needs (model, device, dtype, KV cache
size) and the scheduling limits (`SchedulingLimits`): the executor sizes its batch by them,
the in-process engine hands them to its scheduler core.

It sits in the engine package, not the executor's, because it serves both halves; the
executor reads it and imports nothing of the scheduler. Built from CLI flags in
`services/cli.py`. It is plain data and imports no torch: the CLI builds it in processes
(scheduler, gateway) that never load torch; only the model runner turns the device and
dtype names into torch objects, through the methods below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

import msgspec

from pagedserve.shared.scheduling_limits import SchedulingLimits

if TYPE_CHECKING:
    import torch

# torch's own names for the dtypes a model and its KV cache may use; "auto" picks one.
DType = Literal["auto", "float32", "float16", "bfloat16", "float64"]
DTYPES: tuple[DType, ...] = get_args(DType)
# GGUF weights: "quantized" keeps 4-bit tensors packed for torch's weight-only int4 matmul
# (`quantized_linear.py`), "dequantized" expands them to the model dtype at load, "auto"
# takes whichever serves faster (see `resolve_weight_format`).
WeightFormat = Literal["auto", "quantized", "dequantized"]
WEIGHT_FORMATS: tuple[WeightFormat, ...] = get_args(WeightFormat)


class EngineConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Everything an engine (scheduler core + model runner) needs."""

    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: DType = "auto"  # auto: bfloat16 on CUDA and on CPUs with AMX or AVX512-BF16, else float32
    weight_format: WeightFormat = "auto"  # GGUF only: keep 4-bit weights quantized or expand them
    block_size: int = 16
    kv_cache_memory_bytes: int = 1 << 30  # CPU budget for the KV cache
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of free memory for the KV cache
    num_kv_blocks: int | None = None  # overrides the memory-derived block count
    limits: SchedulingLimits = msgspec.field(default_factory=SchedulingLimits)
    use_triton: bool | None = None  # None: Triton on CUDA, torch elsewhere
    # The CPU swap pool of limits.preemption_mode "swap" (a victim that does not fit there
    # is recomputed, so with 0 bytes every preemption recomputes).
    swap_space_bytes: int = 0
    # Ranks of one replica that split the model (`tensor_parallel.py`); a rank stuck in a
    # collective fails its step after collective_timeout_s, and its group is restarted.
    tensor_parallel_size: int = 1
    collective_timeout_s: float = 60.0

    def torch_device(self) -> torch.device:
        import torch  # here, not at the top: see the module docstring

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def dtype_choice(self) -> tuple[torch.dtype, str]:
        """The model and KV cache dtype, and why (the runner logs it once at start)."""
        import torch  # here, not at the top: see the module docstring

        if self.dtype == "auto":
            if self.torch_device().type == "cuda":
                return torch.bfloat16, "dtype auto on CUDA"
            from pagedserve.services.executor.cpu_features import auto_cpu_dtype

            dtype, reason = auto_cpu_dtype()
            return dtype, f"dtype auto: {reason}"
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype '{self.dtype}' (choose from {', '.join(DTYPES)})")
        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype, f"dtype {self.dtype} as configured"
