"""Shared fixtures: real Redis servers, the offline demo model, and a running WarmServe stack (real processes)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from warmserve.tinymodel import build_tiny_llama

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


@dataclass
class SseAnswer:
    """A streamed completion as a client reads it, one `data:` line at a time."""

    parts: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    dones: int = 0

    def feed(self, line: str) -> bool:
        """Take one SSE line; True when it carried a completion chunk. An error chunk fails the test."""
        if line == "data: [DONE]":
            self.dones += 1
        elif line.startswith("data: "):
            chunk = orjson.loads(line[6:])
            assert "error" not in chunk, chunk
            choice = chunk["choices"][0]
            self.parts.append(choice["text"])
            self.reasons += [choice["finish_reason"]] if choice["finish_reason"] else []
            return True
        return False

    @property
    def text(self) -> str:
        return "".join(self.parts)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A real Redis server (Debian's redis-server, installed by `make test`)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; `make test` installs it (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path_factory.mktemp("redis")),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    wait_for(lambda: redis.Redis.from_url(url).ping(), what="redis-server")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def r(redis_url) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("warmserve-cache")
    os.environ["WARMSERVE_CACHE"] = str(path)  # `cache:` model paths resolve here in this process and children
    # tests build models in their own tmp_path too: let gateways (children inherit this) serve from anywhere there
    os.environ["WARMSERVE_MODEL_ROOTS"] = str(tmp_path_factory.getbasetemp())
    return path


@pytest.fixture(scope="session")
def tiny_model(cache_dir) -> Path:
    return build_tiny_llama(cache_dir / "models" / "tiny-llama")


@pytest.fixture(scope="session")
def slow_model(cache_dir) -> Path:
    """Wider and deeper than the demo model, so an answer lasts long enough to act in the middle of it."""
    return build_tiny_llama(
        cache_dir / "models" / "slower-llama",
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
    )


@dataclass
class Stack:
    """Gateway + workers as real processes against a real Redis."""

    redis_url: str
    url: str
    gateway: subprocess.Popen
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: Path | None = None

    def start_worker(self, worker_id: str) -> subprocess.Popen:
        log = open(self.logs / f"{worker_id}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "warmserve.cli", "worker", "--redis", self.redis_url, "--worker-id", worker_id],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.workers[worker_id] = proc
        r = redis.Redis.from_url(self.redis_url)
        wait_for(lambda: r.zscore("ws:workers", worker_id) is not None, 120, f"worker {worker_id} heartbeat")
        return proc

    def stop(self) -> None:
        for proc in [*self.workers.values(), self.gateway]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.workers.values(), self.gateway]:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_stack(redis_url: str, logs: Path, workers: int = 1) -> Stack:
    port = free_port()
    gw_log = open(logs / "gateway.log", "w")  # noqa: SIM115
    gateway = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "warmserve.cli",
            "gateway",
            "--redis",
            redis_url,
            "--port",
            str(port),
            "--request-timeout",
            "120",
        ],
        stdout=gw_log,
        stderr=subprocess.STDOUT,
    )
    stack = Stack(redis_url, f"http://127.0.0.1:{port}", gateway, logs=logs)
    wait_for(lambda: httpx.get(f"{stack.url}/healthz").status_code == 200, 120, "gateway /healthz")
    for i in range(workers):
        stack.start_worker(f"w{i}-{os.getpid()}")
    return stack


@pytest.fixture(scope="module")
def stack(redis_url, tiny_model, tmp_path_factory) -> Iterator[Stack]:
    redis.Redis.from_url(redis_url).flushdb()
    s = start_stack(redis_url, tmp_path_factory.mktemp("logs"))
    yield s
    s.stop()
