"""At-least-once delivery: a worker SIGKILLed mid-answer; the client still gets exactly one complete answer."""

from __future__ import annotations

import os
import signal
import time

import httpx
import orjson
import redis
from conftest import start_stack, wait_for

from invoker import keys

FN = "redeliver"
MAX_TOKENS = 400


def stream_tokens(url: str, body: dict, on_first=None) -> tuple[str, list[str], int]:
    text, reasons, chunks = [], [], 0
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                chunks += 1000
                continue
            chunk = orjson.loads(line[6:])
            assert "error" not in chunk, chunk
            choice = chunk["choices"][0]
            text.append(choice["text"])
            if choice["finish_reason"]:
                reasons.append(choice["finish_reason"])
            chunks += 1
            if chunks == 3 and on_first is not None:
                on_first()
    return "".join(text), reasons, chunks // 1000


def test_sigkilled_worker_answer_is_redelivered_once(redis_url, slow_model, tmp_path):
    url = redis_url.rsplit("/", 1)[0] + "/3"
    r = redis.Redis.from_url(url)
    r.flushdb()
    stack = start_stack(url, tmp_path, workers=2)
    try:
        spec = {
            "name": FN,
            "model": str(slow_model),
            "max_model_len": 512,
            "scaling": {"min_instances": 2, "max_instances": 2},
        }
        assert httpx.post(f"{stack.url}/functions", json=spec).status_code == 201
        body = {
            "model": FN,
            "prompt": "Hello",
            "max_tokens": MAX_TOKENS,
            "temperature": 0.8,
            "seed": 11,
            "ignore_eos": True,
        }
        baseline, reasons, dones = stream_tokens(stack.url, body)  # also routes the function to both workers
        assert reasons == ["length"] and dones == 1

        def both_hot():
            st = httpx.get(f"{stack.url}/status").json()
            return all(w["models"].get(FN) in ("WARM", "HOT") for w in st["workers"]) and len(st["workers"]) == 2

        wait_for(both_hot, 60, "both workers hosting the function")
        killed = []

        def kill_the_one_answering():
            pending = r.xpending(keys.invocations(FN), keys.GROUP)
            (owner,) = [c["name"].decode() for c in pending["consumers"] if c["pending"]]
            os.kill(stack.workers[owner].pid, signal.SIGKILL)
            killed.append((owner, time.monotonic()))

        text, reasons, dones = stream_tokens(stack.url, body, on_first=kill_the_one_answering)
        assert killed, "the worker was not killed mid-answer"
        assert stack.workers[killed[0][0]].wait(5) == -signal.SIGKILL
        assert reasons == ["length"] and dones == 1
        assert text == baseline  # every token exactly once, none lost, none repeated
        (survivor,) = set(stack.workers) - {killed[0][0]}
        assert "re-delivering" in (tmp_path / f"{survivor}.log").read_text()  # it really was answered twice
        assert r.xlen(keys.invocations(FN)) == 0
        assert r.xpending(keys.invocations(FN), keys.GROUP)["pending"] == 0
    finally:
        stack.stop()


def test_sigkilled_worker_non_streamed_answer_is_replaced_whole(redis_url, slow_model, tmp_path):
    import threading

    url = redis_url.rsplit("/", 1)[0] + "/6"
    r = redis.Redis.from_url(url)
    r.flushdb()
    stack = start_stack(url, tmp_path, workers=2)
    try:
        spec = {
            "name": FN,
            "model": str(slow_model),
            "max_model_len": 512,
            "scaling": {"min_instances": 2, "max_instances": 2},
        }
        assert httpx.post(f"{stack.url}/functions", json=spec).status_code == 201
        body = {"model": FN, "prompt": "Hello", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        baseline = httpx.post(f"{stack.url}/v1/completions", json=body, timeout=120).json()
        wait_for(
            lambda: (
                len(
                    [
                        w
                        for w in httpx.get(f"{stack.url}/status").json()["workers"]
                        if w["models"].get(FN) in ("WARM", "HOT")
                    ]
                )
                == 2
            ),
            60,
            "both workers hosting",
        )
        result = {}
        t = threading.Thread(
            target=lambda: result.update(httpx.post(f"{stack.url}/v1/completions", json=body, timeout=120).json())
        )
        t.start()
        owner = None

        def claimed():
            nonlocal owner
            pending = r.xpending(keys.invocations(FN), keys.GROUP)
            owners = [c["name"].decode() for c in pending["consumers"] if c["pending"]]
            owner = owners[0] if owners else None
            return owner is not None

        wait_for(claimed, 30, "a worker to claim the request")
        time.sleep(0.2)  # let it generate part of the answer
        os.kill(stack.workers[owner].pid, signal.SIGKILL)
        t.join(120)
        assert result["choices"][0]["text"] == baseline["choices"][0]["text"]
        assert result["usage"]["completion_tokens"] == MAX_TOKENS
        (survivor,) = set(stack.workers) - {owner}
        assert "re-delivering" in (tmp_path / f"{survivor}.log").read_text()
    finally:
        stack.stop()
