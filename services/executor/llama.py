"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, TinyLlama, Qwen2) over a paged KV cache.

One forward runs a flattened batch of mixed prefill chunks and decode tokens with no
padding: tokens are [num_tokens], hidden states [num_tokens, hidden]. Numerics follow
HF transformers step by step (RMSNorm and RoPE tables in float32, then cast) so greedy
outputs can be compared token for token.

Tensor parallel: built from a rank's `ShardPlan.local_config` (its heads, KV heads and
MLP columns), the same code is one rank's shard; the outputs of o_proj and down_proj are
partial sums that `TensorParallelGroup.all_reduce` completes (a no-op for one rank).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.kernels import q8_matmul
from pagedserve.kernels.paged_attention_ops import PagedAttentionOps
from pagedserve.kernels.fused_decode import FusedDecoder, LayerWeights, Q4Tensor, unavailable_reason
from pagedserve.kernels.rms_norm import add_rms_norm
from pagedserve.kernels.rotary import apply_rotary
from pagedserve.services.executor.attention_metadata import AttentionMetadata
from pagedserve.services.executor.distributed import TensorParallelGroup
from pagedserve.services.executor.model_config import ModelConfig
from pagedserve.services.executor.quantized_linear import Int4Linear, Int4Weight, Int8Linear

logger = logging.getLogger(__name__)

# The most tokens a decode-only step runs through the fused C step (`kernels/fused_decode.py`)
# rather than the torch layers, wherever 4-bit weights are packed (whatever rows the torch
# int4 kernel takes: the C matmuls are faster). Measured as whole engine decode steps (2-core
# AMD EPYC with AVX512-BF16, the embedded model, bf16): fused 4.0 / 6.5 / 12.6 / 22.6 / 37.3 /
# 47.9 ms at 1 / 4 / 8 / 16 / 24 / 32 rows against 10.1 / 14.9 / 22.7 / 36.5 / 44.2 / 50.5
# for the torch layers (int4 up to 16 rows, dense above); equal at 48 rows, behind at 64
# (87.0 against 80.6). fp32 (FMA matmuls): 6.5 / 34.5 / 86.8 against 12.1 / 38.6 / 88.5 at
# 1 / 8 / 32 rows.
FUSED_DECODE_MAX_ROWS = 32


class RMSNorm(nn.Module):
    """RMSNorm of the residual stream, fused with the add that precedes it (vLLM's shape):
    `forward(residual, x)` adds x into residual in place, then normalises. Statistics in
    float32 whatever the model dtype, as HF does (`kernels/rms_norm.py`)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, residual: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return add_rms_norm(x, residual, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin of every position, computed once in float32 like HF's, then cast. The step's
    rows are gathered once per forward (`tables`), not once per layer; the rotation itself
    is `kernels/rotary.py` (q and k in one pass)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        inv_freq, scaling = _rope_inv_freq(config)
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [positions, head_dim / 2]
        self.register_buffer("cos", (freqs.cos() * scaling).to(dtype), persistent=False)
        self.register_buffer("sin", (freqs.sin() * scaling).to(dtype), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the step's positions: [num_tokens, head_dim / 2] each."""
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)


def _rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for the model's RoPE variant. Scaled variants (llama3, linear,
    yarn, ...) come from transformers' own table so they match HF exactly."""
    params = config.rope_parameters
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = float(params["rope_theta"])
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config.hf_config, torch.device("cpu"))
    return inv_freq.to(torch.float32), float(scaling)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, group: TensorParallelGroup) -> None:
        super().__init__()
        self.group = group
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim**-0.5
        # q, k and v projections fused into one GEMM.
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(
        self,
        hidden: torch.Tensor,
        rotary_tables: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        kernels: PagedAttentionOps,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj.forward(hidden)
        qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        qk = apply_rotary(qk, *rotary_tables)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        key_cache, value_cache = kv_cache
        # New K/V go into the cache first: attention then reads every token, new or
        # cached, through the block table.
        kernels.reshape_and_cache(k, v, key_cache, value_cache, meta.slot_mapping)
        nd = meta.num_decode_tokens
        parts = []
        if nd > 0:
            parts.append(
                kernels.paged_decode_attention(
                    q[:nd], key_cache, value_cache, meta.decode_block_tables, meta.decode_seq_lens,
                    self.scale, meta.max_decode_seq_len,
                )
            )
        if meta.num_prefills > 0:
            parts.append(
                kernels.paged_prefill_attention(
                    q[nd:], key_cache, value_cache, meta.prefill_block_tables,
                    meta.prefill_query_start_loc, meta.prefill_seq_lens, self.scale,
                    meta.max_prefill_query_len, meta.max_prefill_seq_len,
                )
            )
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return self.group.all_reduce(self.o_proj.forward(out.reshape(num_tokens, self.q_size)))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, group: TensorParallelGroup) -> None:
        super().__init__()
        self.group = group
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.forward(x).split(self.intermediate_size, dim=-1)
        # In place, in the projection's own output: the same values as silu(gate) * up
        # without two [num_tokens, intermediate] temporaries.
        return self.group.all_reduce(self.down_proj.forward(F.silu(gate, inplace=True).mul_(up)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, group: TensorParallelGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, group)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, group)


