"""A GGUF's tokenizer, converted once and kept on disk.

transformers builds a tokenizer from a GGUF by parsing every vocabulary entry and merge of
the file's metadata one value at a time: 7 s for SmolLM2's 49k tokens on an idle 2-core
machine, 15-40 s under load, paid by every gateway, executor and in-process engine at
start. The converted tokenizer saved with `save_pretrained` loads in 0.5 s
(tokenizer.json), so the first load writes it under the cache folder and later loads read
it. An HF folder is never cached: its tokenizer.json is already the fast path.

Key: the GGUF's resolved path, size and modification time, and the transformers version
(a file replaced in place, or a new converter, gives a new entry). Only plain data files
are written (no code is loaded from the cache). A conversion is kept only if the saved copy
reloads to the same vocabulary, special tokens and chat template; otherwise, or where no
folder can be written, the tokenizer is simply converted each time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def tokenizer_cache_root() -> Path:
    """$PAGEDSERVE_CACHE_DIR/tokenizers, else $XDG_CACHE_HOME (or ~/.cache)/pagedserve/tokenizers."""
    configured = os.environ.get("PAGEDSERVE_CACHE_DIR")
    if configured:
        return Path(configured) / "tokenizers"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pagedserve" / "tokenizers"


def cache_key(gguf_path: Path) -> str:
    import transformers

    stat = gguf_path.stat()
    identity = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """What serving reads of a tokenizer, compared: vocabulary, special ids, template."""
    fields = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "all_special_ids", "chat_template")
    return a.get_vocab() == b.get_vocab() and all(getattr(a, f) == getattr(b, f) for f in fields)


def load_gguf_tokenizer(directory: str, gguf_file: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    gguf_path = Path(directory) / gguf_file
    entry = tokenizer_cache_root() / cache_key(gguf_path)
    if (entry / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(entry))
        except Exception as error:  # a torn or foreign entry: convert again below
            log.warning("replacing the cached tokenizer in %s: %s", entry, error)
            shutil.rmtree(entry, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    _store(tokenizer, entry)
    return tokenizer


def _store(tokenizer: PreTrainedTokenizerBase, entry: Path) -> None:
    """Save into a fresh folder beside the entry, check it, then rename it into place (a
    reader never sees a half-written entry; of two writers the first rename wins)."""
    from transformers import AutoTokenizer

    try:
        entry.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=entry.parent))
    except OSError as error:
        log.info("not caching the converted tokenizer (%s)", error)
        return
    try:
        tokenizer.save_pretrained(str(staging))
        if not same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(str(staging))):
            log.warning("the converted tokenizer does not reload identically: not cached")
            return
        staging.rename(entry)
    except OSError:
        pass  # another process stored the same entry first
    finally:
        shutil.rmtree(staging, ignore_errors=True)
