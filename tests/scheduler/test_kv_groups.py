"""KV groups (services/scheduler/kv_groups.py) and the KV cache manager's tables per group:
sliding-window groups give back the blocks their window has left and never allocate the
ones a hit or a recompute skips; a prefix hit needs every group; forks and copy-on-write
per table. Then the real scheduler over a fake executor that keeps one fake K/V cache and
checks, for every token it computes, that each group's table holds that token's window."""

from __future__ import annotations

import random

import pytest

from pagedserve.services.scheduler.kv_cache_manager import KVCacheManager
from pagedserve.services.scheduler.kv_groups import DROPPED, first_needed_block
from pagedserve.shared.kv_group_layout import KVGroupLayout
from pagedserve.services.scheduler.request import Request
from pagedserve.services.scheduler.scheduler import Scheduler
from pagedserve.shared.messages import ExecuteStep, SampledToken, StepResult
from pagedserve.shared.sampling_params import SamplingParams
from tests.scheduler.fake_kv_cache import FakeKVCache
from tests.scheduler.test_scheduler import make_request, make_scheduler, model_token, reference_output

BLOCK_SIZE = 4


# --- the layout ---------------------------------------------------------------------------


def test_gemma3_layers_make_equal_groups_global_first() -> None:
    """Gemma 3 270M: every 6th layer global, the rest a 512-token window: 15 and 3 layers
    make 6 groups of 3; layers with the same index in their group share a cache tensor."""
    windows = [None if (i + 1) % 6 == 0 else 512 for i in range(18)]
    layout = KVGroupLayout.for_windows(windows)
    assert layout.windows == (None, 512, 512, 512, 512, 512)
    assert layout.layers_per_group == 3
    assert [layout.group_of_layer[i] for i in (5, 11, 17)] == [0, 0, 0]
    assert layout.group_of_layer[:5] == (1, 1, 1, 2, 2)
    assert sorted(zip(layout.group_of_layer, layout.slot_of_layer)) == [(g, s) for g in range(6) for s in range(3)]


@pytest.mark.parametrize(
    ("windows", "expected"),
    [
        ([None] * 4, (None,)),
        ([8, None, 8, None], (None, 8)),  # Gemma 2: alternating
        ([16] * 3, (16,)),  # Mistral: one window everywhere
        ([None] * 5 + [8] * 13, (None,) * 5 + (8,) * 13),  # coprime counts: groups of one layer
        ([None, 4, 8, 4], (None, 4, 4, 8)),  # two windows
    ],
)
def test_group_windows(windows: list[int | None], expected: tuple[int | None, ...]) -> None:
    layout = KVGroupLayout.for_windows(windows)
    assert layout.windows == expected
    assert [layout.windows[g] for g in layout.group_of_layer] == windows


def test_first_needed_block_follows_hf_window_rule() -> None:
    # The token at position 12 with window 5 sees keys 8..12: blocks of 4 from block 2 on.
    assert first_needed_block(12, 5, 4) == 2
    assert first_needed_block(12, 6, 4) == 1  # key 7 is in block 1
    assert first_needed_block(12, None, 4) == 0
    assert first_needed_block(3, 100, 4) == 0
    with pytest.raises(ValueError, match="at least 1 token"):
        KVGroupLayout.for_windows([0, None])


# --- the manager ----------------------------------------------------------------------------


def make_manager(num_blocks: int = 64, windows: tuple[int | None, ...] = (None, 6)) -> KVCacheManager:
    return KVCacheManager(
        num_blocks, BLOCK_SIZE, enable_prefix_caching=True, hash_extra_keys=("m",), group_windows=windows
    )


def new_request(request_id: str, prompt: list[int], max_tokens: int = 32) -> Request:
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens), arrival_time=0.0)


def decode(manager: KVCacheManager, req: Request, num_tokens: int) -> None:
    """Run `num_tokens` one-token steps: allocate, compute, register."""
    for _ in range(num_tokens):
        req.output_token_ids.append(7)
        manager.allocate_slots(req, 1)
        req.num_computed_tokens += 1
        manager.register_full_blocks(req)


def test_a_sliding_group_gives_back_blocks_its_window_has_left() -> None:
    manager = make_manager()
    req = new_request("a", list(range(10)))
    manager.allocate_for_admission(req, manager.find_cached_prefix(req), 10)
    req.num_computed_tokens = 10
    manager.register_full_blocks(req)
    assert len(req.block_ids) == len(req.group_block_ids[0]) == 3
    decode(manager, req, 14)  # computes positions 10..23; the next token sits at 24
    # Global: every block. Window 6 of position 24 reaches key 19: blocks 4 and 5 held.
    assert len(req.block_ids) == 6 and DROPPED not in req.block_ids
    assert req.group_block_ids[0][:4] == [DROPPED] * 4 and DROPPED not in req.group_block_ids[0][4:]
    held = [b for table in (req.block_ids, req.group_block_ids[0]) for b in table if b != DROPPED]
    assert manager.block_pool.num_used_blocks == len(held) == 8
    manager.free(req)
    assert manager.block_pool.num_used_blocks == 0


