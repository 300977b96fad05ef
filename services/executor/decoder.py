"""The decoder every supported family runs (Llama 2/3, SmolLM2, Mistral, TinyLlama, Qwen2,
Qwen3, Gemma 2, Gemma 3, Phi-3) over a paged KV cache.

One forward runs a flattened batch of mixed prefill chunks and decode tokens with no
padding: tokens are [num_tokens], hidden states [num_tokens, hidden]. Numerics follow
HF transformers step by step (RMSNorm and RoPE tables in float32, then cast) so greedy
outputs can be compared token for token. Where the families differ (q/k norms, Gemma's
norms around both blocks, GeGLU, soft-capping, sliding windows, a RoPE base per layer
kind) the layers read switches from `ModelConfig` (`model_families.py` says why one
decoder rather than a module per family).

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
from pagedserve.services.executor.softcap_attention import softcapped_paged_attention
from pagedserve.services.executor.step_paths import StepPaths

logger = logging.getLogger(__name__)

# The MLP gate's activation by HF's name: SwiGLU (silu) or Gemma's GeGLU (tanh GELU).
_GATE_ACTIVATIONS = {
    "silu": lambda gate: F.silu(gate, inplace=True),
    "gelu_pytorch_tanh": lambda gate: F.gelu(gate, approximate="tanh"),
}


class RMSNorm(nn.Module):
    """RMSNorm of the residual stream, fused with the add that precedes it (vLLM's shape):
    `forward(residual, x)` adds x into residual in place, then normalises; with x None it
    only normalises (`residual` unchanged). Statistics in float32 whatever the model dtype,
    as HF does (`kernels/rms_norm.py`). Gemma's `(1 + w)` weights are stored with the 1
    added at load (`DecoderForCausalLM.load_weights`)."""

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

    def __init__(self, config: ModelConfig, layer_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        inv_freq, scaling, long_from = _rope_inv_freq(config, layer_type)
        freqs = positions[:, None] * inv_freq[None, :]  # [positions, head_dim / 2]
        if long_from is not None:  # LongRoPE: the long factors from the original context on
            long_inv_freq = _rope_inv_freq(config, layer_type, seq_len=long_from + 1)[0]
            freqs[long_from:] = positions[long_from:, None] * long_inv_freq[None, :]
        self.register_buffer("cos", (freqs.cos() * scaling).to(dtype), persistent=False)
        self.register_buffer("sin", (freqs.sin() * scaling).to(dtype), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the step's positions: [num_tokens, head_dim / 2] each."""
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)


