"""What sets each supported decoder family apart from plain Llama: a table, one row per
transformers `model_type`.

Every family here is the same decoder (`decoder.py`): embeddings, N layers of attention
(GQA, RoPE over the paged KV cache) and a gated MLP, a final norm and an LM head. They
differ only in switches the decoder reads from `ModelConfig` (q/k norms, Gemma's norm
layout, soft-capping, sliding windows, fused checkpoints), and in how llama.cpp stored
their weights in a GGUF. One configurable decoder rather than a module per family: the
families share every layer, so a module each would repeat ~300 lines to change a few
switches (vLLM keeps a file per family because its families differ far more).

Adding a family that fits the decoder: a row in FAMILIES, the per-model numbers its HF
config holds in `model_config.model_config_from_hf` if it has new ones, and a test in
tests/engine/test_model_families.py (docs/models.md says how).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# llama.cpp tensor name (within a block) -> HF module name, as llama.cpp's converter
# writes every family below unless the family overrides a name.
GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# Gemma 2 and 3 norm both sides of each block: llama.cpp's `ffn_norm` is then the norm
# *before* the MLP, and two more names carry the norms after each block.
_GEMMA_GGUF_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3 keeps q/k/v in one tensor and gate/up in `ffn_up` (llama.cpp's converter keeps them
# fused as HF's checkpoint has them).
_PHI3_GGUF_NAMES = {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}


@dataclass(frozen=True)
class Family:
    """The structural switches of one family (the per-model numbers such as windows, soft
    caps and RoPE bases come from the model's config, in `ModelConfig`)."""

    model_type: str
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (Qwen3, Gemma 3)
    # Gemma: RMSNorm weights stored as w with (1 + w) applied, norms before *and* after
    # attention and MLP, GeGLU, embeddings scaled by sqrt(hidden).
    gemma_layout: bool = False
    attention_bias: bool = False  # q/k/v biases the config does not announce (Qwen2)
    # llama.cpp permutes q/k rows into its rotary layout only for Llama-converted models.
    gguf_rotary_permuted: bool = False
    # llama.cpp's norm weights for Gemma hold 1 + w (its converter adds the 1).
    gguf_norm_offset: float = 0.0
    gguf_layer_names: dict[str, str] = field(default_factory=dict)

    def gguf_name(self, part: str) -> str | None:
        return self.gguf_layer_names.get(part) or GGUF_LAYER_NAMES.get(part)


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family("llama", gguf_rotary_permuted=True),
        Family("mistral", gguf_rotary_permuted=True),
        Family("qwen2", attention_bias=True),
        Family("qwen3", qk_norm=True),
        Family("gemma2", gemma_layout=True, gguf_norm_offset=1.0, gguf_layer_names=_GEMMA_GGUF_NAMES),
        Family("gemma3_text", qk_norm=True, gemma_layout=True, gguf_norm_offset=1.0, gguf_layer_names=_GEMMA_GGUF_NAMES),
        Family("phi3", gguf_layer_names=_PHI3_GGUF_NAMES),
    )
}


def family_of(model_type: str) -> Family:
    """The family of a transformers model_type; an unsupported one is refused naming the
    supported ones."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"model type '{model_type}' is not supported (supported: {', '.join(FAMILIES)})")
    return family
