"""Tiny random models of every supported family, built by transformers itself, saved as HF
folders and written as GGUF files with `gguf`'s own writer, for the family tests.

The weights are drawn wider than transformers' init (std 0.15) so logits are peaky and
greedy choices are not near-ties; norms get random weights too, so a `(1 + w)` or
`w` mix-up shows. The tokenizer is a byte-level BPE of a few hundred tokens trained here
(a 49k vocabulary would make the LM head, and converting a GGUF's tokenizer, most of
each test's time), with a ChatML template; the GGUF carries it as llama.cpp's
`tokenizer.ggml.*` metadata and `tokenizer.chat_template`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pagedserve.services.executor.model_families import FAMILIES, GGUF_LAYER_NAMES

WINDOW = 20  # sliding window of the windowed families: not a multiple of the block size

_COMMON = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
)

# Per family: what its config sets beyond _COMMON (each family's own features switched on).
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 50000.0, "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        },
    ),
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(),  # q/k/v biases
    # head_dim 128 as every Qwen3 has: transformers' GGUF mapping for qwen3 has no key length.
    "qwen3": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128),
    # Soft caps and query_pre_attn_scalar at their defaults (50, 30, 256: a scale other than
    # head_dim ** -0.5), which GGUF metadata does not carry either; tied embeddings.
    "gemma2": dict(head_dim=16, sliding_window=WINDOW, tie_word_embeddings=True),
    "gemma3_text": dict(
        head_dim=16, sliding_window=WINDOW, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    ),
    "phi3": dict(
        max_position_embeddings=1024, original_max_position_embeddings=256,
        rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 256,
            "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + 0.5 * i for i in range(8)],
        },
    ),
}
# The GGUF architecture llama.cpp writes each family as (Mistral as llama: its GGUF test is
# llama's; `write_gguf` can still write a "mistral" one, which transformers reads too).
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}
_WRITER_ARCH = {**GGUF_ARCH, "mistral": "mistral"}


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The capital of France is Paris. Once upon a time, in a small village at the edge of a great forest, "
    "there lived a keeper of bees who counted 1, 2, 3, 4 and wrote def fibonacci(n): return n",
]


def tiny_tokenizer():  # type: ignore[no-untyped-def]
    """A byte-level BPE (any text encodes) of ~300 tokens with ChatML specials: unk 0,
    BOS `<|im_start|>` 1, EOS = pad `<|im_end|>` 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=_SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token=_SPECIAL_TOKENS[0], bos_token=_SPECIAL_TOKENS[1],
        eos_token=_SPECIAL_TOKENS[2], pad_token=_SPECIAL_TOKENS[2],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _gguf_tokenizer_fields(writer: Any, tokenizer: Any) -> None:  # type: ignore[no-untyped-def]
    """llama.cpp's metadata for a GPT-2-style BPE tokenizer."""
    import json

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in _SPECIAL_TOKENS else 1 for token in tokens])  # 3: control
    writer.add_token_merges([" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]])
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


def build_hf_folder(model_type: str, directory: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    settings = {**_COMMON, **FAMILY_CONFIGS[model_type]}
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, **settings,
    )
    torch.manual_seed(sum(map(ord, model_type)))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.1 if ("norm" in name or param.dim() == 1) else 0.15)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _hf_to_gguf_names(model_type: str) -> dict[str, str]:
    """HF module name inside a block -> llama.cpp's tensor name, for `model_type`."""
    family = FAMILIES[model_type]
    parts = set(GGUF_LAYER_NAMES) | set(family.gguf_layer_names)
    return {module: part for part in parts if (module := family.gguf_name(part)) is not None}


def _permute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter (`LlamaModel.permute`): each head's rotary halves interleaved."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, 2, rows // num_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_gguf(folder: Path, path: Path, quantize: bool = False) -> Path:
    """The folder's model as a GGUF of float32 tensors, as llama.cpp's converter lays it out
    (names, q/k permutation for Llama, `1 + w` Gemma norms), with the folder's tokenizer;
    with `quantize`, its projection weights in Q4_0."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    model_type = config.model_type
    family = FAMILIES[model_type]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, _WRITER_ARCH[model_type])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    params = config.rope_parameters
    writer.add_rope_freq_base(float(params.get("full_attention", params)["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    from transformers import AutoTokenizer

    _gguf_tokenizer_fields(writer, AutoTokenizer.from_pretrained(folder))
    names = _hf_to_gguf_names(model_type)
    globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for name, tensor in load_file(folder / "model.safetensors").items():
        array = tensor.to(torch.float32).numpy()
        if name in globals_:
            gguf_name = globals_[name]
        else:
            _, _, layer, *module, kind = name.split(".")
            module_name = ".".join(module)
            gguf_name = f"blk.{layer}.{names[module_name]}.{kind}"
            if family.gguf_rotary_permuted and module[-1] in heads and kind == "weight":
                array = _permute_rotary(array, heads[module[-1]])
        if family.gguf_norm_offset and name.endswith("norm.weight"):
            array = array + np.float32(family.gguf_norm_offset)
        if quantize and name.endswith("_proj.weight"):
            quantized = gguf.quants.quantize(np.ascontiguousarray(array), gguf.GGMLQuantizationType.Q4_0)
            writer.add_tensor(gguf_name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_model(directory: Path, gguf_file: str | None = None):  # type: ignore[no-untyped-def]
    """HF transformers' own model of a folder or GGUF, in float64."""
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64, **kwargs).eval()


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """HF's greedy `generate`, one prompt at a time (no padding)."""
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens, do_sample=False,
            )
            outputs.append(out[0, len(ids) :].tolist())
    return outputs


def hf_beam_search(model, prompt: list[int], params: Any, eos_token_id: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """HF's best `n` beams, generated tokens only, cut after the stop token."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
            num_beams=params.beam_width, num_return_sequences=params.n, length_penalty=params.length_penalty,
            early_stopping=params.early_stopping, max_new_tokens=params.max_tokens,
            eos_token_id=eos_token_id, pad_token_id=eos_token_id,
        )
    rows = out[:, len(prompt) :].tolist()
    return [row[: row.index(eos_token_id) + 1] if eos_token_id in row else row for row in rows]
