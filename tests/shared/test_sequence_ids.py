"""shared/sequence_ids.py: sample 0 and a search's first beam keep the client's id; the
other sequences of one request get ids of their own, distinct from each other's."""

from pagedserve.shared.sequence_ids import beam_sequence_id, sample_sequence_id


def test_sample_zero_is_the_request_itself() -> None:
    assert sample_sequence_id("cmpl-1-0", 0) == "cmpl-1-0"


def test_samples_and_beams_of_one_request_never_share_an_id() -> None:
    ids = [sample_sequence_id("r", i) for i in range(12)] + [beam_sequence_id("r", k) for k in range(1, 12)]
    assert len(set(ids)) == len(ids)
