"""Which code path a CPU step of N rows (tokens) takes: the row cut-offs, in one table.

Three paths beat the plain torch layers only for small steps, where a step streams the
weights from memory rather than computes: the fused C decode step, torch's int4 matmuls,
and the int8 LM head. Each has a most-rows cut-off, measured as whole engine decode steps
on a 2-core AMD EPYC with AVX512-BF16 and the embedded model (`benchmarks/cpu_speed.py`,
docs/cpu-path.md); another machine may want others, so they can be overridden without editing
code: `PAGEDSERVE_STEP_PATHS="fused_decode_max_rows=16,int8_lm_head_max_rows=4"` in the
executor's environment (every process `pagedserve up` starts inherits it, tensor-parallel
ranks too). The model runner reads it once at start and logs the table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import msgspec
import torch

ENV_VAR = "PAGEDSERVE_STEP_PATHS"


class StepPaths(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Decode-only steps of up to this many tokens run as one fused C call
    # (`kernels/fused_decode.py`) wherever 4-bit weights are packed, whatever rows the torch
    # int4 kernel takes (the C matmuls are faster). bf16: fused 4.0 / 6.5 / 12.6 / 22.6 /
    # 37.3 / 47.9 ms at 1 / 4 / 8 / 16 / 24 / 32 rows against 10.1 / 14.9 / 22.7 / 36.5 /
    # 44.2 / 50.5 for the torch layers; equal at 48 rows, behind at 64 (87.0 against 80.6).
    # fp32 (FMA matmuls): 6.5 / 34.5 / 86.8 against 12.1 / 38.6 / 88.5 at 1 / 8 / 32 rows.
    fused_decode_max_rows: int = 32
    # `--weight-format auto`: the most rows a step runs through torch's int4 kernel; above,
    # the dense weights. bf16: 49 ms at 16 rows against 50 dense, 40 against 47-52 at 8; at
    # 32 rows dense wins (79 against 95). fp32 (CPUs without AVX512-BF16 or AMX): int4 beat
    # dense at batch 8 and 32 alike (127 against 83, 258 against 197 tok/s).
    int4_max_rows_bfloat16: int = 16
    int4_max_rows_float32: int = 32
    # The int8 LM head (`quantized_linear.Int8Linear`, the C kernel against a bf16 GEMM, the
    # embedded head 49152 x 576): 0.71 against 3.29 ms at 1 row, 1.23 against 3.72 at 4,
    # 2.81 against 4.18 at 8.
    int8_lm_head_max_rows: int = 8

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            if getattr(self, name) < 0:
                raise ValueError(f"{ENV_VAR}: {name} must be >= 0 (0: never that path), got {getattr(self, name)}")

    def int4_max_rows(self, dtype: torch.dtype) -> int | None:
        """The int4 cut-off for a model dtype; None where int4 matmuls are not exact
        enough (anything but bf16 and fp32)."""
        return {torch.bfloat16: self.int4_max_rows_bfloat16, torch.float32: self.int4_max_rows_float32}.get(dtype)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> StepPaths:
        """The defaults, with the overrides of `PAGEDSERVE_STEP_PATHS` (`name=rows,...`)."""
        text = environ.get(ENV_VAR, "").strip()
        if not text:
            return cls()
        overrides: dict[str, int] = {}
        for item in text.split(","):
            name, _, rows = item.partition("=")
            name = name.strip()
            if name not in cls.__struct_fields__:
                raise ValueError(f"{ENV_VAR}: unknown cut-off '{name}' (known: {', '.join(cls.__struct_fields__)})")
            try:
                overrides[name] = int(rows)
            except ValueError:
                raise ValueError(f"{ENV_VAR}: {name} needs a whole number of rows, got '{rows.strip()}'") from None
        return cls(**overrides)

    def describe(self) -> str:
        return ", ".join(f"{name} {getattr(self, name)}" for name in self.__struct_fields__)