def test_the_executor_gets_block_zero_where_a_block_was_dropped() -> None:
    manager = make_manager()
    req = new_request("a", list(range(10)))
    manager.allocate_for_admission(req, manager.find_cached_prefix(req), 10)
    req.num_computed_tokens = 10
    decode(manager, req, 14)
    data = req.new_request_data()
    assert data.group_block_ids[0][:4] == [0, 0, 0, 0] and data.group_block_ids[0][4:] == req.group_block_ids[0][4:]
    assert data.block_ids == req.block_ids


def test_a_hit_needs_every_group_and_maps_no_dropped_block() -> None:
    """A finished request's global blocks stay cached, but its sliding group dropped the
    early ones (cached too, until evicted). Once they are evicted, a hit reaches only as far
    as the sliding group still holds the window of the first token computed after it."""
    manager = make_manager(num_blocks=20)
    first = new_request("a", list(range(24)))
    manager.allocate_for_admission(first, manager.find_cached_prefix(first), 24)
    first.num_computed_tokens = 24
    manager.register_full_blocks(first)
    decode(manager, first, 8)  # 32 tokens: the window dropped sliding blocks 0..5
    manager.free(first)
    same = new_request("b", list(range(24)) + [7] * 8 + [99])
    hit = manager.find_cached_prefix(same)
    assert len(hit) == 8  # all 8 full blocks, in both groups (dropped blocks stay cached)
    # Evict every cached block of the sliding group except its last two.
    sliding_tail = {manager.block_pool.cached_block(h + (1).to_bytes(2, "little")) for h in same.block_hashes[6:8]}
    taken = manager.block_pool.allocate(manager.num_free_blocks - 8 - 2)
    assert all(manager.block_pool.cached_block(h) is not None for h in same.block_hashes[:8])  # global kept
    assert sliding_tail <= {manager.block_pool.cached_block(h + (1).to_bytes(2, "little")) for h in same.block_hashes}
    hit = manager.find_cached_prefix(same)
    # Hit of 8 blocks: the token at 32 sees keys 27..32, blocks 6 and 7: both held.
    assert len(hit) == 8 and hit.block_tables[1][:6] == [DROPPED] * 6
    manager.block_pool.free(taken)
    # Now evict block 7 of the sliding group too: no hit length has its window held but 0
    # ... except a hit of 7 blocks, whose first token (28) sees keys 23..28: blocks 5, 6.
    block7 = manager.block_pool.cached_block(same.block_hashes[7] + (1).to_bytes(2, "little"))
    manager.block_pool.incref([block7])
    manager.block_pool._evict(block7)  # noqa: SLF001 the pool's own eviction, as allocation does
    manager.block_pool.free([block7])
    hit = manager.find_cached_prefix(same)
    assert len(hit) <= 7
    for group, table in enumerate(hit.block_tables):
        for index, block in enumerate(table):
            if block != DROPPED:
                key = same.block_hashes[index] + (b"" if group == 0 else group.to_bytes(2, "little"))
                assert manager.block_pool.cached_block(key) == block


def test_admission_after_a_long_hit_allocates_no_block_before_the_window() -> None:
    manager = make_manager(num_blocks=40)
    first = new_request("a", list(range(33)))
    manager.allocate_for_admission(first, manager.find_cached_prefix(first), 33)
    first.num_computed_tokens = 33
    manager.register_full_blocks(first)
    second = new_request("b", list(range(32)) + [5, 6, 7])
    hit = manager.find_cached_prefix(second)
    assert len(hit) == 8
    manager.take_cached_prefixes([hit])
    used_before = manager.block_pool.num_used_blocks
    manager.allocate_for_admission(second, hit, 3)
    # Tokens 32..34: global table 8 hit + 1 new; sliding: window of token 32 reaches 27
    # (block 6), so blocks 0..5 are neither hit nor allocated.
    assert second.group_block_ids[0][:6] == [DROPPED] * 6
    assert manager.block_pool.num_used_blocks == used_before + 2  # one new block per group
    assert second.num_computed_tokens == 32


def test_without_prefix_caching_every_group_starts_empty() -> None:
    manager = KVCacheManager(16, BLOCK_SIZE, enable_prefix_caching=False, hash_extra_keys=(), group_windows=(None, 4))
    req = new_request("a", list(range(9)))
    hit = manager.find_cached_prefix(req)
    assert len(hit) == 0 and manager.num_blocks_to_admit([(hit, 9)]) == 6
    manager.take_cached_prefixes([hit])
    manager.allocate_for_admission(req, hit, 9)
    assert len(req.block_ids) == len(req.group_block_ids[0]) == 3


