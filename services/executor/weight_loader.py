"""Weights into HF's naming (`model.layers.N.self_attn.q_proj.weight`, ...) from a GGUF
file or an HF folder of safetensors.

GGUF tensors are dequantized with the `gguf` package, except, when asked, the 4-bit
(Q4_0, Q4_1) weights of linear layers: those come as `Int4Weight` codes and scales, to be
packed for the int4 matmul (`quantized_linear.py`).

A tensor-parallel rank gets only its slice of each sharded weight (`ShardPlan.slice_of`):
from safetensors it reads only that slice from disk; from a GGUF it decodes one tensor at
a time and keeps the slice (a 4-bit weight's column slice must hold whole groups of 32)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pagedserve.services.executor.model_config import ModelConfig
from pagedserve.services.executor.model_families import FAMILIES, Family
from pagedserve.services.executor.quantized_linear import Int4Weight
from pagedserve.services.executor.tensor_parallel import ShardPlan
from pagedserve.shared.model_source import ModelSource

# llama.cpp's names outside the blocks -> HF's (the names inside are per family:
# `model_families.py`).
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def _unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per rotary pair; HF keeps the two halves of
    each head apart. Undo llama.cpp's permutation so the weights equal HF's exactly."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_name_to_hf(name: str, family: Family = FAMILIES["llama"]) -> str | None:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    match = _GGUF_LAYER_RE.match(name)
    if match is None:
        return None
    layer, part, kind = match.groups()
    module = family.gguf_name(part)
    return None if module is None else f"model.layers.{layer}.{module}.{kind}"


def split_fused(name: str, config: ModelConfig) -> list[tuple[str, int, int]] | None:
    """Phi-3's fused `qkv_proj` / `gate_up_proj` checkpoints as (HF name, first row,
    rows) of their parts, so every family reaches sharding and loading with the same
    q/k/v and gate/up names; None for any other weight."""
    q, kv, mlp = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.intermediate_size
    if name.endswith("self_attn.qkv_proj.weight") or name.endswith("self_attn.qkv_proj.bias"):
        prefix, kind = name.rsplit(".qkv_proj.", 1)
        return [(f"{prefix}.q_proj.{kind}", 0, q), (f"{prefix}.k_proj.{kind}", q, kv), (f"{prefix}.v_proj.{kind}", q + kv, kv)]
    if name.endswith("mlp.gate_up_proj.weight"):
        prefix = name.removesuffix(".gate_up_proj.weight")
        return [(f"{prefix}.gate_proj.weight", 0, mlp), (f"{prefix}.up_proj.weight", mlp, mlp)]
    return None


def _shard(array: object, shard: tuple[int, int, int] | None) -> object:
    """A tensor's or array's slice (dim, start, length); the whole for None."""
    if shard is None:
        return array
    dim, start, length = shard
    return array[start : start + length] if dim == 0 else array[:, start : start + length]


# Weights read by a matmul (not the embedding table, which is indexed by row).
_LINEAR_WEIGHT_RE = re.compile(r"(_proj|lm_head)\.weight$")


def _rotary_row_order(rows: int, num_heads: int) -> np.ndarray:
    """The row permutation `_unpermute_rotary` applies, as indices (for quantized rows)."""
    return _unpermute_rotary(np.arange(rows).reshape(rows, 1), num_heads)[:, 0]


def _decode_int4(tensor: object, gguf: object) -> Int4Weight | None:
    """A Q4_0 / Q4_1 tensor as codes and scales; None for any other type."""
    kinds = {gguf.GGMLQuantizationType.Q4_1: Int4Weight.from_q4_1, gguf.GGMLQuantizationType.Q4_0: Int4Weight.from_q4_0}
    decode = kinds.get(tensor.tensor_type)
    if decode is None or len(tensor.shape) != 2:
        return None
    cols, rows = (int(n) for n in tensor.shape)  # GGUF lists the fastest-varying dimension first
    return decode(tensor.data, rows, cols)


def iter_gguf_weights(
    path: str, config: ModelConfig, plan: ShardPlan | None = None, keep_int4: bool = False
) -> Iterator[tuple[str, torch.Tensor | Int4Weight]]:
    import gguf

    family = config.family
    reader = gguf.GGUFReader(path)
    for tensor in reader.tensors:
        hf_name = gguf_name_to_hf(tensor.name, family)
        if hf_name is None:
            continue
        quantized = _decode_int4(tensor, gguf) if keep_int4 and _LINEAR_WEIGHT_RE.search(hf_name) else None
        heads = {"q_proj.weight": config.num_heads, "k_proj.weight": config.num_kv_heads}
        permuted = family.gguf_rotary_permuted
        num_heads = next((n for suffix, n in heads.items() if permuted and hf_name.endswith(suffix)), None)
        parts = split_fused(hf_name, config) or [(hf_name, 0, None)]
        if quantized is not None:
            if num_heads is not None:
                quantized = quantized.take_rows(_rotary_row_order(quantized.shape[0], num_heads))
            for name, first_row, rows in parts:
                part = quantized if rows is None else quantized.take_rows(slice(first_row, first_row + rows))
                shard = plan.slice_of(name) if plan is not None else None
                if shard is not None:
                    dim, start, length = shard
                    part = part.take_rows(slice(start, start + length)) if dim == 0 else part.take_cols(start, length)
                yield name, part
            continue
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if num_heads is not None:
            array = _unpermute_rotary(array, num_heads)
        if family.gguf_norm_offset and hf_name.endswith("norm.weight"):
            array = array - family.gguf_norm_offset  # back to HF's w of (1 + w)
        for name, first_row, rows in parts:
            part = array if rows is None else array[first_row : first_row + rows]
            part = _shard(part, plan.slice_of(name) if plan is not None else None)
            yield name, torch.from_numpy(np.array(part, dtype=np.float32))  # a writable copy


def iter_safetensors_weights(
    directory: str, config: ModelConfig, plan: ShardPlan | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors.torch import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {directory}")
    for file in files:
        with safe_open(os.fspath(file), framework="pt") as handle:
            for name in handle.keys():
                parts = split_fused(name, config)
                if parts is not None:  # read whole, then split (Phi-3 only)
                    fused = handle.get_tensor(name)
                    for part_name, first_row, rows in parts:
                        part = fused[first_row : first_row + rows]
                        yield part_name, _shard(part, plan.slice_of(part_name) if plan is not None else None)
                    continue
                shard = plan.slice_of(name) if plan is not None else None
                if shard is None:
                    yield name, handle.get_tensor(name)
                    continue
                dim, start, length = shard
                lazy = handle.get_slice(name)
                yield name, lazy[start : start + length] if dim == 0 else lazy[:, start : start + length]


def iter_weights(
    source: ModelSource, config: ModelConfig, plan: ShardPlan | None = None, keep_int4: bool = False
) -> Iterator[tuple[str, torch.Tensor | Int4Weight]]:
    """(HF name, tensor) pairs in the checkpoint's own dtype (float32 for GGUF), with
    `keep_int4` the GGUF's 4-bit linear weights as `Int4Weight`; with a plan, this rank's
    slice of each sharded tensor. `config` is the whole model's."""
    if source.gguf_file is not None:
        return iter_gguf_weights(os.path.join(source.directory, source.gguf_file), config, plan, keep_int4)
    return iter_safetensors_weights(source.directory, config, plan)
