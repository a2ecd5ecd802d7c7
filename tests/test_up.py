"""`warmserve up` on a fresh cache: embedded valkey, demo model built offline, examples deployed, requests served."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import redis
from conftest import free_port

from warmserve.up import banner, cli_path, example_function


def test_up_serves_the_examples_with_the_embedded_redis(tmp_path):
    port, redis_port = free_port(), free_port()
    env = {**os.environ, "WARMSERVE_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    cmd = ["up", "--port", str(port), "--device", "cpu", "--redis-port", str(redis_port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "warmserve.cli", *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    try:
        while not any("WarmServe is up" in line for line in seen):
            seen.append(lines.get(timeout=120))
        url = f"http://127.0.0.1:{port}"
        assert any("random weights" in line for line in seen)  # the README's warning is printed too
        assert any("embedded Redis-compatible server" in line for line in seen)
        assert (tmp_path / "cache" / "models" / "tiny-llama" / "model.safetensors").is_file()
        names = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert {"tiny-chat", "tiny-chat-reference"} <= names
        # the embedded server listens where it was told, so `redis-cli -p PORT` lines reach it
        assert redis.Redis(port=redis_port).hget("ws:functions", "tiny-chat") is not None
        resp = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "tiny-chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5},
            timeout=120,
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    assert code == 0, "".join(seen)


def test_the_embedded_redis_port_must_be_free(tmp_path):
    """A busy --redis-port is an error, not another port that the README's `redis-cli -p` lines would miss."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        cmd = ["up", "--port", str(free_port()), "--functions", str(tmp_path), "--redis-port", str(taken)]
        env = {**os.environ, "WARMSERVE_CACHE": str(tmp_path / "cache")}
        proc = subprocess.run(
            [sys.executable, "-m", "warmserve.cli", *cmd], env=env, capture_output=True, text=True, timeout=60
        )
    assert proc.returncode != 0
    assert f"port {taken} is in use" in proc.stderr


def test_the_banner_tries_the_builtin_engine_with_the_venv_cli():
    docs = [(Path("a.yaml"), {"name": "ref", "engine": "transformers"}), (Path("b.yaml"), {"name": "fast"})]
    example = example_function(docs, ["ref", "fast"])
    assert example == "fast"  # the reference engine is deployed first but is the slow one
    assert example_function(docs, ["ref"]) == "ref" and example_function([], []) == "NAME"
    text = banner("http://127.0.0.1:8100", "redis://127.0.0.1:16380/0", example, None, embedded=True)
    assert f"{cli_path()} invoke fast 'Hello' --stream --url http://127.0.0.1:8100" in text
    assert "redis-cli -p 16380 HGETALL ws:functions" in text
    assert '"model": "fast"' in text


def test_the_cli_path_is_the_venv_script_relative_to_here(monkeypatch, tmp_path):
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "warmserve").touch()
    monkeypatch.setattr(sys, "executable", str(tmp_path / ".venv" / "bin" / "python"))
    monkeypatch.chdir(tmp_path)
    assert cli_path() == ".venv/bin/warmserve"


def test_redis_port_and_redis_url_exclude_each_other():
    """--redis-port is the embedded server's: with --redis URL it would be silently ignored."""
    from warmserve.cli import REDIS_PORT, parser

    assert parser().parse_args(["up"]).redis_port == REDIS_PORT
    with pytest.raises(SystemExit):
        parser().parse_args(["up", "--redis", "redis://127.0.0.1:6379/0", "--redis-port", "16380"])
