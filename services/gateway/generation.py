"""One HTTP request's life at the scheduler, independent of which endpoint it came from.

An HTTP request with P prompts and `n` samples becomes P scheduler requests (one per
prompt, ids f"{id}-{prompt index}") asking for `n` samples each: the scheduler computes
the prompt once and forks the samples off it (sample i seeded seed + i, as a separate
request with that seed would be). All feed one queue; a delta's `sample_index` says whose
it is: choice prompt_index * n + sample_index, OpenAI's order. Deltas become text through
each choice's detokenizer and stop-string matcher. The generation
always ends with `close()` (handlers call it in `finally`), which aborts at the
scheduler whatever has not finished, so a client that went away, a stop string, an
error or a timeout never leaves the scheduler generating into the void.

When the scheduler is done with a request is the scheduler's to say: its last delta for it
carries `request_finished` (every sample ended, or the whole beam search, or an abort).
The gateway may end choices sooner itself (a stop string matched in the text): a choice
whose sibling samples go on is aborted alone there (per-sample abort, freeing its blocks);
once every choice of a request has ended here without that flag, it aborts the request.

Replicas and failover: each scheduler request goes to the replica the registry routes
it to (services/gateway/router.py: longest cached prefix, then load). When that replica
is lost mid-request (its scheduler died: the connection drops; or its executors stayed
gone past its --executor-timeout: it answers 503), each unfinished choice is resubmitted
to another replica as its prompt + the tokens this gateway already received for it, with
max_tokens reduced by as many: the scheduler there computes that prefix and samples on,
and the choice's detokenizer and stop-string matcher simply keep going, so the client's
stream continues with no token repeated and none missing. Under greedy decoding the text
is exactly the undisturbed one. Not continued: beam search (its beams live in the lost
scheduler) and penalties that count generated tokens (there the resumed part counts the
earlier output as prompt); seeded sampling continues, from a fresh draw.

Never stuck: when a request has produced nothing for `stall_timeout_s` the scheduler is
asked (a small info query naming the request) whether it still holds it; no answer, or an
answer without it (scheduler restarted, message lost), fails it over to another replica as
above, or, where it cannot be continued, ends it with a 503. A deadline bounds the whole (the request's
`timeout`, else the server's `request_timeout_s`): when it passes, every unfinished choice
is aborted at the scheduler (as for a client that went away) and finishes with
"abort", keeping what it generated; `timed_out` then tells the response to say so.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import msgspec

from pagedserve.shared.messages import RequestDelta, RequestError, SubmitRequest, TokenLogprobs
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.services.gateway.context import GatewayContext
from pagedserve.services.gateway.detokenizer import IncrementalDetokenizer
from pagedserve.services.gateway.errors import GatewayError
from pagedserve.services.gateway.openai_protocol import PromptTokensDetails, Usage
from pagedserve.services.gateway.replica_registry import Replica
from pagedserve.services.gateway.scheduler_client import RequestEvent, SchedulerUnavailable
from pagedserve.services.gateway.stop_strings import StopStringMatcher
from pagedserve.shared.block_hashing import BlockHash


@dataclass
class ChoiceDelta:
    """What one step added to one choice, ready for an endpoint to format."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs]  # empty unless logprobs were asked for
    finish_reason: str | None


