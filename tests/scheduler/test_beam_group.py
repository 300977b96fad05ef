"""Beam groups (services/scheduler/beam_group.py): a round turns the policy's choice into
beams (continue in place, fork, drop), the end into n hypotheses, and a search's beams
are found together as a gang."""

from __future__ import annotations

from pagedserve.services.scheduler.beam_group import BeamGroup, gang_of, gang_size
from pagedserve.services.scheduler.forking import fork_request
from pagedserve.services.scheduler.kv_cache_manager import KVCacheManager
from pagedserve.services.scheduler.request import Request
from pagedserve.shared.messages import RequestDelta, SampledToken
from pagedserve.shared.sampling_params import SamplingParams

EOS = 0


def make_request(request_id: str, max_tokens: int = 3, beam_width: int = 2, n: int = 2) -> Request:
    params = SamplingParams(max_tokens=max_tokens, beam_width=beam_width, n=n, temperature=0.0)
    return Request(request_id, [5, 6, 7], params, arrival_time=0.0, eos_token_id=EOS)


def report(beam: Request, token_ids: list[int], logprobs: list[float]) -> SampledToken:
    return SampledToken(beam.request_id, token_ids[0], logprobs[0], token_ids, logprobs)


class Forker:
    """The scheduler's part of a beam fork, on a real KV cache manager."""

    def __init__(self, group: BeamGroup) -> None:
        self.manager = KVCacheManager(8, 4, enable_prefix_caching=False, hash_extra_keys=())
        self.manager.allocate_for_admission(group.beams[0], [], 3)
        self.group = group
        self.parents: list[str] = []

    def __call__(self, parent: Request) -> Request:
        self.parents.append(parent.request_id)
        beam = fork_request(parent, self.group.next_fork_id(), parent.sampling_params, parent.num_output_tokens, 0, self.manager)
        beam.beam_group = self.group
        return beam


def test_start_makes_the_request_the_first_beam() -> None:
    req = make_request("a", beam_width=3, n=2)
    group = BeamGroup.start(req, max_model_len=64)
    assert req.beam_group is group and group.beams == [req] and group.scores == [0.0]
    assert (group.client_request_id, group.n, group.search.beam_width) == ("a", 2, 3)
    assert group.num_beams_to_add == 2


def test_rounds_fork_continue_and_drop_beams_then_end_with_n_hypotheses() -> None:
    req = make_request("a", max_tokens=3)
    group = BeamGroup.start(req, max_model_len=64)
    fork = Forker(group)
    req.num_cached_tokens = 3

    group.reports[req.request_id] = report(req, [11, 12, 13, 14], [-0.1, -0.2, -0.3, -0.4])
    assert group.all_reported
    assert group.run_round(fork) == (False, [])  # the only beam is picked twice: one fork
    first, forked = group.beams
    assert (first, forked.request_id, fork.parents) == (req, "a#b1", ["a"])
    assert (first.output_token_ids, forked.output_token_ids) == ([11], [12])
    assert (first.unsent_token_ids, forked.unsent_token_ids) == ([11], [12])
    assert group.num_cached_tokens == 3 and group.num_beams_to_add == 0 and group.reports == {}

    group.reports[first.request_id] = report(first, [21, 22, 23, 24], [-5.0, -5.1, -5.2, -5.3])
    assert not group.all_reported
    group.reports[forked.request_id] = report(forked, [31, 32, 33, 34], [-0.1, -0.2, -0.3, -0.4])
    done, dropped = group.run_round(fork)
    assert not done and dropped == [first]  # both picks extend the fork
    assert [b.request_id for b in group.beams] == ["a#b1", "a#b2"]
    assert [b.output_token_ids for b in group.beams] == [[12, 31], [12, 32]]

    for beam, token in zip(group.beams, (41, 51)):
        group.reports[beam.request_id] = report(beam, [token, token + 1, token + 2, token + 3], [-0.1, -0.2, -0.3, -0.4])
    beams = list(group.beams)
    done, dropped = group.run_round(fork)  # max_tokens reached: every candidate finishes
    assert done and dropped == beams
    assert group.hypothesis_deltas() == [
        RequestDelta("a", [12, 31, 41], finish_reason="length", num_cached_tokens=3, sample_index=0),
        RequestDelta("a", [12, 31, 42], finish_reason="length", num_cached_tokens=3, sample_index=1),
    ]


def test_abort_gives_one_delta_per_hypothesis() -> None:
    group = BeamGroup.start(make_request("a", beam_width=3, n=2), max_model_len=64)
    assert group.abort_deltas() == [
        RequestDelta("a", [], finish_reason="abort", sample_index=0),
        RequestDelta("a", [], finish_reason="abort", sample_index=1),
    ]


def test_a_gang_is_the_run_of_beams_of_one_search() -> None:
    x, y = make_request("x", beam_width=1, n=1), make_request("y", beam_width=1, n=1)
    a, b = make_request("a"), make_request("b")
    group_a, group_b = BeamGroup.start(a, 64), BeamGroup.start(b, 64)
    a1, b1 = make_request("a#b1"), make_request("b#b1")
    a1.beam_group, b1.beam_group = group_a, group_b
    running = [x, a, a1, b, b1, y]
    assert [gang_size(running, i) for i in range(len(running))] == [1, 2, 1, 2, 1, 1]
    assert gang_of(running, a1) == [a, a1] and gang_of(running, x) == [x]
    assert gang_of([b1, x, b], b) == [b1, b]
