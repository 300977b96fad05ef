"""The ids of the sequences a request becomes: one format, built here only.

A request with `n > 1` runs as n sequences and a beam search as up to `beam_width`; every
sequence has an id of its own in the scheduler (its `Request`), in the executor's batch
(`SampledToken.sequence_id`) and in the status snapshot, while deltas report under the
client's request id with a sample index. Sample 0 and a search's first beam are the
request itself and keep its id; the others add a suffix after `#` (`b` and a number for a
beam, so that a beam and a sample of one request never share an id).
"""

from __future__ import annotations


def sample_sequence_id(request_id: str, sample_index: int) -> str:
    """Sample `sample_index` of a parallel-sampling request (0: the request itself)."""
    return f"{request_id}#{sample_index}" if sample_index else request_id


def beam_sequence_id(request_id: str, beam_number: int) -> str:
    """The `beam_number`-th beam forked off a search (1, 2, ...: numbers are never reused,
    so a beam dropped and one forked later never share an id)."""
    return f"{request_id}#b{beam_number}"
