"""Typed configuration, one struct per service, built from CLI flags in `shared/cli.py`."""

from __future__ import annotations

import msgspec
import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class EngineConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Everything an engine (scheduler core + model runner) needs."""

    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    block_size: int = 16
    kv_cache_memory_bytes: int = 1 << 30  # CPU budget for the KV cache
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of free memory for the KV cache
    num_kv_blocks: int | None = None  # overrides the memory-derived block count
    max_model_len: int | None = None  # None: the model's max positions
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_num_waiting: int = 1024
    use_triton: bool | None = None  # None: Triton on CUDA, torch elsewhere
    enable_prefix_caching: bool = True  # reuse the K/V of full blocks shared by prompts
    # Preemption: "recompute" or "swap" (into a CPU swap pool of swap_space_bytes; a victim
    # that does not fit there is recomputed, so with 0 bytes every preemption recomputes).
    preemption_mode: str = "recompute"
    swap_space_bytes: int = 0

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype '{self.dtype}' (choose from auto, {', '.join(DTYPES)})")
        return DTYPES[self.dtype]
