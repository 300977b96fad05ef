"""OpenAI request fields -> one validated SamplingParams, checked against the model.

Everything a client can get wrong is found here, before anything reaches the scheduler:
ranges (via SamplingParams.validate), token ids outside the vocabulary (they would index
past the embedding table in the executor), and prompts that cannot fit the context.
"""

from __future__ import annotations

from pagedserve.services.gateway.context import GatewayContext
from pagedserve.services.gateway.errors import invalid_request
from pagedserve.services.gateway.openai_protocol import SamplingFields
from pagedserve.shared.sampling_bounds import InvalidSamplingParam
from pagedserve.shared.sampling_params import SamplingParams


def check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    for token_id in token_ids:
        if token_id >= vocab_size:
            raise invalid_request(f"token id {token_id} in {param} is outside the vocabulary (0..{vocab_size - 1})", param)


def check_num_choices(num_prompts: int, n: int, max_n: int) -> None:
    if n < 1:
        raise invalid_request(f"n must be at least 1, got {n}", "n")
    if num_prompts * n > max_n:
        detail = f"n={n}" if num_prompts == 1 else f"{num_prompts} prompts x n={n}"
        raise invalid_request(f"{detail} asks for {num_prompts * n} choices; this server allows at most {max_n} per request", "n")


def check_fits_context(num_prompt_tokens: int, max_model_len: int, prompt_param: str) -> None:
    """The prompt must leave room for one generated token. `max_tokens` beyond the room
    left is not refused: the completion ends at the context, finish_reason "length" (the
    scheduler stops every sequence there), as llama-server does; vLLM refuses it with a
    400, which no JSON schema can state, so a client could not know the bound beforehand."""
    if num_prompt_tokens >= max_model_len:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens, but `{prompt_param}` is {num_prompt_tokens} "
            f"tokens long, leaving no room for a completion; shorten `{prompt_param}`",
            prompt_param,
            code="context_length_exceeded",
        )


def check_prompt_bytes(num_bytes: int, max_model_len: int, max_token_bytes: int, prompt_param: str) -> None:
    """Before tokenizing: text that cannot fit the context whatever its tokens is refused
    without spending the tokenizer's time on it (a megabyte took it ~0.5 s). Exact in the
    refusing direction: each token covers at most `max_token_bytes` bytes of text (for the
    byte-level and SentencePiece tokenizers served, whose normalizers drop no characters)."""
    limit = max_model_len * max_token_bytes
    if num_bytes > limit:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens, and `{prompt_param}` holds {num_bytes:,} bytes of "
            f"text: more than {limit:,} bytes cannot fit that many tokens; shorten `{prompt_param}`",
            prompt_param,
            code="context_length_exceeded",
        )


def check_priority(priority: int, scheduling_policy: str) -> None:
    """Any caller's `priority` jumps every queue (-2**31 is never preempted): only where
    the operator chose priority scheduling."""
    if priority != 0 and scheduling_policy != "priority":
        raise invalid_request(
            f"priority {priority} needs priority scheduling; this server schedules first come, first served "
            "(--scheduling-policy fcfs)",
            "priority",
        )


def request_timeout_s(fields: SamplingFields, ceiling_s: float) -> float:
    """The request's deadline: its own `timeout` when given, which may only be shorter
    than the server's (the server's bound protects its capacity, not the client)."""
    if fields.timeout is None:
        return ceiling_s
    if fields.timeout > ceiling_s:
        raise invalid_request(f"timeout must be in (0, {ceiling_s:g}] seconds (this server's limit), got {fields.timeout:g}", "timeout")
    return fields.timeout


def stop_strings(fields: SamplingFields, max_stop_strings: int) -> list[str]:
    stop = [fields.stop] if isinstance(fields.stop, str) else list(fields.stop or [])
    if len(stop) > max_stop_strings:
        raise invalid_request(f"stop holds {len(stop)} strings; at most {max_stop_strings} are allowed", "stop")
    return [s for s in stop if s]


def build_sampling_params(
    context: GatewayContext,
    fields: SamplingFields,
    *,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """`max_tokens` and `logprobs` are resolved by the endpoint (their names and defaults
    differ); so is `prompt_logprobs` (completions' echo asks for them too)."""
    defaults = SamplingParams()
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=defaults.temperature if fields.temperature is None else fields.temperature,
        top_p=defaults.top_p if fields.top_p is None else fields.top_p,
        top_k=defaults.top_k if fields.top_k is None else fields.top_k,
        min_p=defaults.min_p if fields.min_p is None else fields.min_p,
        seed=fields.seed,
        presence_penalty=defaults.presence_penalty if fields.presence_penalty is None else fields.presence_penalty,
        frequency_penalty=defaults.frequency_penalty if fields.frequency_penalty is None else fields.frequency_penalty,
        repetition_penalty=defaults.repetition_penalty if fields.repetition_penalty is None else fields.repetition_penalty,
        stop_token_ids=list(fields.stop_token_ids or []),
        ignore_eos=fields.ignore_eos,
        logprobs=logprobs,
        n=fields.n,
        beam_width=defaults.beam_width if fields.beam_width is None else fields.beam_width,
        length_penalty=defaults.length_penalty if fields.length_penalty is None else fields.length_penalty,
        early_stopping=defaults.early_stopping if fields.early_stopping is None else fields.early_stopping,
        logit_bias=dict(fields.logit_bias or {}),
        # Above max_tokens, max_tokens wins (the completion ends there): a rule across two
        # fields that a JSON schema cannot state is better not refused.
        min_tokens=min(fields.min_tokens or 0, max_tokens),
        prompt_logprobs=prompt_logprobs,
    )
    if params.beam_width > context.config.max_n:
        raise invalid_request(
            f"beam_width={params.beam_width} runs that many sequences; this server allows at most {context.config.max_n} per request",
            "beam_width",
        )
    try:
        params.validate(context.config.max_logprobs)
    except InvalidSamplingParam as error:
        raise invalid_request(str(error), error.param) from None
    check_token_ids(params.stop_token_ids, context.vocab_size, "stop_token_ids")
    check_token_ids(list(params.logit_bias), context.vocab_size, "logit_bias")
    if fields.stream_options is not None and not fields.stream:
        raise invalid_request("stream_options is only allowed when stream is true", "stream_options")
    return params
