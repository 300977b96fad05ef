"""shared/tokenizer_cache.py: a GGUF's converted tokenizer kept on disk must be the very
tokenizer transformers converts from the file (ids, decoding, special tokens, template),
and a torn entry or a changed file must never be served from the cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pagedserve.shared.model_source import default_model_source
from pagedserve.shared.tokenizer_cache import cache_key, load_gguf_tokenizer, tokenizer_cache_root

TEXTS = [
    "The capital of France is",
    " héllo  wörld\n\n\tdef f(x): return x**2 ",
    "<|im_start|>user\nhi<|im_end|>",
    "日本語のテキスト 🤖",
]
MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def converted():
    """transformers' own conversion of the embedded GGUF: the independent reference."""
    source = default_model_source()
    return source, AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)


def assert_same(reference, tokenizer) -> None:
    for text in TEXTS:
        ids = reference(text).input_ids
        assert tokenizer(text).input_ids == ids, text
        assert tokenizer.decode(ids) == reference.decode(ids)
        assert tokenizer.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    template = dict(add_generation_prompt=True, tokenize=False)
    assert tokenizer.apply_chat_template(MESSAGES, **template) == reference.apply_chat_template(MESSAGES, **template)
    assert tokenizer.get_vocab() == reference.get_vocab()
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.all_special_ids) == (
        reference.bos_token_id,
        reference.eos_token_id,
        reference.all_special_ids,
    )


def test_the_first_load_stores_an_entry_that_later_loads_serve_unchanged(converted, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path))
    source, reference = converted
    entry = tokenizer_cache_root() / cache_key(Path(source.directory) / source.gguf_file)
    assert not entry.exists()
    first = load_gguf_tokenizer(source.directory, source.gguf_file)
    assert (entry / "tokenizer.json").is_file()
    assert_same(reference, first)
    second = load_gguf_tokenizer(source.directory, source.gguf_file)
    assert_same(reference, second)
    # Nothing but the entry is left behind (the staging folder was renamed or removed).
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]


def test_a_torn_entry_is_converted_again(converted, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path))
    source, reference = converted
    entry = tokenizer_cache_root() / cache_key(Path(source.directory) / source.gguf_file)
    entry.mkdir(parents=True)
    (entry / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    assert_same(reference, load_gguf_tokenizer(source.directory, source.gguf_file))
    # ... and the torn entry was replaced by a whole one.
    assert_same(reference, AutoTokenizer.from_pretrained(str(entry)))


def test_a_file_changed_in_place_gets_a_new_key(tmp_path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    before = cache_key(gguf)
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache_key(gguf) != before
    gguf.write_bytes(b"GGUF" + bytes(65))
    assert len({before, cache_key(gguf)}) == 2