def _rope_inv_freq(
    config: ModelConfig, layer_type: str, seq_len: int | None = None
) -> tuple[torch.Tensor, float, int | None]:
    """Inverse frequencies for one kind of layer's RoPE variant, its cos/sin scaling, and
    for LongRoPE (Phi-3) the position from which the long factors apply. Scaled variants
    (llama3, linear, yarn, longrope) come from transformers' own table so they match HF.

    LongRoPE: HF switches a whole forward to the long factors once its longest sequence
    passes `original_max_position_embeddings`; a paged cache cannot re-rotate what it
    holds, so here each position uses the factors of its own place (as vLLM does): equal
    to HF for every sequence within the original context."""
    params = config.rope_parameters_for(layer_type)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = float(params["rope_theta"])
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
        return inv_freq, 1.0, None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    per_kind = layer_type in (getattr(config.hf_config, "rope_parameters", None) or {})
    kwargs = {"layer_type": layer_type} if per_kind else {}
    if seq_len is not None:
        kwargs["seq_len"] = seq_len
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config.hf_config, torch.device("cpu"), **kwargs)
    long_from = int(params["original_max_position_embeddings"]) if rope_type == "longrope" else None
    if long_from is not None and long_from >= config.max_position_embeddings:
        long_from = None
    return inv_freq.to(torch.float32), float(scaling), long_from


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, group: TensorParallelGroup) -> None:
        super().__init__()
        self.group = group
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.attention_scale if config.attention_scale is not None else config.head_dim**-0.5
        self.layer_type = config.layer_types[layer_index]
        self.sliding_window = config.layer_windows[layer_index]
        self.logit_softcap = config.attn_logit_softcap
        # q, k and v projections fused into one GEMM.
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        # Qwen3 and Gemma 3 normalise each q and k head (over head_dim) before RoPE.
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.family.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.family.qk_norm else None

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
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm.forward(qk[:, : self.num_heads].reshape(-1, self.head_dim))
            k = self.k_norm.forward(qk[:, self.num_heads :].reshape(-1, self.head_dim))
            qk = torch.cat([q.view(num_tokens, -1, self.head_dim), k.view(num_tokens, -1, self.head_dim)], dim=1)
        qk = apply_rotary(qk, *rotary_tables)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        key_cache, value_cache = kv_cache
        # New K/V go into the cache first: attention then reads every token, new or
        # cached, through the block table.
        kernels.reshape_and_cache(k, v, key_cache, value_cache, meta.slot_mapping)
        if self.logit_softcap is not None:
            out = softcapped_paged_attention(q, key_cache, value_cache, meta, self.scale, self.logit_softcap, self.sliding_window)
            return self.group.all_reduce(self.o_proj.forward(out.reshape(num_tokens, self.q_size)))
        # Only windowed layers pass the keyword: a global layer calls the ops as before.
        window = {} if self.sliding_window is None else {"sliding_window": self.sliding_window}
        nd = meta.num_decode_tokens
        parts = []
        if nd > 0:
            parts.append(
                kernels.paged_decode_attention(
                    q[:nd], key_cache, value_cache, meta.decode_block_tables, meta.decode_seq_lens,
                    self.scale, meta.max_decode_seq_len, **window,
                )
            )
        if meta.num_prefills > 0:
            parts.append(
                kernels.paged_prefill_attention(
                    q[nd:], key_cache, value_cache, meta.prefill_block_tables,
                    meta.prefill_query_start_loc, meta.prefill_seq_lens, self.scale,
                    meta.max_prefill_query_len, meta.max_prefill_seq_len, **window,
                )
            )
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return self.group.all_reduce(self.o_proj.forward(out.reshape(num_tokens, self.q_size)))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, group: TensorParallelGroup) -> None:
        super().__init__()
        if config.hidden_act not in _GATE_ACTIVATIONS:
            raise ValueError(
                f"MLP activation '{config.hidden_act}' is not supported (supported: {', '.join(_GATE_ACTIVATIONS)})"
            )
        self.group = group
        self.intermediate_size = config.intermediate_size
        self.activation = _GATE_ACTIVATIONS[config.hidden_act]
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.forward(x).split(self.intermediate_size, dim=-1)
        # silu in place, in the projection's own output: the same values as silu(gate) * up
        # without two [num_tokens, intermediate] temporaries.
        return self.group.all_reduce(self.down_proj.forward(self.activation(gate).mul_(up)))


class DecoderLayer(nn.Module):
    """Llama layout: norm -> attention -> add, norm -> MLP -> add. Gemma layout: a norm
    after each block too (`post_attention_layernorm` then normalises attention's output,
    `pre_feedforward_layernorm` is the norm before the MLP)."""

    def __init__(self, config: ModelConfig, layer_index: int, group: TensorParallelGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index, group)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, group)
        self.gemma_layout = config.family.gemma_layout
        if self.gemma_layout:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        residual: torch.Tensor,
        hidden: torch.Tensor | None,
        rotary_tables: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        kernels: PagedAttentionOps,
    ) -> torch.Tensor:
        """Adds the previous layer's output `hidden` into `residual` (in place) and returns
        this layer's output, still to be added."""
        normed = self.input_layernorm.forward(residual, hidden)
        hidden = self.self_attn.forward(normed, rotary_tables, kv_cache, meta, kernels)
        if not self.gemma_layout:
            return self.mlp.forward(self.post_attention_layernorm.forward(residual, hidden))
        hidden = self.post_attention_layernorm.forward(hidden)
        hidden = self.mlp.forward(self.pre_feedforward_layernorm.forward(residual, hidden))
        return self.post_feedforward_layernorm.forward(hidden)


