"""Grammar-constrained sampling in the executor: compiled grammars, one matcher per
constrained sequence, and one token bitmask per step for the constrained rows.

Built on xgrammar (see docs/structured-output.md): it compiles JSON schemas,
regexes and EBNF against the tokenizer's vocabulary once, then answers "which tokens may
come next" as a packed int32 bitmask in microseconds per row.

- Compiles run on a worker thread, started the moment a constrained request reaches the
  executor (`GrammarCompiler.prefetch`, before the step's forward), so they overlap its
  prefill; the sampler only waits for the rest if a compile is slower than the prefill
  (a JSON schema takes ~8 ms here, a prefill of the ~40-token chat preamble more). Each
  distinct grammar compiles once: a bounded LRU cache. The gateway has already checked
  that the grammar compiles (`services/gateway/grammar_validator.py`), so a compile
  error here means a different xgrammar version, and ends the request (see below).
- A sequence's matcher is derived from its tokens, never shipped: `GrammarState.sync`
  feeds it the output tokens it has not seen. That one rule rebuilds it after a
  preemption by recompute, after a swap-in (both arrive as a NewRequestData holding the
  tokens generated so far), on a new executor after failover, and for a forked sample
  (a copy of its parent's state, or rebuilt when the parent had none yet).
- A dead end (no token allowed, or a sampled token the matcher rejects, which a correct
  mask makes impossible unless another mask such as min_tokens removed every allowed
  token) ends the sequence with EOS, so it finishes "stop" at once instead of wandering.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch
import xgrammar

from pagedserve.shared.messages import SampledToken
from pagedserve.shared.model_source import ModelSource
from pagedserve.shared.structured_output import GrammarSpec
from pagedserve.shared.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

# Distinct grammars kept compiled; a JSON-schema grammar with its mask cache is ~100 KB.
DEFAULT_CACHE_SIZE = 128


def compile_grammar(compiler: xgrammar.GrammarCompiler, spec: GrammarSpec) -> xgrammar.CompiledGrammar:
    """The one place a spec becomes a grammar (the gateway's validator mirrors it).

    any_whitespace=False: with free whitespace between JSON tokens a weak model can emit
    spaces and newlines forever and never close the object (NOTES: seen in a random walk)."""
    if spec.kind == "json_schema":
        return compiler.compile_json_schema(spec.source, any_whitespace=False)
    if spec.kind == "regex":
        return compiler.compile_regex(spec.source)
    if spec.kind == "choice":
        return compiler.compile_grammar(spec.to_ebnf_choice())
    return compiler.compile_grammar(spec.source)


class GrammarCompiler:
    """Compiles grammars off the step loop and caches them (LRU, `cache_size` entries).

    The tokenizer (needed to map grammar terminals onto token ids) loads on the worker
    thread with the first constrained request, so an executor that never sees one never
    pays for it."""

    def __init__(self, source: ModelSource, vocab_size: int, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self._source = source
        self._vocab_size = vocab_size
        self._cache_size = cache_size
        self._futures: OrderedDict[GrammarSpec, Future[xgrammar.CompiledGrammar]] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._lock = threading.Lock()
        self.num_compiles = 0
        self.num_waits = 0  # samples that had to wait for a compile to finish

    def prefetch(self, spec: GrammarSpec) -> Future[xgrammar.CompiledGrammar]:
        """Start compiling `spec` unless it is cached or under way; never blocks."""
        with self._lock:
            future = self._futures.get(spec)
            if future is not None:
                self._futures.move_to_end(spec)
                return future
            future = self._pool.submit(self._compile, spec)
            self._futures[spec] = future
            while len(self._futures) > self._cache_size:
                self._futures.popitem(last=False)
            return future

    def get(self, spec: GrammarSpec) -> xgrammar.CompiledGrammar:
        """The compiled grammar; waits only if its compile is still running. Raises what
        the compile raised."""
        future = self.prefetch(spec)
        if not future.done():
            self.num_waits += 1
        return future.result()

    def _ensure_compiler(self) -> xgrammar.GrammarCompiler:
        if self._compiler is None:
            tokenizer = load_tokenizer(self._source)
            info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self._vocab_size)
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def _compile(self, spec: GrammarSpec) -> xgrammar.CompiledGrammar:
        compiled = compile_grammar(self._ensure_compiler(), spec)
        self.num_compiles += 1
        return compiled

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class GrammarState:
    """The grammar position of one sequence: a matcher fed exactly its output tokens."""

    def __init__(self, spec: GrammarSpec) -> None:
        self.spec = spec
        self._matcher: xgrammar.GrammarMatcher | None = None
        self._num_accepted = 0
        self.dead = False  # reached a dead end: the sequence must stop

    def fork(self) -> GrammarState:
        """A copy at the same position (a forked sample before its first token)."""
        child = GrammarState(self.spec)
        if self._matcher is not None:
            child._matcher = self._matcher.fork()
        child._num_accepted = self._num_accepted
        child.dead = self.dead
        return child

    def sync(self, compiler: GrammarCompiler, output_token_ids: Sequence[int]) -> None:
        """Make the matcher stand after `output_token_ids`, building it if needed."""
        if self.dead:
            return
        if self._matcher is None:
            try:
                grammar = compiler.get(self.spec)
            except Exception as error:  # a grammar the gateway's check let through
                logger.error("grammar of kind %s failed to compile in the executor: %s", self.spec.kind, error)
                self.dead = True
                return
            self._matcher = xgrammar.GrammarMatcher(grammar)
            self._num_accepted = 0
        while self._num_accepted < len(output_token_ids):
            self.accept(output_token_ids[self._num_accepted])
            if self.dead:
                return

    @property
    def matcher(self) -> xgrammar.GrammarMatcher:
        """The synced matcher (call `sync` first; a live state always has one)."""
        assert self._matcher is not None
        return self._matcher

    @property
    def terminated(self) -> bool:
        """It accepted its stop token: the sequence is over. (With asynchronous scheduling
        the step after that one still runs it once; the scheduler drops that token.)"""
        return self._matcher is not None and self._matcher.is_terminated()

    def accept(self, token_id: int) -> None:
        """Advance by a sampled token; a rejected token marks a dead end."""
        assert self._matcher is not None
        self._num_accepted += 1
        if self._matcher.is_terminated() or not self._matcher.accept_token(token_id):
            self.dead = True


class GrammarBitmask:
    """One step's masks: an int32 [rows, ceil(vocab / 32)] bitmask over the sampled rows,
    filled for the constrained ones, applied to those rows only."""

    def __init__(self, bitmask: torch.Tensor, rows: list[int], vocab_size: int) -> None:
        self.bitmask = bitmask
        self.rows = rows
        self.vocab_size = vocab_size

    def apply_(self, logits: torch.Tensor) -> None:
        """Set the disallowed tokens of the masked rows of logits [num_rows, vocab] to -inf,
        in place: one xgrammar kernel over the batch, no copy of the logits (a clone of a
        [32, 49152] fp32 batch was part of the measured cost, `benchmarks/structured_output.py`)."""
        bitmask = self.bitmask if self.bitmask.device == logits.device else self.bitmask.to(logits.device, non_blocking=True)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=self.rows)


class ConstrainedSequence(Protocol):
    """What structured output reads of a sequence (the executor's RequestState)."""

    grammar: GrammarState | None

    @property
    def output_token_ids(self) -> Sequence[int]: ...


class StructuredOutput:
    """The executor's structured-output manager: what the model runner calls."""

    def __init__(self, source: ModelSource, vocab_size: int, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.vocab_size = vocab_size
        self.compiler = GrammarCompiler(source, vocab_size, cache_size)
        self._bitmask = xgrammar.allocate_token_bitmask(8, vocab_size)  # grows with the batch
        # Fills every constrained row's mask in one native call. One thread: a row takes
        # ~10 us (measured), so a second thread's start-up costs more than it saves.
        self._batch_matcher = xgrammar.BatchGrammarMatcher(max_threads=1)
        self.num_dead_ends = 0

    def new_state(self, spec: GrammarSpec) -> GrammarState:
        self.compiler.prefetch(spec)
        return GrammarState(spec)

    def bitmask_for(self, states: Sequence[ConstrainedSequence]) -> GrammarBitmask | None:
        """The step's bitmask over the sampled rows, filled for those whose sequence has
        a live grammar (None when none has: unconstrained batches pay nothing)."""
        if self._bitmask.shape[0] < len(states):
            self._bitmask = xgrammar.allocate_token_bitmask(max(len(states), 2 * self._bitmask.shape[0]), self.vocab_size)
        live_rows: list[int] = []
        matchers: list[xgrammar.GrammarMatcher] = []
        for row, state in enumerate(states):
            grammar = state.grammar
            if grammar is None:
                continue
            grammar.sync(self.compiler, state.output_token_ids)
            if not grammar.dead and not grammar.terminated:  # a terminated matcher has no mask
                matchers.append(grammar.matcher)
                live_rows.append(row)
        if not live_rows:
            return None
        self._batch_matcher.batch_fill_next_token_bitmask(matchers, self._bitmask, live_rows)
        return GrammarBitmask(self._bitmask[: len(states)], live_rows, self.vocab_size)

    def advance(self, states: Sequence[ConstrainedSequence], sampled: Sequence[SampledToken], eos_token_id: int | None) -> None:
        """Feed each constrained sequence its sampled token (before the caller appends it
        to the sequence); a sequence at a dead end gets EOS instead, so it stops."""
        for state, token in zip(states, sampled):
            grammar = state.grammar
            if grammar is None or grammar.terminated:  # past its end: a surplus token, dropped
                continue
            if not grammar.dead:
                grammar.accept(token.token_id)
            if grammar.dead and eos_token_id is not None and token.token_id != eos_token_id:
                self.num_dead_ends += 1
                logger.warning("sequence %s reached a dead end of its %s grammar; ending it", token.sequence_id, grammar.spec.kind)
                token.token_id = eos_token_id

    def close(self) -> None:
        self.compiler.close()
