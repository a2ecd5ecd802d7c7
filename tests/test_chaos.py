"""Chaos under load: a worker SIGKILLed, Redis SIGKILLed and restarted (append-only file, same port and directory)
while that worker restarts, the gateway SIGKILLed and restarted, the other worker SIGKILLed. Every request either
completes exactly once with the baseline's greedy text, or was refused before acceptance (503, connection refused)
or cut by the gateway's death (the client saw no answer): the client retries those, and they are counted apart.
Processes started before Redis wait for it (the last test)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import redis
from conftest import SseAnswer, free_port, start_stack, wait_for

from protocol import keys

FN = "chaos"
PROMPTS = ["Hello", "The quick brown fox", "Once upon a time"]
MAX_TOKENS = 24
CLIENTS = 6
STEP = 8  # answers completed between two faults


@dataclass
class RedisProc:
    """A redis-server with append-only persistence that can be SIGKILLed and started again on its data."""

    port: int
    data: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["--port", str(self.port), "--dir", str(self.data), "--save", "", "--appendonly", "yes"]
        self.proc = subprocess.Popen([shutil.which("redis-server"), *args, "--appendfsync", "everysec"],
                                     stdout=subprocess.DEVNULL)  # fmt: skip
        wait_for(lambda: redis.Redis.from_url(self.url).ping(), 10, "redis-server")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


class Refused(Exception):
    """Not accepted, or cut before any answer reached the client: retry."""


@dataclass
class Tally:
    baseline: dict[str, str]
    ok: int = 0
    retried: Counter = field(default_factory=Counter)  # why a request was sent again
    wrong: list[str] = field(default_factory=list)  # lost, duplicated, corrupted or failed answers
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, prompt: str, text: str, reasons: list, dones: int) -> None:
        with self.lock:
            if text == self.baseline[prompt] and reasons == ["length"] and dones <= 1:
                self.ok += 1
            else:
                self.wrong.append(f"{prompt!r}: {text!r} {reasons} dones={dones}")


def complete(url: str, prompt: str, stream: bool) -> tuple[str, list, int]:
    """One request: (text, finish reasons, [DONE]s); Refused when the client must retry."""
    body = {"model": FN, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    try:
        if not stream:
            resp = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            if resp.status_code == 503:
                raise Refused(f"503 {resp.json()['error']['code']}")
            assert resp.status_code == 200, resp.text
            choice = resp.json()["choices"][0]
            return choice["text"], [choice["finish_reason"]], 0
        answer = SseAnswer()
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as resp:
            if resp.status_code == 503:
                raise Refused(f"503 {orjson.loads(resp.read())['error']['code']}")
            assert resp.status_code == 200, resp.read()
            for line in resp.iter_lines():
                answer.feed(line)
        if answer.dones == 0:
            raise Refused("stream cut")  # the gateway died mid-answer: the client has no answer
        return answer.text, answer.reasons, answer.dones
    except httpx.TransportError as exc:
        raise Refused(type(exc).__name__) from None


def load(url: str, tally: Tally, stop: threading.Event, seed: int) -> None:
    n = seed
    while not stop.is_set():
        prompt, stream = PROMPTS[n % len(PROMPTS)], n % 2 == 0
        n += 1
        while not stop.is_set():
            try:
                tally.check(prompt, *complete(url, prompt, stream))
                break
            except Refused as why:
                with tally.lock:
                    tally.retried[str(why)] += 1
                stop.wait(0.2)
            except AssertionError as exc:  # a 500, an error event: a lost answer
                with tally.lock:
                    tally.wrong.append(str(exc))
                break


def pending_on(r: redis.Redis, worker: str) -> int:
    consumers = r.xpending(keys.invocations(FN), keys.GROUP)["consumers"]
    return sum(c["pending"] for c in consumers if c["name"].decode() == worker)


def spawn(log: Path, *args: str) -> subprocess.Popen:
    out = open(log, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "warmserve.cli", *args], stdout=out, stderr=subprocess.STDOUT)


def restart_gateway(stack) -> None:
    stack.gateway.kill()
    stack.gateway.wait(10)
    port = stack.url.rsplit(":", 1)[1]
    stack.gateway = spawn(stack.logs / "gateway-2.log", "gateway", "--redis", stack.redis_url, "--port", port)


def test_chaos_loses_duplicates_and_corrupts_nothing(tiny_model, tmp_path):
    rp = RedisProc(free_port(), tmp_path)
    rp.start()
    stack = start_stack(rp.url, tmp_path, workers=2)
    warmer = None
    try:
        spec = {"name": FN, "model": str(tiny_model), "max_model_len": 128,
                "scaling": {"min_instances": 2, "max_instances": 2}}  # fmt: skip
        assert httpx.post(f"{stack.url}/functions", json=spec).status_code == 201
        baseline = {p: complete(stack.url, p, stream=False)[0] for p in PROMPTS}
        tally, stop = Tally(baseline), threading.Event()
        clients = [threading.Thread(target=load, args=(stack.url, tally, stop, i)) for i in range(CLIENTS)]
        for t in clients:
            t.start()

        def answered(n: int) -> None:
            target = tally.ok + n
            wait_for(lambda: tally.ok >= target or tally.wrong, 60, f"{n} more answers")

        def kill_busy(worker: str) -> None:  # mid-answer: its claimed invocations must be run again
            wait_for(lambda: pending_on(r, worker) > 0, 30, f"{worker} to be answering")
            os.kill(stack.workers[worker].pid, signal.SIGKILL)

        r = redis.Redis.from_url(rp.url)
        answered(STEP)
        w0, w1 = stack.workers
        kill_busy(w1)
        answered(STEP)

        rp.kill()
        refused = httpx.post(f"{stack.url}/v1/completions", json={"model": FN, "prompt": "Hi"}, timeout=10)
        assert refused.status_code == 503 and refused.headers["Retry-After"], refused.text
        assert refused.json()["error"]["type"] == "service_unavailable"
        stack.workers[w1] = spawn(tmp_path / "w1-2.log", "worker", "--redis", rp.url, "--worker-id", w1)
        warmer = spawn(tmp_path / "warmer.log", "warmer", "--redis", rp.url, "--interval", "1")  # plans under load
        rp.start()
        wait_for(lambda: r.zscore(keys.WORKERS, w1) is not None, 60, "the restarted worker to register")
        wait_for(lambda: r.hget(keys.WARMER_STATE, "last_plan"), 30, "the warmer to plan")
        answered(STEP)

        restart_gateway(stack)
        answered(STEP)
        kill_busy(w0)  # its requests are claimed by the live worker
        stack.workers.pop(w0)
        answered(STEP)
        stop.set()
        for t in clients:
            t.join(90)
        assert tally.wrong == []
        assert warmer.poll() is None and all(p.poll() is None for p in stack.workers.values())
        # every accepted invocation was answered and acknowledged: nothing is left queued or pending
        wait_for(lambda: r.xlen(keys.invocations(FN)) == 0, 30, "the queue to drain")
        assert r.xpending(keys.invocations(FN), keys.GROUP)["pending"] == 0
        print(f"chaos: {tally.ok} answers, retried {dict(tally.retried)}")
    finally:
        stop.set()
        if warmer is not None:
            warmer.kill()
        stack.stop()
        rp.kill()


def test_worker_and_warmer_started_before_redis_wait_for_it(tiny_model, tmp_path):
    """They connect (the listener here closes each connection, as a Redis still starting would), keep retrying,
    and register and plan once Redis is there."""
    rp = RedisProc(free_port(), tmp_path)
    listener = socket.create_server(("127.0.0.1", rp.port))
    worker = spawn(tmp_path / "worker.log", "worker", "--redis", rp.url, "--worker-id", "early")
    warmer = spawn(tmp_path / "warmer.log", "warmer", "--redis", rp.url, "--interval", "1")
    try:
        for _ in range(4):  # each process's first try and a retry, at least
            conn, _ = listener.accept()
            conn.close()
        listener.close()
        assert worker.poll() is None and warmer.poll() is None
        rp.start()
        r = redis.Redis.from_url(rp.url)
        wait_for(lambda: r.zscore(keys.WORKERS, "early") is not None, 60, "the worker to register")
        assert warmer.poll() is None
    finally:
        for p in (worker, warmer):
            p.terminate()
            p.wait(10)
        rp.kill()
