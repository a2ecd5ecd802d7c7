"""The gateway's OpenAI shapes without a worker: request fields into SamplingParams (or a 400 naming the field),
answers built from synthetic answer events (logprobs, echo, n, best_of, several prompts, streamed chunks), and
the answer reader's per-sequence bookkeeping against a real Redis."""

from __future__ import annotations

import asyncio
import math

import pytest
import redis.asyncio as aredis

from functions.spec import FunctionSpec
from gateway.answers import Assembly, merged, piece
from gateway.errors import ApiError
from gateway.openai_api import parse_chat, parse_completion
from gpu_runtime.tokenizer import Tokenizer
from invoker.fanout import AnswerReader
from invoker.submit import Accepted, InvokerClient
from protocol import keys
from protocol.messages import (
    Done,
    Failed,
    FinishReason,
    Invocation,
    Restart,
    SamplingParams,
    Start,
    Token,
    encode_events,
)
from protocol.settings import DEFAULTS

STOP, LENGTH = FinishReason.STOP, FinishReason.LENGTH


@pytest.fixture(scope="module")
def tok(tiny_model) -> Tokenizer:
    return Tokenizer.from_pretrained(str(tiny_model))


@pytest.fixture(scope="module")
def spec(tiny_model) -> FunctionSpec:
    return FunctionSpec(name="fmt", model=str(tiny_model), max_model_len=64)


def completion(spec, tok, **body):
    return parse_completion({"model": "fmt", "prompt": "Hello world", **body}, spec, tok)


def chat(spec, tok, **body):
    return parse_chat({"model": "fmt", "messages": [{"role": "user", "content": "Hi"}], **body}, spec, tok)


# ---- parsing ----
def test_every_sampling_field_reaches_the_engine(spec, tok):
    parsed = completion(
        spec, tok, max_tokens=9, n=2, best_of=3, logprobs=4, echo=True, presence_penalty=0.5,
        frequency_penalty=-1, repetition_penalty=1.3, logit_bias={"5": 10, "7": -100}, min_tokens=3,
        stop=["a", "b", "c", "d", "e"], seed=11, user="someone",
    )  # fmt: skip
    s = parsed.sampling
    assert (s.max_tokens, s.n, s.logprobs, s.prompt_logprobs, s.seed) == (9, 3, 4, 4, 11)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -1.0, 1.3)
    assert s.logit_bias == ((5, 10.0), (7, -100.0)) and s.min_tokens == 3 and len(s.stop) == 5
    assert parsed.n == 2 and parsed.logprobs == 4
    assert parsed.prompts[0].echo == "Hello world"
    assert parsed.budget == len(parsed.prompts[0].ids) + 9 * 3


def test_defaults_change_nothing(spec, tok):
    s = completion(spec, tok).sampling
    assert (s.n, s.logprobs, s.prompt_logprobs, s.logit_bias, s.min_tokens) == (1, None, None, (), 0)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.0, 0.0, 1.0)


def test_stream_options(spec, tok):
    plain = completion(spec, tok, stream=True)
    assert not plain.include_usage and not plain.continuous_usage
    every = completion(spec, tok, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert every.include_usage and every.continuous_usage


def test_best_of_asks_the_engine_for_log_probabilities(spec, tok):
    """best_of ranks by cumulative log-probability, so the engine computes them even when the client wants none."""
    parsed = completion(spec, tok, n=1, best_of=2)
    assert parsed.sampling.logprobs == 0 and parsed.logprobs is None


def test_chat_logprobs_and_top_logprobs(spec, tok):
    assert chat(spec, tok).logprobs is None
    assert chat(spec, tok, logprobs=True).logprobs == 0
    parsed = chat(spec, tok, logprobs=True, top_logprobs=5, max_completion_tokens=7)
    assert parsed.logprobs == 5 and parsed.sampling.logprobs == 5 and parsed.sampling.max_tokens == 7
    assert chat(spec, tok, logprobs=False, top_logprobs=0).logprobs is None


def test_a_list_of_prompts(spec, tok):
    parsed = completion(spec, tok, prompt=["Hello", [5, 6, 7], "world"], echo=True)
    assert [p.ids for p in parsed.prompts][1] == (5, 6, 7)
    assert parsed.prompts[0].echo == "Hello" and parsed.prompts[1].echo == tok.decode([5, 6, 7], True)
    one = completion(spec, tok, prompt=[[5, 6, 7]])
    assert len(one.prompts) == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"n": 2, "best_of": 1}, "best_of"),
        ({"best_of": 2, "stream": True}, "best_of"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"echo": "yes"}, "echo"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"100000": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"5": True}}, "logit_bias"),
        ({"logit_bias": [1]}, "logit_bias"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"suffix": "tail"}, "suffix"),
        ({"user": 3}, "user"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options"),
        ({"stream_options": {"continuous": True}}, "stream_options"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"prompt": ["a", ""]}, "prompt"),
        ({"prompt": ["a", 5]}, "prompt"),
        ({"prompt": [[1], [10**9]]}, "prompt"),
        ({"prompt": ["a"] * 65}, "prompt"),
        ({"prompt": ["short", "word " * 80]}, "prompt"),
    ],
)
def test_bad_completion_fields_name_themselves(spec, tok, body, param):
    with pytest.raises(ApiError) as err:
        completion(spec, tok, **body)
    assert err.value.status == 400 and err.value.param == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": 3}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"n": 99}, "n"),
    ],
)
def test_bad_chat_fields_name_themselves(spec, tok, body, param):
    with pytest.raises(ApiError) as err:
        chat(spec, tok, **body)
    assert err.value.status == 400 and err.value.param == param


