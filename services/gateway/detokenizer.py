"""Token ids -> text, incrementally, one step's new tokens at a time.

A byte-level BPE token can end in the middle of a UTF-8 character (an emoji is often
three or four tokens), so decoding only the newest token would print U+FFFD. The
incremental detokenizer (the offsets scheme vLLM uses) decodes a short window of recent
tokens twice, with and without the new ones, and emits the difference; while that
difference ends in U+FFFD the character is incomplete and nothing is emitted yet. The
window also starts a few tokens back, so tokenizers whose decoding depends on the
previous token (SentencePiece's leading-space rule) get the context they need.

The held-back window is bounded: a UTF-8 character is at most 4 bytes and every token
carries at least one, so an incomplete character spans at most the last
`INCOMPLETE_CHARACTER_TOKENS` tokens. Tokens that keep decoding to U+FFFD (a logit_bias
on a lone continuation byte) or to nothing (skipped special tokens) are released once
more than `MAX_PENDING_TOKENS` wait; without that bound each push re-decoded the whole
held-back tail, quadratic work on the gateway's event loop.
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHARACTER = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded as context before the first output token
INCOMPLETE_CHARACTER_TOKENS = 3  # the most tokens an incomplete (<= 3-byte) character spans
MAX_PENDING_TOKENS = 8  # held-back tokens past which the older ones are released as they decode


class IncrementalDetokenizer:
    """Text of one sequence's output tokens, emitted as soon as it is complete.

    Invariant: `_token_ids[_prefix_offset:_read_offset]` decodes to text already emitted
    (or prompt context), and `_token_ids[_read_offset:]` are tokens whose text is not out
    yet (held back because they end mid-character).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._token_ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, new_token_ids: list[int]) -> str:
        """The text `new_token_ids` complete; "" while a character is still incomplete."""
        self._token_ids.extend(new_token_ids)
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._token_ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHARACTER):
            if len(self._token_ids) - self._read_offset <= MAX_PENDING_TOKENS:
                return ""
            # Too many held back to be one character: release all but the tokens the last
            # (incomplete) character spans. It starts in one of the last three tokens; the
            # longest prefix that does not end in U+FFFD ends on a character boundary. If
            # none does, the bytes there are broken anyway: release them as U+FFFD.
            for read_offset in range(len(self._token_ids) - 1, len(self._token_ids) - INCOMPLETE_CHARACTER_TOKENS - 1, -1):
                full_text = self._decode(self._token_ids[self._prefix_offset : read_offset])
                if not full_text.endswith(REPLACEMENT_CHARACTER):
                    break
        else:
            read_offset = len(self._token_ids)
        # Slide the window: the tokens just emitted become the next call's context, and
        # older ones are dropped so each call decodes a handful of tokens, not the whole output.
        dropped = self._prefix_offset
        del self._token_ids[:dropped]
        self._prefix_offset = self._read_offset - dropped
        self._read_offset = read_offset - dropped
        return full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""

    def flush(self) -> str:
        """At the end of the sequence: whatever was held back, even an incomplete
        character (those bytes really were generated; U+FFFD is their honest text)."""
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._token_ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._token_ids)
        return full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE maps every byte to a printable character; this is the inverse."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codepoints = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codepoints.append(256 + extra)
            extra += 1
    return {chr(codepoint): byte for byte, codepoint in zip(printable, codepoints)}


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenTexts:
    """Each token's own text and exact bytes, as OpenAI's logprobs report them.

    A token that is not valid UTF-8 on its own (part of a character) is reported as
    "bytes:\\xNN..." like OpenAI does, with its real bytes alongside.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._special_ids = set(tokenizer.all_special_ids)
        self._cache: dict[int, tuple[str, list[int]]] = {}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = type(backend.decoder).__name__ if backend is not None and backend.decoder is not None else ""
        self._byte_decoder = _byte_level_alphabet() if decoder == "ByteLevel" else None

    def _token_bytes(self, token_id: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if token_id in self._special_ids or piece is None:
            return (piece or "").encode("utf-8")
        if self._byte_decoder is not None and all(c in self._byte_decoder for c in piece):
            return bytes(self._byte_decoder[c] for c in piece)
        byte_fallback = _BYTE_FALLBACK.match(piece)
        if byte_fallback:  # SentencePiece byte-fallback token
            return bytes([int(byte_fallback.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")  # SentencePiece marks spaces with U+2581

    def longest_token_bytes(self) -> int:
        """The most bytes of text one token stands for (special tokens as their text):
        a prompt of more bytes than the context length times this cannot fit it."""
        return max(len(self._token_bytes(token_id)) for token_id in range(len(self._tokenizer)))

    def get(self, token_id: int) -> tuple[str, list[int]]:
        """(text, bytes) of one token, cached: the vocabulary is fixed."""
        cached = self._cache.get(token_id)
        if cached is None:
            raw = self._token_bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            cached = self._cache[token_id] = (text, list(raw))
        return cached
