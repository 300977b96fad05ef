"""The architecture numbers the executor needs, read from the model's own config.

transformers parses both config.json and GGUF metadata into a config object (for GGUF,
its own mapping of llama.cpp's metadata keys); we keep that object (for RoPE variants)
plus the plain numbers and switches our decoder reads (`decoder.py`). What a family is
structurally comes from `model_families.py`; what one model of it chose (windows, soft
caps, RoPE bases) from its config, here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from pagedserve.services.executor.model_families import FAMILIES, Family, family_of
from pagedserve.shared.model_source import ModelSource

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    eos_token_ids: tuple[int, ...]
    hf_config: Any  # the transformers config, for RoPE parameters
    # Per layer: "full_attention" or "sliding_attention" (HF's `layer_types` names), and the
    # window each attends over (None: every earlier token).
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    attention_scale: float | None = None  # None: head_dim ** -0.5
    hidden_act: str = "silu"  # the MLP's gate activation: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    attn_logit_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    final_logit_softcap: float | None = None
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden)

    @property
    def family(self) -> Family:
        return family_of(self.model_type)

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """The sliding window of every layer (None: global)."""
        return tuple(self.sliding_window if kind == SLIDING else None for kind in self.layer_types)

    @property
    def plain_llama(self) -> bool:
        """Whether the layers are Llama's in everything a Llama-only kernel (the fused C decode
        step) computes: no q/k norms, Gemma layout, soft caps, custom scale or embedding
        scale, one RoPE for all layers (sliding windows are a separate question)."""
        return (
            not self.family.qk_norm and not self.family.gemma_layout and self.hidden_act == "silu"
            and self.attn_logit_softcap is None and self.final_logit_softcap is None
            and self.attention_scale is None and self.embed_scale is None and len(set(self.layer_types)) <= 1
        )

    def rope_parameters_for(self, layer_type: str) -> dict[str, Any]:
        """RoPE settings of one kind of layer: Gemma 3 keeps one dict per layer type (a
        local base for sliding layers); every other family one dict for all layers.
        transformers 5 keeps them in `rope_parameters`; 4.x in `rope_theta`/`rope_scaling`."""
        params = getattr(self.hf_config, "rope_parameters", None)
        if params:
            params = dict(params)
            if layer_type in params and isinstance(params[layer_type], dict):
                return dict(params[layer_type])
            return params
        scaling = dict(getattr(self.hf_config, "rope_scaling", None) or {})
        scaling.setdefault("rope_type", scaling.pop("type", "default"))
        scaling["rope_theta"] = getattr(self.hf_config, "rope_theta", 10000.0)
        return scaling

    @property
    def rope_parameters(self) -> dict[str, Any]:
        return self.rope_parameters_for(FULL)


def load_hf_config(source: ModelSource) -> PretrainedConfig:
    if source.gguf_file is not None:
        return AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file)
    return AutoConfig.from_pretrained(source.directory)


def _layer_types(hf: PretrainedConfig) -> tuple[str, ...]:
    """HF's `layer_types` where the config has them (Gemma 2/3, Qwen2/3); Mistral and Phi-3
    apply their `sliding_window` (when set) to every layer."""
    types = getattr(hf, "layer_types", None)
    if types:
        return tuple(types)
    windowed = getattr(hf, "sliding_window", None) is not None
    return (SLIDING if windowed else FULL,) * hf.num_hidden_layers


def _refuse_unsupported_variants(hf: PretrainedConfig, layer_types: tuple[str, ...]) -> None:
    """Variants of a supported family the decoder does not implement, refused at load."""
    unknown = sorted(set(layer_types) - {SLIDING, FULL})
    if unknown:
        raise ValueError(f"layer types {unknown} are not supported (supported: {FULL}, {SLIDING})")
    if getattr(hf, "use_bidirectional_attention", None):
        raise ValueError("bidirectional attention (an embedding-model variant) is not supported: causal decoders only")
    params = getattr(hf, "rope_parameters", None) or {}
    for value in [params, *(v for v in params.values() if isinstance(v, dict))]:
        partial = value.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0)) if isinstance(value, dict) else 1.0
        if partial not in (None, 1.0):
            raise ValueError(f"partial rotary embeddings (partial_rotary_factor {partial}) are not supported")
        if isinstance(value, dict) and value.get("rope_type") == "dynamic":
            raise ValueError("dynamic NTK RoPE is not supported: its frequencies depend on each step's length")


def model_config_from_hf(hf: PretrainedConfig) -> ModelConfig:
    family = family_of(hf.model_type)
    layer_types = _layer_types(hf)
    _refuse_unsupported_variants(hf, layer_types)
    num_heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
    eos = hf.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    query_pre_attn_scalar = getattr(hf, "query_pre_attn_scalar", None)
    return ModelConfig(
        model_type=hf.model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rms_norm_eps=hf.rms_norm_eps,
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(hf, "attention_bias", False)) or family.attention_bias,
        eos_token_ids=eos_ids,
        hf_config=hf,
        layer_types=layer_types,
        sliding_window=getattr(hf, "sliding_window", None) if SLIDING in layer_types else None,
        attention_scale=None if query_pre_attn_scalar is None else float(query_pre_attn_scalar) ** -0.5,
        hidden_act=getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "silu"),
        attn_logit_softcap=getattr(hf, "attn_logit_softcapping", None),
        final_logit_softcap=getattr(hf, "final_logit_softcapping", None),
        embed_scale=float(hf.hidden_size) ** 0.5 if family.gemma_layout else None,
    )


def load_model_config(source: ModelSource) -> ModelConfig:
    return model_config_from_hf(load_hf_config(source))