# ---- token strings ----
def test_token_pieces_show_partial_characters_as_bytes(tok):
    ids = tok.encode("é")
    pieces = [piece(tok, i) for i in ids]
    assert b"".join(raw for _, raw in pieces) == "é".encode()
    assert all(text.startswith("bytes:\\x") for text, _ in pieces)
    assert piece(tok, tok.encode("Hello")[0])[0] == tok.decode([tok.encode("Hello")[0]])


# ---- answers from synthetic events ----
def feed(assembly: Assembly, events: list[tuple[int, object]]) -> list[dict]:
    return [choice for i, ev in events for choice in assembly.add(i, ev)]


def test_completion_logprobs_with_echo(spec, tok):
    parsed = completion(spec, tok, prompt=[5, 6, 7], logprobs=1, echo=True, max_tokens=2)
    a = Assembly("cmpl-1", "fmt", parsed, tok, chat=False)
    prompt_lps = ((None, ()), (-1.5, ((9, -0.5),)), (-0.25, ((7, -0.25),)))
    feed(a, [(0, Start("w", 3, prompt_lps)), (0, Token(0, 8, "x", 0, -0.1, ((8, -0.1),)))])
    feed(a, [(0, Token(1, 9, "y", 0, -2.0, ((4, -0.3),))), (0, Done(LENGTH, 2, 0, -2.1))])
    body = a.body()
    choice = body["choices"][0]
    echo = tok.decode([5, 6, 7], True)
    assert choice["text"] == echo + "xy" and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == [piece(tok, t)[0] for t in (5, 6, 7, 8, 9)]
    assert lp["token_logprobs"] == [None, -1.5, -0.25, -0.1, -2.0]
    assert lp["top_logprobs"][0] is None
    assert lp["top_logprobs"][1] == {piece(tok, 9)[0]: -0.5, piece(tok, 6)[0]: -1.5}  # the token itself too
    assert lp["top_logprobs"][4] == {piece(tok, 4)[0]: -0.3, piece(tok, 9)[0]: -2.0}
    assert lp["text_offset"][3] == len(echo)
    assert lp["text_offset"][:3] == [0, len(piece(tok, 5)[0]), len(piece(tok, 5)[0]) + len(piece(tok, 6)[0])]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_chat_logprobs_shape(spec, tok):
    a = Assembly("c", "fmt", chat(spec, tok, logprobs=True, top_logprobs=2), tok, chat=True)
    feed(a, [(0, Start("w", 4)), (0, Token(0, 8, "x", 0, -0.1, ((8, -0.1), (3, -2.5)))), (0, Done(STOP, 1))])
    choice = a.body()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "x"}
    entry = choice["logprobs"]["content"][0]
    text, raw = piece(tok, 8)
    assert entry["token"] == text and entry["logprob"] == -0.1 and entry["bytes"] == list(raw)
    assert [t["logprob"] for t in entry["top_logprobs"]] == [-0.1, -2.5]
    assert set(entry["top_logprobs"][1]) == {"token", "logprob", "bytes"}


def test_held_back_text_carries_no_logprob(spec, tok):
    a = Assembly("c", "fmt", completion(spec, tok, logprobs=0), tok, chat=False)
    feed(a, [(0, Start("w", 2)), (0, Token(0, 8, "", 0, -0.1, ())), (0, Token(1, -1, "tail")), (0, Done(STOP, 1))])
    choice = a.body()["choices"][0]
    assert choice["text"] == "tail" and choice["logprobs"]["token_logprobs"] == [-0.1]