def test_forks_share_every_group_and_copy_on_write_per_table() -> None:
    manager = make_manager()
    parent = new_request("p", list(range(10)))
    manager.allocate_for_admission(parent, manager.find_cached_prefix(parent), 10)
    parent.num_computed_tokens = 10
    child = new_request("c", list(range(10)))
    child.num_computed_tokens = 10
    manager.share(parent, child, 10)
    assert child.group_block_ids == parent.group_block_ids and child.num_dropped_blocks == parent.num_dropped_blocks
    # Both write position 10, in the shared third block of each table: one copy per table.
    assert manager.num_blocks_to_schedule(parent, 1) == 2
    new_ids, num_replaced, group_deltas = manager.allocate_slots(parent, 1)
    assert num_replaced == 1 and group_deltas[0][1] == 1
    copies = manager.take_block_copies()
    assert len(copies) == 2 and {dst for _, dst in copies} == {parent.block_ids[2], parent.group_block_ids[0][2]}
    assert manager.allocate_slots(child, 1) == ([], 0, [([], 0)])  # it holds the originals alone now
    manager.free(parent)
    manager.free(child)
    assert manager.block_pool.num_used_blocks == 0


# --- the scheduler over a fake executor --------------------------------------------------


class WindowedExecutor:
    """Mirrors each request's table per group from the step deltas alone, writes every
    computed token's K/V into its slot in every group, and checks for each token computed
    that each group's table holds the keys the token's window reads (a global group: all
    before it). A block reused while a window still reads it, a hit on a block a window
    dropped, or a bad copy shows up as a wrong token there."""

    def __init__(self, windows: tuple[int | None, ...]) -> None:
        self.windows = windows
        self.kv = FakeKVCache(BLOCK_SIZE)
        self.tables: dict[str, list[list[int]]] = {}
        self.tokens: dict[str, list[int]] = {}

    def execute(self, step: ExecuteStep) -> StepResult:
        for request_id in step.dropped_request_ids:
            del self.tables[request_id], self.tokens[request_id]
        self.kv.apply_copies(step.swap_out, step.swap_in, step.block_copies)
        work = []
        for new in step.new_requests:
            self.tables[new.request_id] = [list(new.block_ids), *map(list, new.group_block_ids)]
            self.tokens[new.request_id] = list(new.token_ids)
            work.append((new.request_id, new.num_computed_tokens))
        for cached in step.cached_requests:
            deltas = [(cached.new_block_ids, cached.num_replaced_blocks)]
            deltas += zip(cached.group_new_block_ids, cached.group_num_replaced_blocks)
            for table, (new_ids, num_replaced) in zip(self.tables[cached.request_id], deltas, strict=True):
                del table[len(table) - num_replaced :]
                table += new_ids
            work.append((cached.request_id, cached.num_computed_tokens))
        sampled = []
        for (request_id, start), count in zip(work, step.num_scheduled_tokens):
            tables, tokens = self.tables[request_id], self.tokens[request_id]
            for table in tables:
                self.kv.write(table, tokens, start, start + count)
            for position in range(start, start + count):
                for table, window in zip(tables, self.windows):
                    first = 0 if window is None else max(0, position - window + 1)
                    seen = self.kv.read(table, position + 1)[first:]
                    assert seen == tokens[first : position + 1], f"{request_id} at {position} reads other K/V"
            if start + count == len(tokens):
                token = model_token(request_id, tokens)
                tokens.append(token)
                sampled.append(SampledToken(request_id, token, None))
        return StepResult(step.step_id, sampled)


def windowed_scheduler(
    num_blocks: int, windows: tuple[int | None, ...], num_swap_blocks: int = 0, **limits: object
) -> Scheduler:
    config = make_scheduler(block_size=BLOCK_SIZE, **limits).config  # type: ignore[arg-type]
    return Scheduler(config, num_blocks, BLOCK_SIZE, num_swap_blocks=num_swap_blocks, kv_group_windows=windows)


