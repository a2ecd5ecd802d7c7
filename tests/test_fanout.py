"""One gateway process holds hundreds of streams on a handful of Redis connections, and re-submits a request whose
invocation vanished from Redis. Answers come from a fake worker (bench/fake_worker.py) that writes answer events
straight to Redis, so the gateway is what is under test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading

import httpx
import pytest
import redis
import redis.asyncio as aredis
from conftest import ROOT, SseAnswer, start_stack, wait_for

from functions.spec import FunctionSpec
from invoker.fanout import AnswerReader
from invoker.submit import Accepted, InvokerClient
from protocol import keys
from protocol.messages import Done, FinishReason, Invocation, SamplingParams, Start, Token, encode_events
from protocol.settings import DEFAULTS

sys.path.insert(0, str(ROOT))  # bench/ is not an installed package
from bench.fake_worker import FakeWorker, token_text  # noqa: E402

FAN, LOST = "fan", "lost"
STREAMS = 300  # before one reader per gateway, 118 of 300 got 500 "Too many connections"
TOKENS = 8


@contextlib.contextmanager
def environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def gateway(redis_url, tiny_model, tmp_path_factory):
    url = redis_url.rsplit("/", 1)[0] + "/6"
    redis.Redis.from_url(url).flushdb()
    with environ(WARMSERVE_REROUTE_AFTER_S="0.5"):  # the lost-invocation check runs after this much silence
        stack = start_stack(url, tmp_path_factory.mktemp("fanout-logs"), workers=0)
    for name in (FAN, LOST):
        spec = {"name": name, "model": str(tiny_model), "max_model_len": 128, "scaling": {"max_queue": 4096}}
        assert httpx.post(f"{stack.url}/functions", json=spec).status_code == 201
    worker = FakeWorker(url, [FAN, LOST], serving={FAN})  # LOST is read once its test has lost an entry
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    yield stack, worker, redis.Redis.from_url(url)
    stop.set()
    thread.join(10)
    stack.stop()


async def stream_one(client: httpx.AsyncClient, url: str) -> str:
    body = {"model": FAN, "prompt": [1, 2, 3], "max_tokens": TOKENS, "stream": True}
    answer = SseAnswer()
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            answer.feed(line)
    assert answer.dones == 1
    return answer.text


def test_hundreds_of_concurrent_streams_on_one_gateway(gateway):
    stack, worker, r = gateway
    worker.hold = STREAMS  # every request is accepted and waiting before the first answer event

    async def all_streams() -> list[str | BaseException]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            streams = (stream_one(client, stack.url) for _ in range(STREAMS))
            return await asyncio.gather(*streams, return_exceptions=True)

    results = asyncio.run(all_streams())
    expected = "".join(token_text(i) for i in range(TOKENS))
    assert [x for x in results if x != expected] == []
    # bounded by the gateway's pool for short commands (and this test's own), not by the waiting requests
    assert int(r.info("clients")["connected_clients"]) <= DEFAULTS.redis_connections + 8 < STREAMS


def test_an_invocation_lost_from_redis_is_submitted_again(gateway):
    stack, worker, r = gateway
    result = {}
    body = {"model": LOST, "prompt": [1, 2, 3], "max_tokens": TOKENS}
    client = threading.Thread(
        target=lambda: result.update(httpx.post(f"{stack.url}/v1/completions", json=body, timeout=60).json())
    )
    client.start()
    stream = keys.invocations(LOST)
    wait_for(lambda: r.xlen(stream) == 1, 20, "the invocation in its stream")
    (first_id, _), *_ = r.xrange(stream)
    r.xdel(stream, first_id)  # as if Redis had restarted without having persisted it
    wait_for(lambda: r.xlen(stream) == 1, 20, "the gateway to submit it again")
    worker.serving.add(LOST)
    client.join(60)
    assert result["choices"][0]["text"] == "".join(token_text(i) for i in range(TOKENS))
    assert list(worker.answered.values()).count(1) == len(worker.answered)  # each request answered once


def test_an_answer_missing_positions_is_run_again_to_fill_them(gateway):
    """Answer events lost in a Redis restart (position 1 here): the gateway submits the request again and takes
    the missing positions from the re-run, so the client still gets each position once."""
    stack, worker, r = gateway
    worker.serving.add(LOST)
    url = stack.redis_url
    spec = FunctionSpec.from_json(r.hget(keys.FUNCTIONS, LOST))
    inv = Invocation("gap-1", LOST, (1, 2, 3), SamplingParams(max_tokens=3, seed=1))
    broken = [Start("gone", 3), Token(0, 0, token_text(0)), Token(2, 2, token_text(2)), Done(FinishReason.LENGTH, 3)]
    for ev in broken:
        r.xadd(keys.response(inv.request_id), encode_events([ev]))

    async def read() -> list:
        ar = aredis.Redis.from_url(url)
        client = InvokerClient(ar, redis.Redis.from_url(url), DEFAULTS, AnswerReader(aredis.Redis.from_url(url), ar))
        return [ev async for ev in client.events(spec, inv.request_id, 30, accepted=Accepted(inv, b"0-1"))]

    got = asyncio.run(read())
    assert "".join(ev.text for ev in got if isinstance(ev, Token)) == "".join(token_text(i) for i in range(3))
    assert isinstance(got[-1], Done)
    # the fake worker counts an answer just after writing it: await the count, then check it is exactly one
    wait_for(lambda: inv.request_id in worker.answered, 10, "the re-run to be counted")
    assert worker.answered[inv.request_id] == 1