def test_n_choices_and_best_of_ranking(spec, tok):
    parsed = completion(spec, tok, prompt=["a", "b"], n=2, best_of=3)
    a = Assembly("c", "fmt", parsed, tok, chat=False)
    for p in range(2):
        events = [Start("w", 1)]
        for j, score in enumerate((-3.0, -1.0, -2.0)):
            events += [Token(0, 8, f"p{p}s{j}", j, score), Done(STOP, 1, j, score)]
        feed(a, [(p, ev) for ev in events])
    body = a.body()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == ["p0s1", "p0s2", "p1s1", "p1s2"]  # best first
    assert all(c["logprobs"] is None for c in body["choices"])  # asked for none
    assert body["usage"]["completion_tokens"] == 6  # every generated sequence costs


def test_a_restart_replaces_the_partial_answer(spec, tok):
    a = Assembly("c", "fmt", completion(spec, tok), tok, chat=False)
    feed(a, [(0, Start("w1", 2)), (0, Token(0, 8, "old")), (0, Restart("w2")), (0, Start("w2", 2))])
    feed(a, [(0, Token(0, 8, "new")), (0, Done(STOP, 1))])
    assert a.body()["choices"][0]["text"] == "new"


def test_streamed_n_interleaves_choices_with_their_index(spec, tok):
    parsed = completion(spec, tok, n=2, logprobs=0, echo=True, stream=True)
    a = Assembly("c", "fmt", parsed, tok, chat=False)
    events = [Start("w", 2), Token(0, 8, "a", 0, -1.0), Token(0, 9, "b", 1, -2.0), Token(1, 8, "c", 1, -3.0)]
    events += [Done(STOP, 2, 1), Token(1, 9, "d", 0, -4.0), Done(LENGTH, 2, 0)]
    chunks = feed(a, [(0, ev) for ev in events])
    assert [(c["index"], c["text"], c["finish_reason"]) for c in chunks] == [
        (0, "Hello world", None), (1, "Hello world", None), (0, "a", None), (1, "b", None), (1, "c", None),
        (1, "", "stop"), (0, "d", None), (0, "", "length"),
    ]  # fmt: skip
    second = chunks[6]["logprobs"]  # its offset follows the echo and the first token
    assert second["text_offset"] == [len("Hello world") + len(piece(tok, 8)[0])]
    assert second["token_logprobs"] == [-4.0]


def test_streamed_chat_opens_every_choice_with_its_role(spec, tok):
    parsed = chat(spec, tok, n=2, stream=True)
    a = Assembly("c", "fmt", parsed, tok, chat=True)
    chunks = feed(a, [(0, Start("w", 3)), (0, Token(0, 8, "x", 1)), (0, Token(0, 8, "", 0))])
    assert [(c["index"], c["delta"]) for c in chunks] == [
        (0, {"role": "assistant", "content": ""}),
        (1, {"role": "assistant", "content": ""}),
        (1, {"content": "x"}),
    ]  # a token without text and without logprobs sends nothing
    assert a.chunk([], a.usage())["usage"]["prompt_tokens"] == len(parsed.prompts[0].ids)


def test_a_failed_prompt_is_not_running(spec, tok):
    a = Assembly("c", "fmt", completion(spec, tok, prompt=["a", "b"]), tok, chat=False)
    feed(a, [(0, Failed(500, "boom")), (1, Start("w", 1))])
    assert [p.running() for p in a.answers] == [False, True]


# ---- reading answers: several streams, several sequences ----
def test_merged_keeps_each_streams_order():
    async def gen(tag: str, n: int):
        for k in range(n):
            await asyncio.sleep(0)
            yield f"{tag}{k}"

    async def run() -> list:
        return [item async for item in merged([gen("a", 3), gen("b", 2)])]

    got = asyncio.run(run())
    assert [ev for i, ev in got if i == 0] == ["a0", "a1", "a2"] and [ev for i, ev in got if i == 1] == ["b0", "b1"]


def read_events(redis_url: str, inv: Invocation, entries: list[list], restartable: bool = False) -> list:
    async def run() -> list:
        r = aredis.Redis.from_url(redis_url)
        for events in entries:
            await r.xadd(keys.response(inv.request_id), encode_events(events))
        client = InvokerClient(r, None, DEFAULTS, AnswerReader(aredis.Redis.from_url(redis_url), r))
        spec = FunctionSpec(name=inv.function, model="/nowhere")
        answer = client.events(spec, inv.request_id, 10, restartable=restartable, accepted=Accepted(inv, b"0-1"))
        return [ev async for ev in answer]

    return asyncio.run(run())