# A model with a global group preempts in this pool; one with only a 5-token window holds
# 2-3 blocks a sequence and never has to: it runs 6 at once in 18 blocks. Asked to preempt
# by swap, a request of several groups is recomputed instead (nothing is swapped).
@pytest.mark.parametrize(
    ("windows", "num_blocks", "preempts", "preemption_mode"),
    [
        ((None, 6), 40, True, "recompute"),
        ((None, 6, 6, 9), 72, True, "recompute"),
        ((5,), 18, False, "recompute"),
        ((None, 6), 40, True, "swap"),
    ],
)
@pytest.mark.parametrize("schedule_ahead", [False, True], ids=["sync", "async"])
def test_scheduler_with_windows_matches_the_reference_under_preemption_and_prefix_hits(
    windows: tuple[int | None, ...], num_blocks: int, preempts: bool, preemption_mode: str, schedule_ahead: bool
) -> None:
    """Requests sharing prompt prefixes (prefix hits), a pool small enough to preempt, a
    step budget that chunks prefills, synchronous or scheduling a step ahead while one is in
    flight: every output equals the unscheduled reference, every window read holds the right
    K/V, and every block is free at the end."""
    rng = random.Random(len(windows))
    sched = windowed_scheduler(
        num_blocks=num_blocks, windows=windows, num_swap_blocks=64 if preemption_mode == "swap" else 0,
        max_num_seqs=6, max_num_batched_tokens=24, max_model_len=256, preemption_mode=preemption_mode,
    )
    executor = WindowedExecutor(windows)
    requests = []
    for i in range(14):
        req = make_request(f"r{i}", prompt_len=rng.randint(3, 40), max_tokens=rng.randint(1, 30))
        if i % 3:  # a shared prefix with the request before
            req.prompt_token_ids[:12] = requests[-1].prompt_token_ids[:12]
        requests.append(req)
    references = {r.request_id: reference_output(r, 256)[0] for r in requests}
    outputs: dict[str, list[int]] = {}
    for req in requests:
        sched.add_request(req)
    max_running = num_ahead = 0
    in_flight: list[tuple[ExecuteStep, StepResult]] = []
    for _ in range(2000):
        if not sched.has_unfinished_requests() and not in_flight:
            break
        # As the scheduler service: the executor runs each step the moment it has it; with
        # a step in flight the next is scheduled only where the core allows it.
        while sched.has_unfinished_requests() and (
            not in_flight or (schedule_ahead and len(in_flight) < 2 and sched.can_schedule_ahead())
        ):
            num_ahead += bool(in_flight)
            step = sched.schedule()
            in_flight.append((step, executor.execute(step)))
            max_running = max(max_running, sched.num_running)
        step, result = in_flight.pop(0)
        for delta in sched.update_from_output(step, result):
            outputs.setdefault(delta.request_id, []).extend(delta.new_token_ids)
    assert outputs == references
    assert (sched.num_preemptions_total > 0) == preempts and sched.prefix_cache_stats.num_hit_tokens > 0
    assert preempts or max_running == 6
    assert sched.num_swap_outs_total == 0 and (num_ahead > 0) == schedule_ahead
    assert sched.block_pool.num_used_blocks == 0


def test_a_window_holds_fewer_blocks_than_the_same_layers_global() -> None:
    """One long decode: a window group's table stays at its window's blocks."""
    for windows, expected in (((None, None), 2 * 25), ((None, 8), 25 + 3)):
        sched = windowed_scheduler(num_blocks=200, windows=windows, max_model_len=256)
        sched.add_request(make_request("a", prompt_len=20, max_tokens=80, eos_token_id=None))
        executor = WindowedExecutor(windows)
        peak = 0
        while sched.has_unfinished_requests():
            step = sched.schedule()
            peak = max(peak, sched.block_pool.num_used_blocks)
            sched.update_from_output(step, executor.execute(step))
        assert peak == expected


def test_kv_utilisation_counts_only_the_blocks_a_window_holds() -> None:
    """One sliding group: a long decode holds 2-3 blocks, whatever its length; utilisation
    is the tokens in them over their slots (dropped blocks are neither)."""
    sched = windowed_scheduler(num_blocks=40, windows=(5,), max_model_len=256)
    sched.add_request(make_request("a", prompt_len=10, max_tokens=40, eos_token_id=None))
    executor = WindowedExecutor((5,))
    for _ in range(30):
        step = sched.schedule()
        sched.update_from_output(step, executor.execute(step))
    (req,) = sched.running
    held = sched.block_pool.num_used_blocks
    assert held <= 3 and req.num_computed_tokens > 30
    first_held_position = req.num_dropped_blocks[0] * BLOCK_SIZE
    assert sched.kv_utilisation() == (req.num_computed_tokens - first_held_position) / (held * BLOCK_SIZE)


def test_prefix_cache_events_name_plain_token_hashes_only() -> None:
    """The Redis mirror (and so the gateways' routing) sees the first group's keys: the
    plain block hashes, never another group's suffixed copies."""
    manager = KVCacheManager(
        32, BLOCK_SIZE, enable_prefix_caching=True, hash_extra_keys=("m",), record_events=True,
        group_windows=(None, 6),
    )
    req = new_request("a", list(range(10)))
    manager.allocate_for_admission(req, manager.find_cached_prefix(req), 10)
    req.num_computed_tokens = 10
    manager.register_full_blocks(req)
    assert manager.block_pool.num_hashed_blocks == 4  # two blocks in each group
    assert [(e.block_hash, e.stored) for e in manager.take_events()] == [(h, True) for h in req.block_hashes[:2]]
