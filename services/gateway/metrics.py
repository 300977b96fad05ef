"""Prometheus metrics of one gateway, in a registry of its own (one per app, so tests and
several apps in one process never collide on the global default registry).

Counters and latency histograms are updated as requests progress; the scheduler-side
gauges (queue depths, KV blocks) are refreshed from a SchedulerInfo when /metrics is
scraped, so they are as fresh as the scrape and cost nothing in between. The prefix-cache
hit rate is measured here, from the cached-token counts the scheduler reports per request.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shared.messages import SchedulerInfo

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

    def finished(self, finish_reason: str) -> None:
        self.requests.labels(model=self._labels["model"], finish_reason=finish_reason).inc()

    def prompt_done(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        """Count a prompt once its request has ended (only then is its cached-token
        count final)."""
        self.prompt_tokens.inc(num_prompt_tokens)
        self.cached_prompt_tokens.inc(num_cached_tokens)
        self._num_prompt_tokens += num_prompt_tokens
        self._num_cached_tokens += num_cached_tokens

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
