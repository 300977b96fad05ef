"""A whole decode step in one C call (`kernels/csrc/fused_decode_cpu.c`), for Llama-family
models whose projections are all 4-bit (torch's CPU int4 layout) on a CPU.

Why: at small batch a decode step on a 2-core CPU spent as long dispatching ~600 torch ops
as computing; the C step runs the same layers in one OpenMP region (see the C file for
what it computes and how its numerics differ from the torch path's).

`FusedDecoder` holds the model's pointers in C structs built once; each call passes the
step's inputs. `unavailable_reason` says why a model cannot use it (then the torch path
runs, the reason logged once by the caller).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass

import torch

from pagedserve.kernels.native_build import NativeBuildError, load_library

logger = logging.getLogger(__name__)

Q4_BLOCK = 64  # output rows per block of torch's CPU int4 layout (q4_matmul.h)
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


class _Q4Weight(ctypes.Structure):
    _fields_ = [("packed", ctypes.c_void_p), ("scales_and_zeros", ctypes.c_void_p),
                ("rows", ctypes.c_int64), ("cols", ctypes.c_int64)]


class _DecodeLayer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_attention_norm", ctypes.c_void_p),
                ("qkv", _Q4Weight), ("o", _Q4Weight), ("gate_up", _Q4Weight), ("down", _Q4Weight),
                ("key_cache", ctypes.c_void_p), ("value_cache", ctypes.c_void_p),
                ("sliding_window", ctypes.c_int64), ("kv_group", ctypes.c_int64)]


class _DecodeModel(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in (
        "num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim", "intermediate", "block_size", "num_slots",
        "bf16", "num_kv_groups")] + [("eps", ctypes.c_float), ("scale", ctypes.c_float),
                    ("layers", ctypes.POINTER(_DecodeLayer)), ("final_norm", ctypes.c_void_p)]


@dataclass(frozen=True)
class Q4Tensor:
    """A weight as `_weight_int4pack_mm_for_cpu` takes it: packed uint8 [rows, cols / 2] and
    bfloat16 scales_and_zeros [cols / 32, rows, 2]."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.scales_and_zeros.shape[1])

    @property
    def cols(self) -> int:
        return int(self.packed.shape[1]) * 2

    def struct(self) -> _Q4Weight:
        return _Q4Weight(self.packed.data_ptr(), self.scales_and_zeros.data_ptr(), self.rows, self.cols)


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Q4Tensor
    o: Q4Tensor
    post_attention_norm: torch.Tensor
    gate_up: Q4Tensor
    down: Q4Tensor


@functools.cache
def _library() -> ctypes.CDLL:
    library = load_library("fused_decode_cpu")
    pointer, int64 = ctypes.c_void_p, ctypes.c_int64
    for suffix in _SUFFIX.values():
        function = getattr(library, f"pagedserve_fused_decode_{suffix}")
        function.argtypes = [ctypes.POINTER(_DecodeModel), int64] + [pointer] * 5 + [int64, pointer, pointer]
        function.restype = ctypes.c_int
    library.pagedserve_q4_matmul.argtypes = [pointer, pointer, int64, pointer, pointer, int64, int64, ctypes.c_int]
    library.pagedserve_q4_matmul.restype = ctypes.c_int
    library.pagedserve_q4_bf16_dot.restype = ctypes.c_int
    return library


def bf16_dot_products() -> bool:
    """Whether this CPU's build rounds a bfloat16 model's matmul inputs to bfloat16 for
    AVX512-BF16 dot products (else float32 FMAs, for every model)."""
    return bool(_library().pagedserve_q4_bf16_dot())


