"""The OpenAI request shapes: parse and check a body into what the engine runs and what the client gets back.

Everything a client can get wrong is checked here, before an invocation is queued, and reported with the name of
the offending parameter. The answer's shapes are built in `gateway.answers`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

from functions.spec import FunctionSpec
from gateway.errors import ApiError
from gateway.structured import parse_response_format
from gateway.tools import ToolRequest, message_fields, output_grammar, parse_tools
from gpu_runtime.tokenizer import Tokenizer
from protocol.messages import SamplingParams

MAX_STOP_STRINGS = 16  # OpenAI allows 4; each costs the worker one substring search per token
MAX_N = 16  # sequences per prompt (n, best_of): each holds KV for its own tokens beyond the shared prompt
MAX_LOGPROBS = 20  # OpenAI's bound on logprobs and top_logprobs
MAX_PROMPTS = 64  # prompts in one completions request, one invocation each
MAX_LOGIT_BIAS = 1024  # logit_bias entries: every sampling step applies them all
MIN_TEMPERATURE = 1e-5
STREAM_OPTIONS = ("include_usage", "continuous_usage_stats")  # the second is vLLM's


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    echo: str = ""  # the text `echo` puts before each of its choices' text


@dataclass(frozen=True)
class Parsed:
    """A checked request: its prompts (one invocation each), what the engine runs for each, what the client sees."""

    prompts: tuple[Prompt, ...]
    sampling: SamplingParams  # its n is best_of: every sequence generated per prompt
    stream: bool
    include_usage: bool
    n: int = 1  # choices per prompt the client gets: the best n of sampling.n by cumulative log-probability
    logprobs: int | None = None  # alternatives per token the answer shows; None: no log-probabilities
    tools: ToolRequest | None = None  # chat with tools: the answer's text is parsed for their calls
    continuous_usage: bool = False  # streamed: every chunk carries the usage so far

    @property
    def budget(self) -> int:
        """Tokens the request may use, as rate limits count them: its prompts and every sequence's max_tokens."""
        per_prompt = self.sampling.max_tokens * self.sampling.n
        return sum(len(p.ids) + per_prompt for p in self.prompts)


def _get(body: dict, name: str, kinds: tuple[type, ...], default: Any, what: str) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        raise ApiError(400, f"'{name}' must be {what}, got {value!r}", param=name)
    if not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {what}, got {str(value)[:64]!r}", param=name)
    return value


def _int_in(body: dict, name: str, lo: int, hi: int, default: int | None) -> int | None:
    value = _get(body, name, (int,), default, f"an integer in [{lo}, {hi}]")
    if value is not None and not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be in [{lo}, {hi}], got {value}", param=name)
    return value


def _number_in(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    value = float(_get(body, name, (int, float), default, f"a number in [{lo}, {hi}]"))
    if not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be in [{lo}, {hi}], got {value}", param=name)
    return value


def _max_tokens(body: dict, longest: int, spec: FunctionSpec, default_max: int) -> int:
    room = spec.max_model_len - longest
    if room <= 0:
        raise ApiError(
            400,
            f"the prompt is {longest} tokens; function '{spec.name}' allows {spec.max_model_len} "
            "tokens in total (max_model_len), leaving no room to generate",
            param="prompt",
            code="context_length_exceeded",
        )
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(param)
    if max_tokens is None:
        max_tokens = min(default_max, room)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"'{param}' must be a positive integer, got {str(max_tokens)[:64]!r}", param=param)
    if longest + max_tokens > spec.max_model_len:
        raise ApiError(
            400,
            f"this model's maximum context length is {spec.max_model_len} tokens; the prompt is {longest} "
            f"tokens and {param} is {max_tokens}",
            param=param,
            code="context_length_exceeded",
        )
    return max_tokens


def _choices(body: dict, stream: bool) -> tuple[int, int]:
    """(n, best_of): the choices a client gets per prompt, and how many sequences they are picked from."""
    n = _int_in(body, "n", 1, MAX_N, 1)
    best_of = _int_in(body, "best_of", 1, MAX_N, n)
    if best_of < n:
        raise ApiError(400, f"'best_of' must be >= n ({n}), got {best_of}", param="best_of")
    if stream and best_of > n:  # as OpenAI: the best are known only once every sequence is complete
        raise ApiError(400, "'best_of' greater than 'n' cannot be streamed", param="best_of")
    return n, best_of


def _logprobs(body: dict, chat: bool) -> int | None:
    """Alternatives the answer shows per token, None for no log-probabilities: completions ask with
    `logprobs: k`, chat with `logprobs: true` and `top_logprobs: k`."""
    if not chat:
        return _int_in(body, "logprobs", 0, MAX_LOGPROBS, None)
    on = _get(body, "logprobs", (bool,), False, "a boolean")
    top = _int_in(body, "top_logprobs", 0, MAX_LOGPROBS, None)
    if top and not on:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if on else None