class DecoderForCausalLM(nn.Module):
    # Set by `build`: computed, not loaded; one per kind of layer (Gemma 3 rotates sliding
    # and global layers with different bases).
    rotary: dict[str, RotaryEmbedding]
    int4_max_rows: int = sys.maxsize  # set by `build`: see Int4Linear
    fused_decoder: FusedDecoder | None = None  # set by `build` where the model can use it
    fused_max_rows: int = 0
    step_paths: StepPaths = StepPaths()  # set by `build`
    embed_scale: torch.Tensor | None = None  # set by `build` for Gemma: sqrt(hidden) in the model dtype
    # Each layer reads its own KV group's metadata (`AttentionMetadata.for_layer`): the runner
    # may then give sliding-window layers block tables of their own (`model_runner.py`).
    reads_kv_groups = True

    def __init__(self, config: ModelConfig, group: TensorParallelGroup | None = None) -> None:
        super().__init__()
        self.config = config
        group = group or TensorParallelGroup()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, index, group) for index in range(config.num_layers))
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
        step_paths: StepPaths = StepPaths(),
    ) -> "DecoderForCausalLM":
        """Construct without random initialisation (parameters on the meta device first),
        then load the checkpoint and compute the RoPE tables for real. With a group,
        `config` and `weights` are this rank's shard (`tensor_parallel.py`). An `Int4Weight`
        replaces its linear layer by an `Int4Linear` (`quantized_linear.py`), which keeps a
        dense copy too for steps of more than `int4_max_rows` rows unless that is sys.maxsize.
        Where 4-bit weights stay packed (int4_max_rows > 0) a dense LM head gets an int8 copy
        for small steps as well (`Int8Linear`). `step_paths`: the row cut-offs of those
        paths (`step_paths.py`)."""
        with torch.device("meta"):
            model = cls(config, group)
        model = model.to_empty(device=device).to(dtype)
        model.int4_max_rows = int4_max_rows
        model.step_paths = step_paths
        model.load_weights(
            (name, tensor if isinstance(tensor, Int4Weight) else tensor.to(dtype)) for name, tensor in weights
        )
        model.rotary = {kind: RotaryEmbedding(config, kind, dtype).to(device) for kind in sorted(set(config.layer_types))}
        # HF multiplies the embeddings by sqrt(hidden) rounded to the embedding's dtype
        # (Gemma 3 through float32 first).
        model.embed_scale = (
            None if config.embed_scale is None else torch.tensor(config.embed_scale, dtype=torch.float32).to(dtype).to(device)
        )
        head = model.lm_head
        if int4_max_rows > 0 and type(head) is nn.Linear and head.bias is None and q8_matmul.available() and (
            head.out_features % q8_matmul.BLOCK == 0 and head.in_features % q8_matmul.GROUP == 0
        ):
            model.lm_head = Int8Linear(head.weight, step_paths.int8_lm_head_max_rows)
        model._install_fused_decoder(group or TensorParallelGroup(), dtype, device)
        return model.eval()

    def _install_fused_decoder(self, group: TensorParallelGroup, dtype: torch.dtype, device: torch.device) -> None:
        """Decode steps of up to `step_paths.fused_decode_max_rows` tokens run as one C call where every
        projection is a bias-free Int4Linear on one rank; logged either way when 4-bit
        weights are packed."""
        if self.int4_max_rows <= 0:
            return
        projections = [
            (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            for layer in self.layers
        ]
        if not self.config.plain_llama:
            reason = f"it implements plain Llama layers, not {self.config.model_type}'s"
        elif len(set(self.config.layer_windows)) > 1:
            # The C step takes a window and a KV group per layer; this decoder does not yet
            # hand it several groups' slots and tables (one window for all layers is one group).
            reason = "layers with different windows (several KV groups) are not wired to it yet"
        elif group.world_size != 1:
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
            sliding_windows=list(self.config.layer_windows),
        )
        self.fused_max_rows = self.step_paths.fused_decode_max_rows
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
        if self.embed_scale is not None:
            residual.mul_(self.embed_scale)
        hidden: torch.Tensor | None = None
        tables = {kind: rotary.tables(positions) for kind, rotary in self.rotary.items()}
        num_tokens = input_ids.shape[0]
        if (
            self.fused_decoder is not None and 0 < num_tokens <= self.fused_max_rows
            and meta.num_decode_tokens == num_tokens and meta.num_prefills == 0
        ):
            # plain_llama: one kind of layer, one RoPE table
            return self.fused_decoder(
                residual, *tables[self.config.layer_types[0]], kv_caches, meta.slot_mapping, meta.decode_block_tables,
                meta.decode_seq_lens,
            )
        # `.forward` directly: nn.Module.__call__'s hook checks cost ~2 ms a decode step
        # on CPU across 30 layers, and these modules have no hooks.
        for index, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            layer_meta = meta.for_layer(index)  # its KV group's slots and block tables
            hidden = layer.forward(residual, hidden, tables[layer.self_attn.layer_type], kv_cache, layer_meta, kernels)
        return self.norm(residual, hidden)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcap
        if cap is not None:  # Gemma 2: HF's order of ops, in the model's dtype
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | Int4Weight]]) -> None:
        """Load HF-named tensors, fusing q/k/v and gate/up; every parameter must be set.
        Int4 weights are fused the same way (by rows) and replace their linear layer; a
        fused projection whose parts are not all int4 is dequantized whole."""
        params = dict(self.named_parameters())
        # Gemma's RMSNorm applies (1 + w): the 1 is added here, once.
        norm_offset = 1.0 if self.config.family.gemma_layout else 0.0
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
            if norm_offset and name.endswith("norm.weight") and isinstance(tensor, torch.Tensor):
                tensor = tensor + norm_offset
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