def q4_matmul(x: torch.Tensor, weight: Q4Tensor, bf16_activations: bool = False) -> torch.Tensor:
    """x [M, cols] @ w.T -> float32 with the C matmul alone (what the fused step runs per
    layer): x in float32, or rounded to bfloat16 (only where `bf16_dot_products()`)."""
    x = x.to(torch.float32).contiguous()
    out = torch.empty(x.shape[0], weight.rows, dtype=torch.float32)
    failed = _library().pagedserve_q4_matmul(
        out.data_ptr(), x.data_ptr(), x.shape[0], weight.packed.data_ptr(), weight.scales_and_zeros.data_ptr(),
        weight.rows, weight.cols, int(bf16_activations),
    )
    if failed:
        raise RuntimeError("bfloat16 activations need AVX512-BF16" if failed == 1 else "out of memory")
    return out


@functools.cache
def torch_layout_matches() -> bool:
    """Whether this torch packs int4 the way q4_matmul.h reads it (64-row blocks, per column
    32 bytes: low nibbles rows 0..31, high nibbles rows 32..63). The layout is torch's
    internal business, so it is checked, not assumed: a different one disables the C step."""
    rows, cols = 128, 64
    codes = (torch.arange(rows * cols, dtype=torch.int32).reshape(rows, cols) * 7 + 3) % 16
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1).reshape(-1)
    if packed.numel() != rows * cols // 2:
        return False
    n = torch.arange(rows)[:, None]
    k = torch.arange(cols)[None, :]
    index = (n // Q4_BLOCK) * (Q4_BLOCK * cols // 2) + k * 32 + (n % Q4_BLOCK) % 32
    byte = packed[index].to(torch.int32)
    expected = torch.where(n % Q4_BLOCK >= 32, byte >> 4, byte & 0x0F)
    return bool(torch.equal(expected, codes))


def unavailable_reason(dtype: torch.dtype, weights: list[Q4Tensor], device: torch.device) -> str | None:
    """None where the C step can run these weights; otherwise why not."""
    if device.type != "cpu":
        return f"it runs on CPU only, not {device.type}"
    if dtype not in _SUFFIX:
        return f"it computes float32 or bfloat16, not {str(dtype).removeprefix('torch.')}"
    bad = next((w for w in weights if w.rows % Q4_BLOCK or w.cols % 32), None)
    if bad is not None:
        return f"a [{bad.rows}, {bad.cols}] weight is not in whole blocks of {Q4_BLOCK} rows"
    if not torch_layout_matches():
        return f"torch {torch.__version__} packs int4 weights in another layout"
    try:
        _library()
    except NativeBuildError as error:
        return str(error)
    return None


class FusedDecoder:
    """One model's decode step in C. Built once per model (and again where the KV caches
    move); `__call__` takes one step's inputs.

    `sliding_windows[l]`: layer l attends to the last that many tokens (None: all);
    `kv_groups[l]`: the KV group whose slots and block tables layer l uses (layers sharing a
    window share a group, see the scheduler's KV cache manager); by default one group, no
    windows."""

    def __init__(
        self, layers: list[LayerWeights], final_norm: torch.Tensor, *, num_heads: int, num_kv_heads: int,
        head_dim: int, eps: float, dtype: torch.dtype, sliding_windows: list[int | None] | None = None,
        kv_groups: list[int] | None = None,
    ) -> None:
        sliding_windows = sliding_windows or [None] * len(layers)
        kv_groups = kv_groups or [0] * len(layers)
        if len(sliding_windows) != len(layers) or len(kv_groups) != len(layers):
            raise ValueError(
                f"{len(layers)} layers but {len(sliding_windows)} sliding windows and {len(kv_groups)} KV groups"
            )
        if any(window is not None and window < 1 for window in sliding_windows) or min(kv_groups) < 0:
            raise ValueError(f"windows must be >= 1 and KV groups >= 0: {sliding_windows}, {kv_groups}")
        self.layers, self.final_norm, self.dtype = layers, final_norm, dtype
        self.num_kv_groups = max(kv_groups) + 1
        self._function = getattr(_library(), f"pagedserve_fused_decode_{_SUFFIX[dtype]}")
        self._model = _DecodeModel(
            num_layers=len(layers), hidden=final_norm.shape[0], num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, intermediate=layers[0].down.cols, bf16=int(dtype == torch.bfloat16), eps=eps,
            scale=head_dim**-0.5, final_norm=final_norm.data_ptr(), num_kv_groups=self.num_kv_groups,
        )
        self._structs = (_DecodeLayer * len(layers))()
        for struct, layer, window, kv_group in zip(self._structs, layers, sliding_windows, kv_groups):
            struct.sliding_window, struct.kv_group = window or 0, kv_group
            struct.input_norm, struct.post_attention_norm = layer.input_norm.data_ptr(), layer.post_attention_norm.data_ptr()
            struct.qkv, struct.o, struct.gate_up, struct.down = (
                layer.qkv.struct(), layer.o.struct(), layer.gate_up.struct(), layer.down.struct()
            )
        self._model.layers = self._structs
        self._caches_at: tuple[int, ...] = ()

    def _bind_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Point the layers at the KV caches (once, and again only where they moved)."""
        at = tuple(cache.data_ptr() for pair in kv_caches for cache in pair)
        if at == self._caches_at:
            return
        key_cache = kv_caches[0][0]
        if len(kv_caches) != len(self.layers) or any(
            c.dtype != self.dtype or not c.is_contiguous() or c.shape != key_cache.shape for pair in kv_caches for c in pair
        ):
            raise ValueError("the fused decode step needs one contiguous K and V cache per layer in the model dtype")
        num_blocks, block_size = key_cache.shape[:2]
        self._model.block_size, self._model.num_slots = block_size, num_blocks * block_size
        for struct, (key, value) in zip(self._structs, kv_caches):
            struct.key_cache, struct.value_cache = key.data_ptr(), value.data_ptr()
        self._caches_at = at

    def __call__(
        self, embedded: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]], slot_mapping: torch.Tensor, block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
    ) -> torch.Tensor:
        """embedded [rows, hidden] -> final normed hidden states [rows, hidden]; writes each
        token's K/V into its slot on the way. slot_mapping int64 [num_kv_groups, rows],
        block_tables int32 [num_kv_groups, rows, blocks] (the group dimension may be left out
        with one group) and seq_lens int32 [rows], all contiguous, one row per token (every
        token a decode)."""
        self._bind_caches(kv_caches)
        rows = embedded.shape[0]
        if self.num_kv_groups == 1 and slot_mapping.dim() == 1:
            slot_mapping, block_tables = slot_mapping[None], block_tables[None]
        half = self._model.head_dim // 2
        if not (
            embedded.dtype == cos.dtype == sin.dtype == self.dtype and embedded.shape == (rows, self._model.hidden)
            and cos.shape == sin.shape == (rows, half)
            and embedded.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
        ):
            raise ValueError("fused decode: embeddings [rows, hidden] and cos/sin [rows, head_dim / 2], dense, in the model dtype")
        if not (
            slot_mapping.dtype == torch.int64 and block_tables.dtype == seq_lens.dtype == torch.int32
            and slot_mapping.shape == (self.num_kv_groups, rows) and block_tables.dim() == 3
            and block_tables.shape[:2] == (self.num_kv_groups, rows) and seq_lens.shape == (rows,)
            and block_tables.is_contiguous() and slot_mapping.is_contiguous() and seq_lens.is_contiguous()
        ):
            raise ValueError(
                f"fused decode: one int64 slot and int32 block-table row per token in each of {self.num_kv_groups} "
                f"KV groups, one int32 length per token; got slots {tuple(slot_mapping.shape)}, tables "
                f"{tuple(block_tables.shape)}, lengths {tuple(seq_lens.shape)} for {rows} rows"
            )
        out = torch.empty_like(embedded)
        failed = self._function(
            ctypes.byref(self._model), rows, embedded.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            slot_mapping.data_ptr(), block_tables.data_ptr(), block_tables.shape[2], seq_lens.data_ptr(), out.data_ptr(),
        )
        if failed == 1:
            raise IndexError(f"a slot in slot_mapping is past the KV cache's {self._model.num_slots:,} slots")
        if failed:
            raise MemoryError("the fused decode step could not allocate its activations")
        return out