def _stops(body: dict, vocab: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings", param="stop")
    stop_ids = _get(body, "stop_token_ids", (list,), [], "a list of token ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in stop_ids):
        raise ApiError(400, f"'stop_token_ids' must be token ids in [0, {vocab})", param="stop_token_ids")
    return tuple(stops), tuple(stop_ids)


def _logit_bias(body: dict, vocab: int) -> tuple[tuple[int, float], ...]:
    bias = _get(body, "logit_bias", (dict,), {}, "an object of token ids to numbers in [-100, 100]")
    if len(bias) > MAX_LOGIT_BIAS:
        raise ApiError(400, f"'logit_bias' takes at most {MAX_LOGIT_BIAS} tokens", param="logit_bias")
    pairs = []
    for key, value in bias.items():
        # JSON object keys are strings: OpenAI's are decimal token ids
        token = int(key) if key.isascii() and key.isdigit() and len(key) <= 10 else -1
        if not 0 <= token < vocab:
            message = f"'logit_bias' keys must be token ids in [0, {vocab}), got {key[:20]!r}"
            raise ApiError(400, message, param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
            message = f"'logit_bias' values must be numbers in [-100, 100], got {str(value)[:20]!r} for {key}"
            raise ApiError(400, message, param="logit_bias")
        pairs.append((token, float(value)))
    return tuple(pairs)


def _sampling(
    body: dict, longest: int, spec: FunctionSpec, default_max: int, vocab: int, **rest: Any
) -> SamplingParams:
    """The SamplingParams of `body`; `rest` are the fields decided elsewhere (n, logprobs, prompt_logprobs)."""
    max_tokens = _max_tokens(body, longest, spec, default_max)
    temperature = _number_in(body, "temperature", 0, 2, 1.0)
    if temperature < MIN_TEMPERATURE:  # dividing logits by ~0 overflows: such a temperature means greedy
        temperature = 0.0
    top_p = float(_get(body, "top_p", (int, float), 1.0, "a number in (0, 1]"))
    if not 0 < top_p <= 1:
        raise ApiError(400, f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    # A fixed seed makes a re-executed invocation (after a worker died) regenerate the same tokens.
    seed = _get(body, "seed", (int,), None, "an integer")
    seed = random.getrandbits(31) if seed is None else seed
    if not 0 <= seed < 2**63:
        raise ApiError(400, f"'seed' must be in [0, 2**63), got {seed}", param="seed")
    repetition_penalty = float(_get(body, "repetition_penalty", (int, float), 1.0, "a number > 0"))
    if not repetition_penalty > 0:
        message = f"'repetition_penalty' must be > 0, got {repetition_penalty}"
        raise ApiError(400, message, param="repetition_penalty")
    stop, stop_ids = _stops(body, vocab)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=_int_in(body, "top_k", 0, vocab, 0),
        seed=seed,
        stop_token_ids=stop_ids,
        stop=stop,
        ignore_eos=_get(body, "ignore_eos", (bool,), False, "a boolean"),
        presence_penalty=_number_in(body, "presence_penalty", -2, 2, 0.0),
        frequency_penalty=_number_in(body, "frequency_penalty", -2, 2, 0.0),
        repetition_penalty=repetition_penalty,
        logit_bias=_logit_bias(body, vocab),
        min_tokens=_int_in(body, "min_tokens", 0, max_tokens, 0),
        **rest,
    )


# Every request field is honoured or refused by name, never silently ignored. These are honoured:
_COMMON = {
    "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
    "stop_token_ids", "ignore_eos", "stream", "stream_options", "n", "best_of", "logprobs", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens", "user",
}  # fmt: skip
_HONOURED = {
    False: _COMMON | {"prompt", "echo", "response_format"},
    True: _COMMON | {"messages", "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls"},
}
# OpenAI fields not implemented: accepted only at the value that changes nothing, otherwise a 400 names them.
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "suffix": (None, ""),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
}


def check_fields(body: dict, chat: bool) -> None:
    """400 naming the first field that is unknown, or known but not supported at the value sent."""
    for name in body:
        if name in _HONOURED[chat]:
            continue
        if name not in _NEUTRAL:
            endpoint = "/v1/chat/completions" if chat else "/v1/completions"
            raise ApiError(400, f"unknown field '{str(name)[:64]}' for {endpoint}", param=str(name)[:64])
        if body[name] not in _NEUTRAL[name]:
            message = f"'{name}' is not supported by WarmServe yet (only its default value is accepted)"
            raise ApiError(400, message, param=name)
    _get(body, "user", (str,), "", "a string")  # an end-user id for abuse tracking: WarmServe keeps none


def _stream_flags(body: dict) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous_usage_stats): usage in a last chunk, and (vLLM's) in every chunk."""
    stream = _get(body, "stream", (bool,), False, "a boolean")
    opts = _get(body, "stream_options", (dict,), {}, "an object")
    unknown = sorted(str(k)[:32] for k in opts if k not in STREAM_OPTIONS)
    if unknown:
        raise ApiError(400, f"'stream_options.{unknown[0]}' is not supported", param="stream_options")
    flags = []
    for name in STREAM_OPTIONS:
        value = opts.get(name, False)
        if not isinstance(value, bool | None):
            raise ApiError(400, f"'stream_options.{name}' must be a boolean", param="stream_options")
        flags.append(bool(value))
    return stream, *flags


def _parsed(body: dict, prompts: tuple[Prompt, ...], spec: FunctionSpec, vocab: int, chat: bool, echo: bool) -> Parsed:
    stream, include_usage, continuous_usage = _stream_flags(body)
    n, best_of = _choices(body, stream)
    k = _logprobs(body, chat)
    # best_of ranks sequences by cumulative log-probability: the engine must compute log-probabilities for it
    engine_k = 0 if k is None and best_of > n else k
    longest = max(len(p.ids) for p in prompts)
    default_max = 256 if chat else 16
    extra = {"n": best_of, "logprobs": engine_k, "prompt_logprobs": k if echo else None}
    sampling = _sampling(body, longest, spec, default_max, vocab, **extra)
    return Parsed(prompts, sampling, stream, include_usage, n, k, continuous_usage=continuous_usage)


def _check_ids(ids: list, vocab: int, param: str) -> tuple[int, ...]:
    if not ids:
        raise ApiError(400, f"'{param}' is empty", param=param)
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
        raise ApiError(400, f"'{param}' token ids must be integers in [0, {vocab})", param=param)
    return tuple(ids)


def _is_ids(value: object) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _prompts(value: object, tok: Tokenizer, echo: bool) -> tuple[Prompt, ...]:
    """A completions `prompt`: a string, a list of token ids, or a list of either (one invocation each)."""
    if isinstance(value, str) or _is_ids(value):
        items = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) or _is_ids(p) for p in value):
        items = value
    else:
        message = "'prompt' is required: a string, a list of token ids, or a list of either"
        raise ApiError(400, message, param="prompt")
    if len(items) > MAX_PROMPTS:
        raise ApiError(400, f"'prompt' takes at most {MAX_PROMPTS} prompts, got {len(items)}", param="prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise ApiError(400, "'prompt' is empty", param="prompt")
            prompts.append(Prompt(tuple(tok.encode(item)), item if echo else ""))
        else:
            ids = _check_ids(item, tok.vocab_size, "prompt")
            prompts.append(Prompt(ids, tok.decode(list(ids), skip_special_tokens=True) if echo else ""))
    return tuple(prompts)


def parse_completion(body: dict, spec: FunctionSpec, tok: Tokenizer) -> Parsed:
    check_fields(body, chat=False)
    echo = _get(body, "echo", (bool,), False, "a boolean")
    prompts = _prompts(body.get("prompt"), tok, echo)
    parsed = _parsed(body, prompts, spec, tok.vocab_size, chat=False, echo=echo)
    return replace(parsed, sampling=replace(parsed.sampling, structured=parse_response_format(body)))


# A message's fields; any other is refused by name (never silently dropped).
MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})


