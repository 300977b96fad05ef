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
from pagedserve.services.executor.quantized_linear import Int4Weight
from pagedserve.services.executor.tensor_parallel import ShardPlan
from pagedserve.shared.model_source import ModelSource

# llama.cpp tensor name -> HF tensor name ({} = layer index)
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
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


def gguf_name_to_hf(name: str) -> str | None:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    match = _GGUF_LAYER_RE.match(name)
    if match is None or match.group(2) not in _GGUF_LAYER_NAMES:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"


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

    reader = gguf.GGUFReader(path)
    for tensor in reader.tensors:
        hf_name = gguf_name_to_hf(tensor.name)
        if hf_name is None:
            continue
        quantized = _decode_int4(tensor, gguf) if keep_int4 and _LINEAR_WEIGHT_RE.search(hf_name) else None
        heads = {"q_proj.weight": config.num_heads, "k_proj.weight": config.num_kv_heads}
        num_heads = next((n for suffix, n in heads.items() if hf_name.endswith(suffix)), None)
        shard = plan.slice_of(hf_name) if plan is not None else None
        if quantized is not None:
            if num_heads is not None:
                quantized = quantized.take_rows(_rotary_row_order(quantized.shape[0], num_heads))
            if shard is not None:
                dim, start, length = shard
                quantized = quantized.take_rows(slice(start, start + length)) if dim == 0 else quantized.take_cols(start, length)
            yield hf_name, quantized
            continue
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if num_heads is not None:
            array = _unpermute_rotary(array, num_heads)
        if shard is not None:
            dim, start, length = shard
            array = array[start : start + length] if dim == 0 else array[:, start : start + length]
        yield hf_name, torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy


def iter_safetensors_weights(directory: str, plan: ShardPlan | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors.torch import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {directory}")
    for file in files:
        with safe_open(os.fspath(file), framework="pt") as handle:
            for name in handle.keys():
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
    return iter_safetensors_weights(source.directory, plan)