@dataclass
class ChoiceResult:
    """A whole choice, for non-streaming responses."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs]
    finish_reason: str


@dataclass
class _Choice:
    index: int
    request_id: str  # the scheduler request (one per prompt) this choice is a sample of
    sample_index: int
    prompt_index: int
    num_prompt_tokens: int
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)  # what a failover resubmits
    finish_reason: str | None = None  # stop | length | abort, or error (never sent to a client)
    first_token_at: float | None = None  # monotonic
    last_token_at: float | None = None


class Generation:
    def __init__(
        self,
        context: GatewayContext,
        request_id: str,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        stop: list[str],
        priority: int = 0,
        timeout_s: float | None = None,
        cache_salt: str | None = None,
    ) -> None:
        self.request_id = request_id
        self._context = context
        self._prompts = prompts
        self._params = params
        self._priority = priority
        self._cache_salt = cache_salt  # routed and cached only among requests with the same salt
        self._arrival_time = time.time()
        self._arrival_monotonic = time.monotonic()
        loop = asyncio.get_running_loop()
        self._timeout_s = context.config.request_timeout_s if timeout_s is None else timeout_s
        self._deadline = loop.time() + self._timeout_s
        self.timed_out = False
        self._queue: asyncio.Queue[RequestEvent] = asyncio.Queue()
        self._choices: list[_Choice] = []  # in choice index order
        self._samples_of: dict[str, list[_Choice]] = {}  # scheduler request id -> its choices by sample index
        # Scheduler requests whose last delta (`request_finished`) came: nothing to abort there.
        self._done_at_scheduler: set[str] = set()
        for prompt_index, prompt in enumerate(prompts):
            scheduler_request_id = f"{request_id}-{prompt_index}"
            samples = [
                _Choice(
                    index=prompt_index * n + sample_index,
                    request_id=scheduler_request_id,
                    sample_index=sample_index,
                    prompt_index=prompt_index,
                    num_prompt_tokens=len(prompt),
                    detokenizer=IncrementalDetokenizer(context.tokenizer, prompt),
                    stop_matcher=StopStringMatcher(stop),
                )
                for sample_index in range(n)
            ]
            self._choices += samples
            self._samples_of[scheduler_request_id] = samples
        self._num_samples = n
        # By prompt index: the prompt's logprobs (tokens 1..), when the params ask for them.
        self.prompt_logprobs: dict[int, list[TokenLogprobs]] = {}
        self._error: str | None = None
        self._closed = False
        self._replica_of: dict[str, Replica] = {}  # scheduler request id -> where it runs
        self._block_hashes_of: dict[str, list[BlockHash]] = {}  # its prompt's, as routing hashed them
        self._num_failovers = 0

    @property
    def finished(self) -> bool:
        return all(choice.finish_reason is not None for choice in self._choices)

    @property
    def num_choices(self) -> int:
        return len(self._choices)

    @property
    def num_samples(self) -> int:
        """n: choice i is sample i % n of prompt i // n."""
        return self._num_samples

    @property
    def prompts(self) -> list[list[int]]:
        return self._prompts

    # -- submission --------------------------------------------------------------------

    async def submit(self) -> None:
        """Route each scheduler request (one per prompt) and submit it. No replica
        connected is a 503 at once: waiting for one would only delay the same answer."""
        params = msgspec.structs.replace(self._params, n=self._num_samples)
        for request_id, samples in list(self._samples_of.items()):
            prompt = self._prompts[samples[0].prompt_index]
            await self._submit_to_replica(request_id, prompt, params, exclude=())

    async def _submit_to_replica(self, request_id: str, prompt: list[int], params: SamplingParams, exclude: tuple[str, ...], failover_from: str | None = None) -> None:
        context = self._context
        route = await context.replicas.route(prompt, exclude=exclude, cache_salt=self._cache_salt)
        if route is None:
            raise self._fail(503, context.no_replica_message(), code="service_unavailable", retry_after_s=1.0)
        replica = route.replica
        context.metrics.routed(replica.replica_id, route.decision.reason if failover_from is None else "failover", route.decision.num_cached_blocks)
        fields: dict[str, str | int | float] = {
            "status": "waiting",
            "parent_id": self.request_id,
            "gateway_id": context.config.gateway_id,
            "model": context.model_name,
            "arrival_time": self._arrival_time,
            "prompt_tokens": len(prompt),
            "sampling_params": msgspec.json.encode(params).decode(),
            "replica_id": replica.replica_id,
        }
        if failover_from is not None:
            fields["failover_from"] = failover_from
        context.records.record(request_id, fields)
        self._replica_of[request_id] = replica
        self._block_hashes_of[request_id] = route.block_hashes
        replica.num_in_flight += 1
        replica.client.register([request_id], self._queue)
        try:
            await replica.client.submit([SubmitRequest(request_id, prompt, params, self._arrival_time, self._priority, self._cache_salt)])
        except SchedulerUnavailable as error:
            raise self._fail(503, str(error), code="service_unavailable") from None

    # -- progress ----------------------------------------------------------------------

    async def next_deltas(self) -> list[ChoiceDelta]:
        """The deltas of the next step(s) that produced anything for this request.
        Raises GatewayError when the scheduler refused a choice, lost it, or went silent."""
        # One delta per choice: several steps queued while the client was being served
        # merge, so a chunk never lists the same choice twice.
        merged: dict[int, ChoiceDelta] = {}
        while not merged and not self.finished:
            for event in await self._next_events():
                samples = self._samples_of.get(event.request_id)
                if samples is None:
                    continue
                if isinstance(event, RequestError):
                    unfinished = [c for c in samples if c.finish_reason is None]
                    if not unfinished:
                        continue  # late, after every sample ended
                    if event.status_code == 503 and await self._fail_over(event.request_id, event.message):
                        continue
                    for choice in unfinished:
                        choice.finish_reason = "error"
                    raise self._fail(
                        event.status_code, event.message,
                        retry_after_s=event.retry_after_s if event.status_code in (429, 503) else None,
                    )
                self._take(merged, event)
            # Checked after every batch, not only when idle: a steady flow of deltas that
            # never finishes must not outrun the deadline.
            if asyncio.get_running_loop().time() >= self._deadline and not self.finished:
                self._time_out(merged)
        return list(merged.values())

    async def run_to_end(self) -> list[ChoiceResult]:
        """Every choice, whole (the non-streaming path)."""
        texts: list[list[str]] = [[] for _ in self._choices]
        token_ids: list[list[int]] = [[] for _ in self._choices]
        logprobs: list[list[TokenLogprobs]] = [[] for _ in self._choices]
        while not self.finished:
            for delta in await self.next_deltas():
                texts[delta.index].append(delta.text)
                token_ids[delta.index] += delta.token_ids
                logprobs[delta.index] += delta.logprobs
        return [
            ChoiceResult(c.index, "".join(texts[c.index]), token_ids[c.index], logprobs[c.index], c.finish_reason or "abort")
            for c in self._choices
        ]

    def usage(self) -> Usage:
        """Each prompt counts once however many samples it has (as OpenAI counts)."""
        prompt_tokens = sum(len(prompt) for prompt in self._prompts)
        cached = [0] * len(self._prompts)
        for choice in self._choices:
            cached[choice.prompt_index] = max(cached[choice.prompt_index], choice.num_cached_tokens)
        completion_tokens = sum(choice.num_output_tokens for choice in self._choices)
        return Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, PromptTokensDetails(sum(cached)))

    def _take(self, merged: dict[int, ChoiceDelta], delta: RequestDelta) -> None:
        """Apply one of the scheduler's deltas (or one made up as its abort would be)."""
        samples = self._samples_of[delta.request_id]
        if delta.request_finished:
            self._done_at_scheduler.add(delta.request_id)  # before _finish asks
        choice = samples[delta.sample_index]
        if choice.finish_reason is None:  # else a late delta after a stop string
            _merge(merged, self._apply(choice, delta))
        if delta.request_finished:
            # Nothing more comes for this request: samples it never reported (aborted
            # before they were forked off the prompt) end here, as aborted.
            for other in samples:
                if other.finish_reason is None:
                    abort = RequestDelta(delta.request_id, [], finish_reason="abort", sample_index=other.sample_index)
                    _merge(merged, self._apply(other, abort))

    def _apply(self, choice: _Choice, delta: RequestDelta) -> ChoiceDelta:
        context = self._context
        now = time.monotonic()
        token_ids = delta.new_token_ids
        if token_ids:
            if choice.first_token_at is None:
                if all(c.first_token_at is None for c in self._samples_of[choice.request_id]):
                    context.records.record(choice.request_id, {"status": "running", "first_token_time": time.time()})
                choice.first_token_at = now
                context.metrics.time_to_first_token.observe(now - self._arrival_monotonic)
            elif choice.last_token_at is not None:
                per_token_s = (now - choice.last_token_at) / len(token_ids)
                for _ in token_ids:
                    context.metrics.inter_token_latency.observe(per_token_s)
            choice.last_token_at = now
            choice.num_output_tokens += len(token_ids)
            choice.output_token_ids += token_ids
        # After a failover the prompt there includes earlier output: count the client's prompt only.
        choice.num_cached_tokens = max(choice.num_cached_tokens, min(delta.num_cached_tokens, choice.num_prompt_tokens))
        finish_reason = delta.finish_reason
        text = choice.detokenizer.push(token_ids)
        if finish_reason is not None:
            text += choice.detokenizer.flush()
        text, stopped = choice.stop_matcher.push(text, final=finish_reason is not None)
        if stopped:
            finish_reason = "stop"  # the scheduler only knows token-level stops: _finish tells it
            samples = self._samples_of[choice.request_id]
            replica = self._replica_of.get(choice.request_id)
            if delta.finish_reason is None and replica is not None and any(c is not choice and c.finish_reason is None for c in samples):
                # Its siblings go on: stop this sample alone there, freeing its blocks now.
                replica.client.abort_samples_soon(choice.request_id, [choice.sample_index])
        if finish_reason is not None:
            self._finish(choice, finish_reason)
        if len(delta.prompt_logprobs) > len(self.prompt_logprobs.get(choice.prompt_index, ())):
            # Cut to the client's prompt: after a failover the prompt there is longer.
            self.prompt_logprobs[choice.prompt_index] = delta.prompt_logprobs[: len(self._prompts[choice.prompt_index])]
        return ChoiceDelta(choice.index, text, token_ids, delta.logprobs, finish_reason)

    def _finish(self, choice: _Choice, finish_reason: str) -> None:
        context = self._context
        choice.finish_reason = finish_reason
        context.metrics.finished(finish_reason)
        context.metrics.generation_tokens.inc(choice.num_output_tokens)
        context.metrics.e2e_latency.observe(time.monotonic() - self._arrival_monotonic)
        samples = self._samples_of[choice.request_id]
        if any(c.finish_reason is None for c in samples):
            return
        # The request's last choice ended here. Unless the scheduler said it is done with
        # the request, a stop string ended some choice first: aborting the request (all
        # its samples) stops it there only now.
        if choice.request_id not in self._done_at_scheduler:
            self._abort_soon([choice.request_id])
        self._release(choice.request_id)
        context.records.record(choice.request_id, {
            "status": "finished",
            "finish_reason": ",".join(c.finish_reason or "" for c in samples),  # one per sample
            "finished_time": time.time(),
            "output_tokens": sum(c.num_output_tokens for c in samples),
            "cached_tokens": max(c.num_cached_tokens for c in samples),
        })

    async def _next_events(self) -> list[RequestEvent]:
        loop = asyncio.get_running_loop()
        config = self._context.config
        events: list[RequestEvent] = []
        while not events and self._queue.empty():
            remaining_s = self._deadline - loop.time()
            if remaining_s <= 0:
                return events  # next_deltas times the request out
            try:
                # More may be queued behind this one by the time we resume: it goes first.
                events.append(await asyncio.wait_for(self._queue.get(), min(config.stall_timeout_s, remaining_s)))
            except asyncio.TimeoutError:
                if loop.time() < self._deadline:  # silent for stall_timeout_s, not just out of time
                    await self._check_still_held()
        while not self._queue.empty():
            events.append(self._queue.get_nowait())
        return events

    async def _check_still_held(self) -> None:
        """No progress for a while: legitimate (queued behind others) only if the
        scheduler answers and still holds every unfinished choice."""
        config = self._context.config
        unfinished = [request_id for request_id, samples in self._samples_of.items() if any(c.finish_reason is None for c in samples)]
        # Asked afresh, after our submit: the answer reflects it.
        lost: dict[str, str] = {}  # request id -> why
        for replica in {id(self._replica_of[r]): self._replica_of[r] for r in unfinished}.values():
            held_here = [r for r in unfinished if self._replica_of[r] is replica]
            info = await replica.client.info(config.status_timeout_s, request_ids=held_here)
            if not self._queue.empty():
                return  # deltas arrived while asking (they precede the answer on the socket)
            if info is None:
                why = (
                    f"the scheduler at {replica.address} stopped answering (no token for {config.stall_timeout_s:g} s, "
                    f"no status reply within {config.status_timeout_s:g} s)"
                )
                lost.update(dict.fromkeys(held_here, why))
            else:
                why = f"the scheduler at {replica.address} no longer holds request(s) %s (restarted?); please retry"
                lost.update({r: why % r for r in held_here if r not in info.held_request_ids})
        for request_id, why in lost.items():
            if not await self._fail_over(request_id, why):
                raise self._fail(503, why, code="service_unavailable")

    # -- the end -----------------------------------------------------------------------

    def _time_out(self, merged: dict[int, ChoiceDelta]) -> None:
        """Abort what is unfinished at the scheduler now, and end each such choice as the
        scheduler's own abort would: a final "abort" delta (flushing held-back text)."""
        self.timed_out = True
        unfinished = [c for c in self._choices if c.finish_reason is None]
        request_ids = list(dict.fromkeys(c.request_id for c in unfinished))
        self._abort_soon(request_ids)
        for request_id in request_ids:
            # What the scheduler answers an abort of a request whose samples were not forked
            # yet: one delta that ends the request, and with it every unfinished choice.
            first = next(c for c in unfinished if c.request_id == request_id)
            self._take(merged, RequestDelta(request_id, [], finish_reason="abort", sample_index=first.sample_index, request_finished=True))

    def timeout_error(self) -> GatewayError:
        """What the client is told once `timed_out`: a 504 when nothing was generated, else
        the error event that ends a stream after its "abort" chunks."""
        num_tokens = sum(choice.num_output_tokens for choice in self._choices)
        return GatewayError(
            504, f"request exceeded its deadline of {self._timeout_s:g} s and was aborted after {num_tokens} generated "
            "token(s); raise the request's `timeout` (up to the server's --request-timeout) or ask for fewer tokens",
            code="timeout",
        )

    def _abort_soon(self, request_ids: list[str]) -> None:
        """Abort each at the replica it runs on."""
        for request_id in request_ids:
            replica = self._replica_of.get(request_id)
            if replica is not None:
                replica.client.abort_soon([request_id])

    def _release(self, request_id: str) -> None:
        """Done with this scheduler request here: stop routing its deltas, uncount it."""
        replica = self._replica_of.pop(request_id, None)
        if replica is not None:
            replica.client.unregister([request_id])
            replica.num_in_flight -= 1
            self._context.replicas.request_ended(replica, self._block_hashes_of.pop(request_id, []))

    async def _fail_over(self, request_id: str, reason: str) -> bool:
        """The replica running `request_id` lost it (503): resubmit each unfinished choice
        elsewhere as prompt + the tokens already received. False when it cannot be
        continued (beam search, no other replica, too many failovers): the caller fails it."""
        context = self._context
        replica = self._replica_of.get(request_id)
        samples = self._samples_of.get(request_id, [])
        unfinished = [c for c in samples if c.finish_reason is None]
        if replica is None or not unfinished or self._params.use_beam_search:
            return False
        if self._num_failovers >= max(2, len(context.replicas.all())):
            return False
        others = [r for r in context.replicas.all() if r is not replica and r.client.connected]
        if not others:
            return False
        self._num_failovers += 1
        self._release(request_id)
        context.replicas.mark_failed(replica)  # after the release: it forgets what was routed there
        del self._samples_of[request_id]
        # A request whose samples were not all finished there: abort it there in case the
        # replica is alive (a 503 for executors gone); harmless when it is not.
        replica.client.abort_soon([request_id])
        self._done_at_scheduler.discard(request_id)
        context.metrics.failovers.inc(len(unfinished))
        for choice in unfinished:
            new_id = f"{request_id}.{choice.sample_index}~{self._num_failovers}"
            params = self._params.for_sample(choice.sample_index) if self._num_samples > 1 else msgspec.structs.replace(self._params, n=1)
            remaining = params.max_tokens - choice.num_output_tokens
            prompt = self._prompts[choice.prompt_index] + choice.output_token_ids
            if remaining <= 0:
                return False  # cannot happen: the scheduler ends a choice at max_tokens itself
            params = msgspec.structs.replace(params, max_tokens=remaining)
            if choice.prompt_index in self.prompt_logprobs:  # already received: not again, for a longer prompt
                params = msgspec.structs.replace(params, prompt_logprobs=None)
            choice.request_id = new_id
            choice.sample_index = 0
            self._samples_of[new_id] = [choice]
            try:
                await self._submit_to_replica(new_id, prompt, params, exclude=(replica.address,), failover_from=replica.replica_id)
            except GatewayError:
                return False
        context.records.record(request_id, {"status": "failed_over", "error": reason, "finished_time": time.time()})
        return True

    def _fail(self, status_code: int, message: str, *, code: str | None = None, retry_after_s: float | None = None) -> GatewayError:
        """Remember why this generation failed (for close()) and build the error to raise."""
        self._error = message
        return GatewayError(status_code, message, code=code, retry_after_s=retry_after_s)

    def close(self) -> None:
        """Abort what is unfinished, stop routing, settle metrics and records. Idempotent
        and synchronous: it runs in `finally` blocks of cancelled tasks."""
        if self._closed:
            return
        self._closed = True
        context = self._context
        unfinished = [c for c in self._choices if c.finish_reason is None or c.finish_reason == "error"]
        # Aborting a request aborts every sample of it, finished ones being no matter.
        undropped_request_ids = list(dict.fromkeys(c.request_id for c in unfinished))
        self._abort_soon(undropped_request_ids)
        for request_id in list(self._replica_of):
            self._release(request_id)
        reason = "error" if self._error is not None else "abort"
        now = time.time()
        for choice in unfinished:
            choice.finish_reason = reason
            context.metrics.finished(reason)
            context.metrics.generation_tokens.inc(choice.num_output_tokens)
        for request_id in undropped_request_ids:
            output_tokens = sum(c.num_output_tokens for c in self._samples_of[request_id])
            fields: dict[str, str | int | float] = {"status": "error" if self._error else "aborted", "finished_time": now, "output_tokens": output_tokens}
            if self._error is not None:
                fields["error"] = self._error
            context.records.record(request_id, fields)
        usage = self.usage()
        context.metrics.prompt_done(usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0)


def _merge(merged: dict[int, ChoiceDelta], delta: ChoiceDelta) -> None:
    earlier = merged.get(delta.index)
    if earlier is None:
        merged[delta.index] = delta
    else:
        earlier.text += delta.text
        earlier.token_ids = earlier.token_ids + delta.token_ids
        earlier.logprobs = earlier.logprobs + delta.logprobs
        earlier.finish_reason = delta.finish_reason