def parse_chat(body: dict, spec: FunctionSpec, tok: Tokenizer) -> Parsed:
    check_fields(body, chat=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required: a non-empty list of {role, content}", param="messages")
    tools = parse_tools(body, tok.chat_template)
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in (
            "system",
            "user",
            "assistant",
            "developer",
            "tool",
        ):
            raise ApiError(400, f"messages[{i}] needs a role of system, user, assistant or tool", param="messages")
        unknown = sorted(str(k) for k in m if k not in MESSAGE_FIELDS)
        if unknown:
            raise ApiError(400, f"messages[{i}] has an unknown field '{unknown[0][:64]}'", param="messages")
        if not isinstance(m.get("name", ""), str):
            raise ApiError(400, f"messages[{i}].name must be a string", param="messages")
        content = m.get("content")
        if content is None and m.get("tool_calls"):  # an assistant turn that only called tools
            content = ""
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
        clean[-1].update(message_fields(m, i))  # an assistant's tool_calls, a tool result's tool_call_id
        if m.get("name"):  # the participant's name goes to the template, as OpenAI's and vLLM's do
            clean[-1]["name"] = m["name"]
    try:
        text = tok.apply_chat_template(clean, add_generation_prompt=True, tools=None if tools is None else tools.tools)
    except Exception as exc:  # a template may reject a conversation (e.g. roles out of order)
        raise ApiError(400, f"the model's chat template rejected the messages: {exc}", param="messages") from None
    ids = tuple(tok.encode(text, add_special_tokens=False))
    parsed = _parsed(body, (Prompt(ids),), spec, tok.vocab_size, chat=True, echo=False)
    structured = output_grammar(body, tools)
    return replace(parsed, sampling=replace(parsed.sampling, structured=structured), tools=tools)
