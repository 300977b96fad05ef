"""Incremental detokenization with the embedded model's real tokenizer: multi-byte
characters split across tokens never show up as U+FFFD, and the pieces add up to the
full decode."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from pagedserve.services.gateway.detokenizer import IncrementalDetokenizer, TokenTexts
from pagedserve.shared.tokenizer import encode_chat

TEXTS = ["héllo 你好世界 🎉🚀 ok", "日本語のテキスト、絵文字👨‍👩‍👧‍👦も。", "plain ascii, with  spaces\nand lines"]


def _full_decode(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> str:
    return tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_the_texts_really_split_characters_across_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    token_ids = tokenizer(TEXTS[0]).input_ids
    assert any("\ufffd" in tokenizer.decode([t]) for t in token_ids), "the test needs tokens that end mid-character"


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("tokens_per_push", [1, 2, 3])
def test_incremental_text_never_holds_a_replacement_character(tokenizer: PreTrainedTokenizerBase, text: str, tokens_per_push: int) -> None:
    prompt = encode_chat(tokenizer, [{"role": "user", "content": "say something"}])
    token_ids = tokenizer(text).input_ids
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    pieces = []
    for start in range(0, len(token_ids), tokens_per_push):
        piece = detokenizer.push(token_ids[start : start + tokens_per_push])
        assert "\ufffd" not in piece
        pieces.append(piece)
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == _full_decode(tokenizer, token_ids) == text


def test_special_tokens_are_not_text(tokenizer: PreTrainedTokenizerBase) -> None:
    token_ids = tokenizer("done").input_ids + [tokenizer.eos_token_id]
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert "".join(detokenizer.push([t]) for t in token_ids) + detokenizer.flush() == "done"


def test_flush_releases_an_incomplete_character_at_the_end(tokenizer: PreTrainedTokenizerBase) -> None:
    token_ids = tokenizer("ok 🎉").input_ids
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    text = "".join(detokenizer.push([t]) for t in token_ids[:-1])
    assert text == "ok"  # " " and the emoji's first bytes share a token, held back
    assert detokenizer.flush() == " \ufffd"


def test_long_outputs_keep_a_short_window(tokenizer: PreTrainedTokenizerBase) -> None:
    token_ids = tokenizer(" word" * 500).input_ids
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    text = "".join(detokenizer.push([t]) for t in token_ids)
    assert text == " word" * 500
    assert len(detokenizer._token_ids) < 10


def test_token_texts_give_exact_bytes(tokenizer: PreTrainedTokenizerBase) -> None:
    texts = TokenTexts(tokenizer)
    text = "a 🎉 b"
    token_ids = tokenizer(text).input_ids
    raw = b"".join(bytes(texts.get(t)[1]) for t in token_ids)
    assert raw == text.encode("utf-8")
    partial = [texts.get(t)[0] for t in token_ids if texts.get(t)[0].startswith("bytes:")]
    assert partial, "the emoji should be split into byte tokens"
    assert texts.get(tokenizer(" b").input_ids[0]) == (" b", list(b" b"))
