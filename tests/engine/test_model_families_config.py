"""What `model_config.model_config_from_hf` reads from each family's transformers config:
per-layer windows, scales, soft caps, RoPE per layer kind; and what it refuses, by name.
Fast: configs only, no weights."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from pagedserve.services.executor.model_config import FULL, SLIDING, SUPPORTED_MODEL_TYPES, model_config_from_hf


def _config(model_type: str, **settings: object):  # type: ignore[no-untyped-def]
    return model_config_from_hf(AutoConfig.for_model(model_type, num_hidden_layers=4, **settings))


def test_an_unsupported_architecture_is_refused_listing_the_supported_ones() -> None:
    with pytest.raises(ValueError) as error:
        model_config_from_hf(AutoConfig.for_model("gpt2"))
    message = str(error.value)
    assert "'gpt2' is not supported" in message
    assert all(name in message for name in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"))
    assert set(SUPPORTED_MODEL_TYPES) >= {"llama", "qwen3", "gemma2", "gemma3_text", "phi3"}


def test_windows_per_layer() -> None:
    assert _config("llama").layer_windows == (None,) * 4
    assert _config("mistral", sliding_window=64).layer_windows == (64,) * 4  # every layer
    assert _config("mistral", sliding_window=None).layer_windows == (None,) * 4
    assert _config("gemma2", sliding_window=32).layer_windows == (32, None, 32, None)  # alternating
    gemma3 = _config("gemma3_text", sliding_window=16, layer_types=[SLIDING, SLIDING, SLIDING, FULL])
    assert gemma3.layer_windows == (16, 16, 16, None)
    assert _config("qwen2").layer_windows == (None,) * 4  # use_sliding_window off


def test_gemma_numbers_and_plain_llama() -> None:
    gemma2 = _config("gemma2", hidden_size=64, head_dim=16, query_pre_attn_scalar=144)
    assert gemma2.attention_scale == pytest.approx(144**-0.5)
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap) == (50.0, 30.0)
    assert gemma2.embed_scale == pytest.approx(8.0) and gemma2.hidden_act == "gelu_pytorch_tanh"
    gemma3 = _config("gemma3_text")
    assert gemma3.attn_logit_softcap is None and gemma3.family.qk_norm
    assert gemma3.rope_parameters_for(SLIDING)["rope_theta"] != gemma3.rope_parameters_for(FULL)["rope_theta"]
    assert _config("llama").plain_llama and not gemma3.plain_llama and not _config("qwen3").plain_llama
    assert _config("mistral", sliding_window=64).plain_llama  # windows are no layer difference


def test_variants_the_decoder_does_not_implement_are_refused() -> None:
    with pytest.raises(ValueError, match="partial rotary"):
        _config("phi3", rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75})
    with pytest.raises(ValueError, match="bidirectional"):
        _config("gemma3_text", use_bidirectional_attention=True)


def test_longrope_tables_use_short_factors_within_the_original_context_and_long_beyond() -> None:
    """Phi-3's LongRoPE against HF's own rotary module: a forward whose positions stay
    within `original_max_position_embeddings` uses the short factors, one past it the long
    ones (HF switches the whole forward; ours switches per position, so the positions past
    the original context are where both agree on long factors)."""
    import torch
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    from pagedserve.services.executor.decoder import RotaryEmbedding

    hf_config = AutoConfig.for_model(
        "phi3", hidden_size=64, num_attention_heads=4, max_position_embeddings=1024, original_max_position_embeddings=256,
        rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 256,
            "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + 0.5 * i for i in range(8)],
        },
    )
    config = model_config_from_hf(hf_config)
    ours = RotaryEmbedding(config, FULL, torch.float64)
    hf_rotary = Phi3RotaryEmbedding(hf_config)
    x = torch.zeros(1, dtype=torch.float64)
    for positions in (torch.arange(0, 200), torch.arange(256, 400)):
        cos, sin = hf_rotary(x, positions[None])
        torch.testing.assert_close(ours.cos[positions], cos[0, :, :8], rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.sin[positions], sin[0, :, :8], rtol=0, atol=1e-6)
