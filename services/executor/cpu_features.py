"""What this CPU computes fast, detected at start (machines change between sessions: an AMD
EPYC with AVX2 only, a Xeon with AVX-512 and AMX, a Zen 4 with AVX512-BF16; never assume).

Why it matters: `--dtype auto` on CPU serves in bfloat16 where the CPU multiplies bf16
natively (AMX tiles or the AVX512-BF16 dot-product instructions; oneDNN then runs bf16
GEMMs at about twice the fp32 rate and the weights stream at half the bytes), and in
float32 elsewhere, where bf16 is emulated and slower than fp32.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# /proc/cpuinfo flags that mean native bf16 arithmetic, strongest first.
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class CpuFeatures:
    model_name: str
    flags: frozenset[str]
    torch_capability: str  # torch's own dispatch level ("AVX512", "AVX2", ...)
    torch_bf16: bool  # oneDNN says it has a native bf16 path here

    @property
    def native_bf16_flag(self) -> str | None:
        """The strongest native-bf16 feature present (a /proc/cpuinfo flag), if any."""
        return next((flag for flag in _BF16_FLAGS if flag in self.flags), None)


def _read_cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "unknown CPU", frozenset[str]()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


@functools.cache
def detect() -> CpuFeatures:
    model, flags = _read_cpuinfo()
    if not flags:
        # No /proc/cpuinfo (not Linux): torch's own probes stand in for the flags.
        probed = {"amx_bf16": torch.cpu._is_amx_tile_supported(), "avx512_bf16": torch.cpu._is_avx512_bf16_supported()}
        flags = frozenset(name for name, present in probed.items() if present)
    return CpuFeatures(
        model_name=model,
        flags=flags,
        torch_capability=torch.backends.cpu.get_cpu_capability(),
        torch_bf16=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    )


def auto_cpu_dtype(features: CpuFeatures | None = None) -> tuple[torch.dtype, str]:
    """The dtype `--dtype auto` serves in on this CPU, and why (a sentence for the log)."""
    features = features or detect()
    flag = features.native_bf16_flag
    if flag is not None and features.torch_bf16:
        return torch.bfloat16, f"{features.model_name} has {flag}: native bf16 matmuls"
    if flag is not None:
        return torch.float32, f"{features.model_name} has {flag} but torch's oneDNN has no bf16 path here"
    return torch.float32, (
        f"{features.model_name} has neither AMX nor AVX512-BF16 (torch dispatch {features.torch_capability}): "
        "bf16 would be emulated"
    )
