"""The engine's typed config: what a model runner needs (model, device, dtype, KV cache
size) and, for the in-process engine, the scheduling limits it hands its scheduler core.

Built from CLI flags in `services/cli.py`. It is plain data and imports no torch: the CLI
builds it in processes (scheduler, gateway) that never load torch; only the model runner
turns the device and dtype names into torch objects, through the two methods below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

import msgspec

from pagedserve.services.scheduler.config import (
    DEFAULT_ENABLE_PREFIX_CACHING,
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    DEFAULT_MAX_NUM_WAITING,
    DEFAULT_PREEMPTION_MODE,
    PreemptionMode,
)

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
    max_model_len: int | None = None  # None: the model's max positions
    # The scheduler core's limits (services/scheduler/config.py owns them and their defaults).
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_num_waiting: int = DEFAULT_MAX_NUM_WAITING
    use_triton: bool | None = None  # None: Triton on CUDA, torch elsewhere
    enable_prefix_caching: bool = DEFAULT_ENABLE_PREFIX_CACHING  # reuse the K/V of full blocks shared by prompts
    # Preemption: "recompute" or "swap" (into a CPU swap pool of swap_space_bytes; a victim
    # that does not fit there is recomputed, so with 0 bytes every preemption recomputes).
    preemption_mode: PreemptionMode = DEFAULT_PREEMPTION_MODE
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

    def torch_dtype(self) -> torch.dtype:
        return self.dtype_choice()[0]

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


class ExecutorConfig(msgspec.Struct, forbid_unknown_fields=True):
    """An executor process: its engine, and how it reaches its scheduler."""

    engine: EngineConfig
    scheduler_address: str = "tcp://127.0.0.1:5556"
    executor_id: str = ""  # "": a fresh random id
    heartbeat_interval_s: float = 1.0  # the scheduler counts it lost after its heartbeat timeout
    curve_keys_dir: str | None = None  # CURVE-secure the link to the scheduler (shared/zmq_security.py)
    # Tensor parallel: this process's rank among engine.tensor_parallel_size, and the
    # group's rendezvous (tcp://host:port; None: torch's MASTER_ADDR/MASTER_PORT env vars).
    rank: int = 0
    dist_init_address: str | None = None
