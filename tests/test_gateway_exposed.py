"""`warmserve gateway` bound to a non-loopback address: keys by default, and slow or idle clients cut off."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from conftest import free_port, wait_for
from gateway_inproc import db_url

DEADLINE_S = 1  # the head deadline and keep-alive timeout this gateway runs with


@pytest.fixture(scope="module")
def exposed(redis_url, tmp_path_factory):
    port = free_port()
    env = {**os.environ, "WARMSERVE_HEADER_TIMEOUT_S": str(DEADLINE_S), "WARMSERVE_KEEP_ALIVE_S": str(DEADLINE_S)}
    log = open(tmp_path_factory.mktemp("exposed") / "gateway.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "warmserve.cli", "gateway", "--redis", db_url(redis_url, 11), "--host", "0.0.0.0"]
        + ["--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, what="gateway /healthz")
    yield port
    proc.terminate()
    proc.wait(10)
    log.close()


def test_keys_are_required_by_default_off_loopback(exposed):
    url = f"http://127.0.0.1:{exposed}"
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.post(f"{url}/functions", json={"name": "x"}).status_code == 401


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """Whether the server closes `sock` in time, while we send `trickle` a byte at a time."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.2)
    sent = 0
    while time.monotonic() < deadline:
        try:
            if sent < len(trickle):
                sock.sendall(trickle[sent : sent + 1])
                sent += 1
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:  # reset or broken pipe: closed too
            return True
    return False


def test_idle_connection_is_closed(exposed):
    with socket.create_connection(("127.0.0.1", exposed)) as sock:
        assert closed_within(sock, DEADLINE_S + 4)


def test_trickled_request_head_is_cut_off(exposed):
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200
    with socket.create_connection(("127.0.0.1", exposed)) as sock:
        assert closed_within(sock, DEADLINE_S + 4, trickle=head)


def test_idle_keep_alive_connection_is_closed_after_an_answer(exposed):
    with socket.create_connection(("127.0.0.1", exposed)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert closed_within(sock, DEADLINE_S + 4)
