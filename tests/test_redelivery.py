"""At-least-once delivery: a worker SIGKILLed mid-answer; the client still gets exactly one complete answer."""

from __future__ import annotations

import os
import signal
import threading

import httpx
import pytest
import redis
from conftest import SseAnswer, start_stack, wait_for

from protocol import keys
from protocol.messages import Token, decode_events

FN = "redeliver"
MAX_TOKENS = 400
# The non-streamed answer must still be generating when the test sees part of it: long enough to outlast the
# test's polling on a fast, idle machine (the gateway deletes the stream of a finished answer).
LONG_ANSWER = 1000


@pytest.fixture
def two_workers(redis_url, slow_model, tmp_path):
    """Two workers that both host FN (min_instances 2), on a database of their own."""
    url = redis_url.rsplit("/", 1)[0] + "/3"
    r = redis.Redis.from_url(url)
    r.flushdb()
    stack = start_stack(url, tmp_path, workers=2)
    scaling = {"min_instances": 2, "max_instances": 2}
    spec = {"name": FN, "model": str(slow_model), "max_model_len": 1024, "scaling": scaling}
    assert httpx.post(f"{stack.url}/functions", json=spec).status_code == 201
    yield stack, r
    stack.stop()


def wait_both_hosting(stack, r) -> None:
    """Both workers hold the model, and the baseline request is acknowledged (its answer reaches the client just
    before that), so the pending entry the test looks at next is the second request's."""

    def both():
        workers = httpx.get(f"{stack.url}/status").json()["workers"]
        return len(workers) == 2 and all(w["models"].get(FN) in ("WARM", "HOT") for w in workers)

    wait_for(both, 60, "both workers hosting the function")
    wait_for(lambda: r.xpending(keys.invocations(FN), keys.GROUP)["pending"] == 0, 20, "the baseline to be acked")


def answering_worker(r) -> str | None:
    pending = r.xpending(keys.invocations(FN), keys.GROUP)
    owners = [c["name"].decode() for c in pending["consumers"] if c["pending"]]
    return owners[0] if owners else None


def generated(r) -> int:
    """Token events written so far on the one answer stream in flight (an entry carries several)."""
    return sum(
        isinstance(ev, Token)
        for k in r.scan_iter(keys.response("*"))
        for _, f in r.xrange(k)
        for ev in decode_events(f)
    )


def check_redelivered(stack, r, killed: str) -> None:
    assert stack.workers[killed].wait(5) == -signal.SIGKILL
    (survivor,) = set(stack.workers) - {killed}
    (report,) = [w for w in httpx.get(f"{stack.url}/status").json()["workers"] if w["worker_id"] == survivor]
    assert report["counters"].get("redelivered") == 1  # it really was answered twice
    # the answer reaches the client just before its entry is acknowledged: await the queue, don't race it
    wait_for(lambda: r.xlen(keys.invocations(FN)) == 0, 20, "the queue to empty")
    assert r.xpending(keys.invocations(FN), keys.GROUP)["pending"] == 0


def stream_text(url: str, body: dict, after_chunks=None) -> tuple[str, list[str], int]:
    """Stream a completion; call `after_chunks()` once three chunks have arrived. Returns text, reasons, [DONE]s."""
    answer, chunks = SseAnswer(), 0
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            chunks += answer.feed(line)
            if chunks == 3 and after_chunks is not None:
                after_chunks()
                after_chunks = None
    return answer.text, answer.reasons, answer.dones


def test_sigkilled_worker_streamed_answer_is_redelivered_once(two_workers):
    stack, r = two_workers
    body = {
        "model": FN,
        "prompt": "Hello",
        "max_tokens": MAX_TOKENS,
        "temperature": 0.8,
        "seed": 11,
        "ignore_eos": True,
    }
    baseline, reasons, dones = stream_text(stack.url, body)  # also routes the function to both workers
    assert reasons == ["length"] and dones == 1
    wait_both_hosting(stack, r)
    killed = []

    def kill_the_one_answering():
        killed.append(answering_worker(r))
        os.kill(stack.workers[killed[0]].pid, signal.SIGKILL)

    text, reasons, dones = stream_text(stack.url, body, after_chunks=kill_the_one_answering)
    assert killed, "the worker was not killed mid-answer"
    assert reasons == ["length"] and dones == 1
    assert text == baseline  # every token exactly once, none lost, none repeated
    check_redelivered(stack, r, killed[0])


def test_sigkilled_worker_non_streamed_answer_is_replaced_whole(two_workers):
    stack, r = two_workers
    body = {"model": FN, "prompt": "Hello", "max_tokens": LONG_ANSWER, "temperature": 0, "ignore_eos": True}
    baseline = httpx.post(f"{stack.url}/v1/completions", json=body, timeout=120).json()
    wait_both_hosting(stack, r)
    result = {}
    t = threading.Thread(
        target=lambda: result.update(httpx.post(f"{stack.url}/v1/completions", json=body, timeout=120).json())
    )
    t.start()
    wait_for(lambda: answering_worker(r) is not None, 30, "a worker to claim the request")
    owner = answering_worker(r)
    wait_for(lambda: generated(r) >= 20, 30, "part of the answer")
    os.kill(stack.workers[owner].pid, signal.SIGKILL)
    t.join(120)
    assert result["choices"][0]["text"] == baseline["choices"][0]["text"]
    assert result["usage"]["completion_tokens"] == LONG_ANSWER
    check_redelivered(stack, r, owner)