class LlamaForCausalLM(nn.Module):
    rotary: RotaryEmbedding  # set by `build`: its tables are computed, not loaded
    int4_max_rows: int = sys.maxsize  # set by `build`: see Int4Linear
    fused_decoder: FusedDecoder | None = None  # set by `build` where the model can use it
    fused_max_rows: int = 0

    def __init__(self, config: ModelConfig, group: TensorParallelGroup | None = None) -> None:
        super().__init__()
        self.config = config
        group = group or TensorParallelGroup()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, group) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.requires_grad_(False)

    @classmethod
    def build(
        cls,
        config: ModelConfig,
        weights: Iterable[tuple[str, torch.Tensor | Int4Weight]],
        dtype: torch.dtype,
        device: torch.device,
        group: TensorParallelGroup | None = None,
        int4_max_rows: int = sys.maxsize,
    ) -> "LlamaForCausalLM":
        """Construct without random initialisation (parameters on the meta device first),
        then load the checkpoint and compute the RoPE tables for real. With a group,
        `config` and `weights` are this rank's shard (`tensor_parallel.py`). An `Int4Weight`
        replaces its linear layer by an `Int4Linear` (`quantized_linear.py`), which keeps a
        dense copy too for steps of more than `int4_max_rows` rows unless that is sys.maxsize.
        Where 4-bit weights stay packed (int4_max_rows > 0) a dense LM head gets an int8 copy
        for small steps as well (`Int8Linear`)."""
        with torch.device("meta"):
            model = cls(config, group)
        model = model.to_empty(device=device).to(dtype)
        model.int4_max_rows = int4_max_rows
        model.load_weights(
            (name, tensor if isinstance(tensor, Int4Weight) else tensor.to(dtype)) for name, tensor in weights
        )
        model.rotary = RotaryEmbedding(config, dtype).to(device)
        head = model.lm_head
        if int4_max_rows > 0 and type(head) is nn.Linear and head.bias is None and q8_matmul.available() and (
            head.out_features % q8_matmul.BLOCK == 0 and head.in_features % q8_matmul.GROUP == 0
        ):
            model.lm_head = Int8Linear(head.weight)
        model._install_fused_decoder(group or TensorParallelGroup(), dtype, device)
        return model.eval()

    def _install_fused_decoder(self, group: TensorParallelGroup, dtype: torch.dtype, device: torch.device) -> None:
        """Decode steps of up to FUSED_DECODE_MAX_ROWS tokens run as one C call where every
        projection is a bias-free Int4Linear on one rank; logged either way when 4-bit
        weights are packed."""
        if self.int4_max_rows <= 0:
            return
        projections = [
            (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            for layer in self.layers
        ]
        if group.world_size != 1:
            reason = "it runs on one rank"
        elif not all(isinstance(lin, Int4Linear) and lin.bias is None for four in projections for lin in four):
            reason = "not every projection is a bias-free 4-bit weight"
        else:
            q4 = [[Q4Tensor(lin.packed, lin.scales_and_zeros) for lin in four] for four in projections]
            reason = unavailable_reason(dtype, [w for four in q4 for w in four], device)
        if reason is not None:
            logger.info("decode steps run layer by layer in torch: the fused C step is off (%s)", reason)
            return
        layers = [
            LayerWeights(layer.input_layernorm.weight, qkv, o, layer.post_attention_layernorm.weight, gate_up, down)
            for layer, (qkv, o, gate_up, down) in zip(self.layers, q4)
        ]
        self.fused_decoder = FusedDecoder(
            layers, self.norm.weight, num_heads=self.config.num_heads, num_kv_heads=self.config.num_kv_heads,
            head_dim=self.config.head_dim, eps=self.config.rms_norm_eps, dtype=dtype,
        )
        self.fused_max_rows = FUSED_DECODE_MAX_ROWS
        logger.info("decode steps of up to %d tokens run as one fused C call", self.fused_max_rows)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        kernels: PagedAttentionOps,
    ) -> torch.Tensor:
        """[num_tokens] ids -> [num_tokens, hidden] final hidden states (normed).

        `residual` is the residual stream, updated in place: each norm first adds the
        previous sublayer's output into it (HF's `residual + hidden`, same values)."""
        residual = self.embed_tokens(input_ids)  # a fresh tensor: ours to update in place
        hidden: torch.Tensor | None = None
        tables = self.rotary.tables(positions)
        num_tokens = input_ids.shape[0]
        if (
            self.fused_decoder is not None and 0 < num_tokens <= self.fused_max_rows
            and meta.num_decode_tokens == num_tokens and meta.num_prefills == 0
        ):
            return self.fused_decoder(
                residual, *tables, kv_caches, meta.slot_mapping, meta.decode_block_tables, meta.decode_seq_lens
            )
        # `.forward` directly: nn.Module.__call__'s hook checks cost ~2 ms a decode step
        # on CPU across 30 layers, and these modules have no hooks.
        for layer, kv_cache in zip(self.layers, kv_caches):
            normed = layer.input_layernorm.forward(residual, hidden)
            hidden = layer.self_attn.forward(normed, tables, kv_cache, meta, kernels)
            hidden = layer.mlp.forward(layer.post_attention_layernorm.forward(residual, hidden))
        return self.norm(residual, hidden)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | Int4Weight]]) -> None:
        """Load HF-named tensors, fusing q/k/v and gate/up; every parameter must be set.
        Int4 weights are fused the same way (by rows) and replace their linear layer; a
        fused projection whose parts are not all int4 is dequantized whole."""
        params = dict(self.named_parameters())
        fused = {
            "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
        }
        loaded: set[str] = set()
        pending: dict[str, dict[int, torch.Tensor]] = {}
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in fused:
                target, index = fused[parts[-2]]
                full = ".".join(parts[:-2] + [target, parts[-1]])
                pending.setdefault(full, {})[index] = tensor
                expected = 3 if target == "qkv_proj" else 2
                if len(pending[full]) == expected:
                    parts_by_index = pending.pop(full)
                    shards = [parts_by_index[i] for i in range(expected)]
                    if all(isinstance(shard, Int4Weight) for shard in shards):
                        self._install_int4(params, full, Int4Weight.cat(shards))
                    else:
                        dense = [s.dequantize().to(params[full].dtype) if isinstance(s, Int4Weight) else s for s in shards]
                        self._copy_param(params, full, torch.cat(dense, dim=0))
                    loaded.add(full)
                continue
            if isinstance(tensor, Int4Weight):
                self._install_int4(params, name, tensor)
            else:
                self._copy_param(params, name, tensor)
            loaded.add(name)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
            loaded.add("lm_head.weight")
        missing = sorted(set(params) - loaded)
        if missing or pending:
            raise ValueError(f"checkpoint is missing weights: {missing[:5] + sorted(pending)[:5]}")

    def _install_int4(self, params: dict[str, nn.Parameter], name: str, weight: Int4Weight) -> None:
        """Replace the linear layer owning `name` (a `.weight`) by an Int4Linear; its bias,
        loaded before or after, stays the same parameter."""
        if name not in params:
            raise ValueError(f"unexpected weight '{name}' in checkpoint")
        if tuple(params[name].shape) != weight.shape:
            raise ValueError(f"weight '{name}' has shape {weight.shape}, model expects {tuple(params[name].shape)}")
        path, attribute = name.removesuffix(".weight").rpartition(".")[::2]
        parent = self.get_submodule(path)
        linear = getattr(parent, attribute)
        dense = weight.dequantize().to(params[name].dtype) if self.int4_max_rows < sys.maxsize else None
        setattr(parent, attribute, Int4Linear(weight, linear.bias, dense, self.int4_max_rows).to(params[name].device))

    @staticmethod
    def _copy_param(params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> None:
        if name not in params:
            raise ValueError(f"unexpected weight '{name}' in checkpoint")
        param = params[name]
        if param.shape != tensor.shape:
            raise ValueError(f"weight '{name}' has shape {tuple(tensor.shape)}, model expects {tuple(param.shape)}")
        param.data.copy_(tensor)
