"""The identity of a full KV block: one function for the scheduler, which caches blocks
under it, and the gateway, which routes a prompt to the replica that holds its blocks.

A full block's hash is a chain: sha256 over (the previous block's hash, the block's token
ids, extra keys such as the model name). Two requests whose first k blocks hold the same
tokens therefore share the first k hashes, and equal hashes mean equal K/V (same model,
same tokens, same positions). The encoding is MessagePack of a tuple (deterministic for
ints, bytes and strings) and the hash is sha256, not Python's `hash()`: the values are the
same in every process and every run, which is what lets a scheduler mirror them to Redis
(`prefix:{replica}`, as hex) and a gateway compare them with its own.

Only *full* blocks get a hash: a partial block's tokens are not final.

A request's `cache_salt` (vLLM's field) joins the first block's extra keys, and so, through
the chain, every block's hash: requests with different salts never share a block, and a
tenant cannot learn from `cached_tokens` (or from routing) what another tenant sent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgspec

BlockHash = bytes  # a sha256 digest, 32 bytes

_encoder = msgspec.msgpack.Encoder()


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple[str, ...] = ()
) -> BlockHash:
    """The hash of one full block: `parent_hash` is the previous block's (None for the
    first block of a sequence)."""
    return hashlib.sha256(_encoder.encode((parent_hash, list(token_ids), extra_keys))).digest()


def extend_block_hashes(
    block_hashes: list[BlockHash],
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: tuple[str, ...] = (),
    cache_salt: str | None = None,
) -> None:
    """Append the hashes of the full blocks of `token_ids` that `block_hashes` (the hashes
    of its leading blocks) does not have yet. Incremental: a call costs nothing until
    another block's worth of tokens is there."""
    num_full_blocks = len(token_ids) // block_size
    for index in range(len(block_hashes), num_full_blocks):
        parent = block_hashes[-1] if block_hashes else None
        start = index * block_size
        keys = extra_keys + ("cache_salt", cache_salt) if index == 0 and cache_salt is not None else extra_keys
        block_hashes.append(hash_block_tokens(parent, token_ids[start : start + block_size], keys))


def prompt_block_hashes(token_ids: Sequence[int], block_size: int, model: str, cache_salt: str | None = None) -> list[BlockHash]:
    """The hashes of a prompt's full blocks exactly as a scheduler serving `model` with
    `block_size`-token blocks computes them (its extra keys are the model name)."""
    hashes: list[BlockHash] = []
    extend_block_hashes(hashes, token_ids, block_size, (model,), cache_salt)
    return hashes