def test_events_end_when_every_sequence_is_done(redis_url, r):
    inv = Invocation("seq-2", "f", (1, 2), SamplingParams(n=2, seed=1))
    replayed = [Start("w2", 2), Token(0, 5, "a", 0), Token(0, 5, "c", 1)]  # a re-delivery repeats positions
    got = read_events(
        redis_url,
        inv,
        [
            [Start("w1", 2), Token(0, 5, "a", 0), Token(0, 6, "c", 1)],
            [Token(1, 7, "b", 0), Done(STOP, 2, 0), *replayed, Done(STOP, 2, 0)],
            [Token(1, 8, "d", 1), Done(LENGTH, 2, 1), Token(2, 9, "late", 1)],
        ],
    )
    tokens = [(ev.index, ev.pos, ev.text) for ev in got if isinstance(ev, Token)]
    assert tokens == [(0, 0, "a"), (1, 0, "c"), (0, 1, "b"), (1, 1, "d")]
    assert [ev.index for ev in got if isinstance(ev, Done)] == [0, 1] and isinstance(got[-1], Done)


def test_a_restart_resets_every_sequence(redis_url, r):
    inv = Invocation("seq-3", "f", (1,), SamplingParams(n=2, seed=1))
    got = read_events(
        redis_url,
        inv,
        [
            [Start("w1", 1), Token(0, 5, "a", 0), Done(STOP, 1, 0)],
            [Start("w2", 1), Token(0, 5, "a", 0), Token(0, 6, "b", 1), Done(STOP, 1, 0), Done(STOP, 1, 1)],
        ],
        restartable=True,
    )
    after = got[[isinstance(ev, Restart) for ev in got].index(True) :]
    assert [type(ev).__name__ for ev in after] == ["Restart", "Start", "Token", "Token", "Done", "Done"]


def test_sampling_contract_is_what_the_gateway_builds(spec, tok):
    """Parsed sampling survives the trip through an invocation's stream entry."""
    s = completion(spec, tok, n=2, logprobs=3, echo=True, logit_bias={"5": 1.5}).sampling
    inv = Invocation("x", "fmt", (1, 2), s)
    back = Invocation.from_fields({k.encode(): v for k, v in inv.to_fields().items()})
    assert back.sampling == s and math.isclose(back.sampling.logit_bias[0][1], 1.5)


def test_a_sequence_missing_positions_is_run_again(redis_url, r):
    """Sequence 1 lost position 0 (a Redis restart): its Done brings the invocation back to its stream, and the
    re-run fills the gap; sequence 0, already whole, is not repeated."""
    inv = Invocation("seq-gap", "f", (1,), SamplingParams(n=2, seed=1))
    first = [Start("w1", 1), Token(0, 5, "a", 0), Done(STOP, 1, 0), Token(1, 7, "d", 1), Done(STOP, 2, 1)]
    rerun = [Start("w2", 1), Token(0, 5, "a", 0), Token(0, 6, "c", 1), Done(STOP, 1, 0), Token(1, 7, "d", 1)]

    async def run() -> list:
        ar = aredis.Redis.from_url(redis_url)
        await ar.xadd(keys.response(inv.request_id), encode_events(first))
        client = InvokerClient(ar, None, DEFAULTS, AnswerReader(aredis.Redis.from_url(redis_url), ar))
        spec = FunctionSpec(name=inv.function, model="/nowhere")
        reading = asyncio.create_task(collect(client.events(spec, inv.request_id, 10, accepted=Accepted(inv, b"0-1"))))
        async with asyncio.timeout(10):
            while not await ar.xlen(keys.invocations(inv.function)):  # submitted again
                await asyncio.sleep(0.01)
        await ar.xadd(keys.response(inv.request_id), encode_events([*rerun, Done(STOP, 2, 1)]))
        return await reading

    got = asyncio.run(run())
    assert [(ev.index, ev.pos, ev.text) for ev in got if isinstance(ev, Token)] == [
        (0, 0, "a"),
        (1, 0, "c"),
        (1, 1, "d"),
    ]
    assert [ev.index for ev in got if isinstance(ev, Done)] == [0, 1]


async def collect(events) -> list:
    return [ev async for ev in events]
