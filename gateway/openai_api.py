"""The OpenAI request/response shapes: parse and check a body, format answers and stream chunks.

Everything a client can get wrong is checked here, before an invocation is queued, and reported with the name of
the offending parameter.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

from functions.spec import FunctionSpec
from gateway.errors import ApiError
from gpu_runtime.tokenizer import Tokenizer
from protocol.messages import SamplingParams

MAX_STOP_STRINGS = 4
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class Parsed:
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    stream: bool
    include_usage: bool


def _get(body: dict, name: str, kinds: tuple[type, ...], default: Any, what: str) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        raise ApiError(400, f"'{name}' must be {what}, got {value!r}", param=name)
    if not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {what}, got {value!r}", param=name)
    return value


def _sampling(body: dict, prompt_len: int, spec: FunctionSpec, default_max: int, vocab: int) -> SamplingParams:
    room = spec.max_model_len - prompt_len
    if room <= 0:
        raise ApiError(
            400,
            f"the prompt is {prompt_len} tokens; function '{spec.name}' allows {spec.max_model_len} "
            "tokens in total (max_model_len), leaving no room to generate",
            param="prompt",
            code="context_length_exceeded",
        )
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(default_max, room)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"'max_tokens' must be a positive integer, got {max_tokens!r}", param="max_tokens")
    if prompt_len + max_tokens > spec.max_model_len:
        raise ApiError(
            400,
            f"this model's maximum context length is {spec.max_model_len} tokens; the prompt is {prompt_len} "
            f"tokens and max_tokens is {max_tokens}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    temperature = float(_get(body, "temperature", (int, float), 1.0, "a number in [0, 2]"))
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"'temperature' must be in [0, 2], got {temperature}", param="temperature")
    if temperature < MIN_TEMPERATURE:  # dividing logits by ~0 overflows: such a temperature means greedy
        temperature = 0.0
    top_p = float(_get(body, "top_p", (int, float), 1.0, "a number in (0, 1]"))
    if not 0 < top_p <= 1:
        raise ApiError(400, f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    top_k = _get(body, "top_k", (int,), 0, "a non-negative integer")
    if not 0 <= top_k <= vocab:
        raise ApiError(400, f"'top_k' must be in [0, {vocab}], got {top_k}", param="top_k")
    if _get(body, "n", (int,), 1, "1") != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    # A fixed seed makes a re-executed invocation (after a worker died) regenerate the same tokens.
    seed = _get(body, "seed", (int,), None, "an integer")
    seed = random.getrandbits(31) if seed is None else seed
    if not 0 <= seed < 2**63:
        raise ApiError(400, f"'seed' must be in [0, 2**63), got {seed}", param="seed")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings", param="stop")
    stop_ids = _get(body, "stop_token_ids", (list,), [], "a list of token ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in stop_ids):
        raise ApiError(400, f"'stop_token_ids' must be token ids in [0, {vocab})", param="stop_token_ids")
    ignore_eos = _get(body, "ignore_eos", (bool,), False, "a boolean")
    return SamplingParams(max_tokens, temperature, top_p, top_k, seed, tuple(stop_ids), tuple(stops), ignore_eos)


# Every request field is honoured or refused by name, never silently ignored. These are honoured:
_COMMON = {
    "model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
    "stream", "stream_options", "n", "user", "max_completion_tokens",
}  # fmt: skip
_HONOURED = {False: _COMMON | {"prompt"}, True: _COMMON | {"messages"}}
# OpenAI fields not implemented yet: accepted only at the value that changes nothing, otherwise a 400 names them.
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "min_tokens": (None, 0),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
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


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _get(body, "stream", (bool,), False, "a boolean")
    opts = _get(body, "stream_options", (dict,), {}, "an object")
    return stream, bool(opts.get("include_usage", False))


def _check_ids(ids: list, vocab: int, param: str) -> tuple[int, ...]:
    if not ids:
        raise ApiError(400, f"'{param}' is empty", param=param)
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
        raise ApiError(400, f"'{param}' token ids must be integers in [0, {vocab})", param=param)
    return tuple(ids)


def parse_completion(body: dict, spec: FunctionSpec, tok: Tokenizer) -> Parsed:
    check_fields(body, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "'prompt' is empty", param="prompt")
        ids = tuple(tok.encode(prompt))
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        ids = _check_ids(prompt, tok.vocab_size, "prompt")
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(400, "'prompt' with several prompts is not supported: send one request each", param="prompt")
    else:
        raise ApiError(400, "'prompt' is required: a string or a list of token ids", param="prompt")
    stream, usage = _stream_flags(body)
    return Parsed(ids, _sampling(body, len(ids), spec, 16, tok.vocab_size), stream, usage)


def parse_chat(body: dict, spec: FunctionSpec, tok: Tokenizer) -> Parsed:
    check_fields(body, chat=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required: a non-empty list of {role, content}", param="messages")
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
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    try:
        text = tok.apply_chat_template(clean, add_generation_prompt=True)
    except Exception as exc:  # a template may reject a conversation (e.g. roles out of order)
        raise ApiError(400, f"the model's chat template rejected the messages: {exc}", param="messages") from None
    ids = tuple(tok.encode(text, add_special_tokens=False))
    stream, usage = _stream_flags(body)
    return Parsed(ids, _sampling(body, len(ids), spec, 256, tok.vocab_size), stream, usage)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(rid: str, model: str, text: str, reason: str, prompt_n: int, gen_n: int, chat: bool) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(prompt_n, gen_n),
    }


def chunk_body(rid: str, model: str, text: str | None, reason: str | None, chat: bool, first: bool = False) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
