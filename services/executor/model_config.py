"""The architecture numbers the executor needs, read from the model's own config.

transformers parses both config.json and GGUF metadata into a config object; we keep
that object (for RoPE variants) plus the plain numbers our model code reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from pagedserve.shared.model_source import ModelSource

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


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

    @property
    def rope_parameters(self) -> dict[str, Any]:
        """transformers 5 keeps RoPE settings in `rope_parameters`; 4.x in `rope_theta`/`rope_scaling`."""
        params = getattr(self.hf_config, "rope_parameters", None)
        if params:
            return dict(params)
        scaling = dict(getattr(self.hf_config, "rope_scaling", None) or {})
        scaling.setdefault("rope_type", scaling.pop("type", "default"))
        scaling["rope_theta"] = getattr(self.hf_config, "rope_theta", 10000.0)
        return scaling


def load_hf_config(source: ModelSource) -> PretrainedConfig:
    if source.gguf_file is not None:
        return AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file)
    return AutoConfig.from_pretrained(source.directory)


def model_config_from_hf(hf: PretrainedConfig) -> ModelConfig:
    if hf.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type '{hf.model_type}' is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    num_heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
    eos = hf.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
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
        # Qwen2 has q/k/v biases without saying so in its config.
        attention_bias=bool(getattr(hf, "attention_bias", False)) or hf.model_type == "qwen2",
        eos_token_ids=eos_ids,
        hf_config=hf,
    )


def load_model_config(source: ModelSource) -> ModelConfig:
    return model_config_from_hf(load_hf_config(source))
