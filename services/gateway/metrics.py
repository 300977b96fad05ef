"""Prometheus metrics of one gateway, in a registry of its own (one per app, so tests and
several apps in one process never collide on the global default registry).

Counters and latency histograms are updated as requests progress; the scheduler-side
gauges (queue depths, KV blocks) are refreshed from a SchedulerInfo when /metrics is
scraped, so they are as fresh as the scrape and cost nothing in between. The prefix-cache
hit rate is measured here, from the cached-token counts the scheduler reports per request.

With several replicas the scheduler gauges are their sums, and each replica has its own
(label `replica`): up, running, waiting, KV blocks used; routing decisions are counted per
replica and reason ("prefix": a cached chain won, "least_loaded": none was cached,
"failover": a lost replica's request resumed there), with the prompt blocks the router
expected that replica to hold (`pagedserve_routing_cached_blocks`, its hits as routing saw
them; the scheduler's own count arrives in `cached_tokens`).
"""

from __future__ import annotations

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pagedserve.shared.messages import SchedulerInfo

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class GatewayMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model": model_name}
        r = self.registry
        self.requests = Counter(
            "pagedserve_requests", "Finished choices by finish reason (stop, length, abort, error).",
            ["model", "finish_reason"], registry=r,
        )
        self._labels = labels
        self._num_prompt_tokens = 0
        self._num_cached_tokens = 0
        self.prompt_tokens = Counter("pagedserve_prompt_tokens", "Prompt tokens submitted.", ["model"], registry=r).labels(**labels)
        self.cached_prompt_tokens = Counter(
            "pagedserve_prompt_tokens_cached", "Prompt tokens the scheduler served from its prefix cache.", ["model"], registry=r,
        ).labels(**labels)
        self.generation_tokens = Counter("pagedserve_generation_tokens", "Tokens generated.", ["model"], registry=r).labels(**labels)
        self.time_to_first_token = Histogram(
            "pagedserve_time_to_first_token_seconds", "Arrival at the gateway to the first token.",
            ["model"], buckets=_LATENCY_BUCKETS_S, registry=r,
        ).labels(**labels)
        self.inter_token_latency = Histogram(
            "pagedserve_inter_token_latency_seconds", "Time between consecutive tokens of one choice.",
            ["model"], buckets=_LATENCY_BUCKETS_S, registry=r,
        ).labels(**labels)
        self.e2e_latency = Histogram(
            "pagedserve_e2e_request_latency_seconds", "Arrival at the gateway to the last token of a choice.",
            ["model"], buckets=_E2E_BUCKETS_S, registry=r,
        ).labels(**labels)

        def gauge(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, ["model"], registry=r).labels(**labels)

        self.scheduler_up = gauge("pagedserve_scheduler_up", "1 when the scheduler answered the last scrape's info query.")
        self.num_running = gauge("pagedserve_num_requests_running", "Requests the scheduler is running.")
        self.num_waiting = gauge("pagedserve_num_requests_waiting", "Requests waiting in the scheduler's queue.")
        self.num_swapped = gauge("pagedserve_num_requests_swapped", "Requests swapped out to CPU.")
        self.kv_blocks_used = gauge("pagedserve_kv_blocks_used", "KV cache blocks in use.")
        self.kv_blocks_free = gauge("pagedserve_kv_blocks_free", "KV cache blocks free.")
        self.kv_cache_usage = gauge("pagedserve_kv_cache_usage", "Fraction of KV cache blocks in use (0..1).")
        self.prefix_cache_hit_rate = gauge(
            "pagedserve_prefix_cache_hit_rate", "Fraction of prompt tokens served from the prefix cache, since start."
        )
        self.routing_decisions = Counter(
            "pagedserve_routing_decisions", "Scheduler requests routed, by replica and reason (prefix, least_loaded, failover).",
            ["model", "replica", "reason"], registry=r,
        )
        self.routing_cached_blocks = Counter(
            "pagedserve_routing_cached_blocks", "Prompt blocks the chosen replica held when routed (expected prefix hits).",
            ["model", "replica"], registry=r,
        )
        self.failovers = Counter(
            "pagedserve_failovers", "Choices resumed on another replica after theirs was lost.", ["model"], registry=r,
        ).labels(**labels)

        def replica_gauge(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, ["model", "replica"], registry=r)

        self.replica_up = replica_gauge("pagedserve_replica_up", "1 when the replica's scheduler answered the last scrape.")
        self.replica_running = replica_gauge("pagedserve_replica_requests_running", "Requests running on the replica.")
        self.replica_waiting = replica_gauge("pagedserve_replica_requests_waiting", "Requests waiting on the replica.")
        self.replica_kv_blocks_used = replica_gauge("pagedserve_replica_kv_blocks_used", "KV cache blocks in use on the replica.")

    def finished(self, finish_reason: str) -> None:
        self.requests.labels(model=self._labels["model"], finish_reason=finish_reason).inc()

    def prompt_done(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        """Count a prompt once its request has ended (only then is its cached-token
        count final)."""
        self.prompt_tokens.inc(num_prompt_tokens)
        self.cached_prompt_tokens.inc(num_cached_tokens)
        self._num_prompt_tokens += num_prompt_tokens
        self._num_cached_tokens += num_cached_tokens

    def routed(self, replica_id: str, reason: str, num_cached_blocks: int) -> None:
        model = self._labels["model"]
        self.routing_decisions.labels(model=model, replica=replica_id, reason=reason).inc()
        self.routing_cached_blocks.labels(model=model, replica=replica_id).inc(num_cached_blocks)

    def refresh_replicas(self, infos: list[tuple[str, SchedulerInfo | None]]) -> None:
        """Per-replica gauges, and the unlabelled ones as sums over the replicas that
        answered (None when none did: they keep their last values)."""
        model = self._labels["model"]
        answered = [info for _, info in infos if info is not None]
        for replica_id, info in infos:
            self.replica_up.labels(model=model, replica=replica_id).set(0 if info is None else 1)
            if info is not None:
                self.replica_running.labels(model=model, replica=replica_id).set(info.num_running)
                self.replica_waiting.labels(model=model, replica=replica_id).set(info.num_waiting)
                self.replica_kv_blocks_used.labels(model=model, replica=replica_id).set(info.num_used_blocks)
        if not answered:
            self.refresh(None)
            return
        total = answered[0]
        for info in answered[1:]:
            total = msgspec.structs.replace(
                total, num_running=total.num_running + info.num_running, num_waiting=total.num_waiting + info.num_waiting,
                num_swapped=total.num_swapped + info.num_swapped, num_blocks=total.num_blocks + info.num_blocks,
                num_used_blocks=total.num_used_blocks + info.num_used_blocks, num_free_blocks=total.num_free_blocks + info.num_free_blocks,
            )
        self.refresh(total)

    def refresh(self, info: SchedulerInfo | None) -> None:
        """Set the scheduler gauges from a fresh info answer (None: scheduler not answering,
        and its gauges keep their last values rather than pretending the queue is empty)."""
        self.scheduler_up.set(0 if info is None else 1)
        hit_rate = self._num_cached_tokens / self._num_prompt_tokens if self._num_prompt_tokens else 0.0
        self.prefix_cache_hit_rate.set(hit_rate)
        if info is None:
            return
        self.num_running.set(info.num_running)
        self.num_waiting.set(info.num_waiting)
        self.num_swapped.set(info.num_swapped)
        if info.num_blocks:  # 0 until an executor reported the pool's size
            self.kv_blocks_used.set(info.num_used_blocks)
            self.kv_blocks_free.set(info.num_free_blocks)
            self.kv_cache_usage.set(info.num_used_blocks / info.num_blocks)

    def render(self) -> bytes:
        return generate_latest(self.registry)
