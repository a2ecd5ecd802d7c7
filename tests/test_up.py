"""`warmserve up` on a fresh cache: embedded valkey, demo model built offline, examples deployed, requests served."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading

import httpx
from conftest import free_port


def test_up_serves_the_examples_with_the_embedded_redis(tmp_path):
    port = free_port()
    env = {**os.environ, "WARMSERVE_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "warmserve.cli", "up", "--port", str(port), "--device", "cpu"],
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
