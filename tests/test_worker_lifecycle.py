"""A worker stops generating for clients that went away, and leaves the cluster cleanly on SIGTERM."""

from __future__ import annotations

import signal
import time

import httpx
import pytest
import redis
from conftest import start_stack, wait_for

from protocol import keys

FN = "lifecycle"


@pytest.fixture
def stack(redis_url, slow_model, tmp_path):
    url = redis_url.rsplit("/", 1)[0] + "/4"
    redis.Redis.from_url(url).flushdb()
    s = start_stack(url, tmp_path, workers=1)
    spec = {"name": FN, "model": str(slow_model), "max_model_len": 1024}
    assert httpx.post(f"{s.url}/functions", json=spec).status_code == 201
    yield s
    s.stop()


def worker_report(stack) -> dict:
    (worker,) = httpx.get(f"{stack.url}/status").json()["workers"]
    return worker


def inflight(stack) -> int:
    return worker_report(stack)["inflight"].get(FN, 0)


def test_client_disconnect_cancels_generation(stack):
    body = {"model": FN, "prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "temperature": 0, "stream": True}
    t0 = time.monotonic()
    with httpx.stream("POST", f"{stack.url}/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        for n, _ in enumerate(resp.iter_lines()):
            if n == 6:
                break  # the client hangs up after a few tokens
    # a report published after the cancel: it counts it, and the request is no longer in flight
    wait_for(lambda: worker_report(stack)["counters"].get("cancelled") == 1, 20, "the worker to cancel the request")
    wait_for(lambda: inflight(stack) == 0, 20, "the worker to drop the cancelled request")
    r = redis.Redis.from_url(stack.redis_url)
    wait_for(lambda: r.xlen(keys.invocations(FN)) == 0, 20, "the entry to be acknowledged, not left for re-delivery")
    # the worker is free again: a fresh request is answered normally
    short = {**body, "stream": False, "max_tokens": 4}
    assert httpx.post(f"{stack.url}/v1/completions", json=short, timeout=60).json()["usage"]["completion_tokens"] == 4
    assert time.monotonic() - t0 < 60


def test_removing_a_function_mid_answer_ends_the_stream_with_an_error(stack):
    body = {"model": FN, "prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "temperature": 0, "stream": True}
    chunks = []
    with httpx.stream("POST", f"{stack.url}/v1/completions", json=body, timeout=60) as resp:
        for n, line in enumerate(resp.iter_lines()):
            if n == 4:
                assert httpx.delete(f"{stack.url}/functions/{FN}").status_code == 200
            if line.startswith("data: "):
                chunks.append(line)
    assert chunks[-1] == "data: [DONE]"
    assert "was removed while this request ran" in chunks[-2]
    wait_for(
        lambda: (
            FN not in httpx.get(f"{stack.url}/status").json()["workers"][0]["models"]
            or httpx.get(f"{stack.url}/status").json()["workers"][0]["models"][FN] == "COLD"
        ),
        20,
        "model retired",
    )


def test_sigterm_deregisters_the_worker(stack):
    r = redis.Redis.from_url(stack.redis_url)
    ((wid, proc),) = stack.workers.items()
    assert r.zscore(keys.WORKERS, wid) is not None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert r.zscore(keys.WORKERS, wid) is None and not r.exists(keys.worker(wid))
    resp = httpx.post(f"{stack.url}/v1/completions", json={"model": FN, "prompt": "hi"})
    assert resp.status_code == 503  # no live worker is left: the gateway says so instead of queueing forever
