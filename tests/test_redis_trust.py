"""Redis as a trusted store, not an open door: what anyone who can write to it can no longer do.

A worker runs only control jobs (an RQ job naming any other callable, or carrying pickled data, is refused and
marked failed, never run), and a registry entry that is not a spec we wrote is skipped without stopping the
others from being listed, planned and served.
"""

from __future__ import annotations

import threading

import pytest
import redis
from conftest import wait_for
from gateway_inproc import FAST, AppClient, db_url
from rq import Callback, Queue
from rq.job import JobStatus

from functions.spec import parse_spec
from gateway.app import create_app
from invoker.registry import Registry
from protocol import keys
from protocol.states import ControlAction, ModelState
from warmer.loop import Warmer
from worker import control

GOOD = "good-fn"


@pytest.fixture
def url(redis_url):
    url = db_url(redis_url, 9)
    redis.Redis.from_url(url).flushdb()
    return url


class Target:
    """Stands in for the worker process: records the control actions it is asked to apply."""

    def __init__(self) -> None:
        self.applied: list[tuple[ControlAction, str]] = []

    def apply_control(self, action: ControlAction, function: str) -> ModelState:
        self.applied.append((action, function))
        return ModelState.HOT


def test_worker_runs_only_control_jobs(url, tmp_path, monkeypatch):
    target = Target()
    monkeypatch.setattr(control, "_target", target)
    r = redis.Redis.from_url(url)
    name = keys.control_queue("trust")
    safe = Queue(name, connection=r, serializer=keys.CONTROL_SERIALIZER)
    pwned = tmp_path / "pwned"
    refused = [
        safe.enqueue("os.mkdir", str(pwned)),  # any other callable
        Queue(name, connection=r).enqueue("os.mkdir", str(pwned)),  # pickled data: never unpickled
        safe.enqueue(keys.CONTROL_JOB, "activate", GOOD, on_success=Callback("os.mkdir")),  # a callback RQ would call
        safe.enqueue(keys.CONTROL_JOB, "activate", GOOD, "extra"),  # not the control job's arguments
    ]
    ok = safe.enqueue(keys.CONTROL_JOB, "activate", GOOD)
    stopping = threading.Event()
    worker = control.ControlWorker([safe], connection=r, name="trust-ctl", stopping=stopping)

    def stop_when_done() -> None:  # RQ's job timeouts use SIGALRM: the worker itself must run on the main thread
        try:
            wait_for(lambda: ok.get_status(refresh=True) in (JobStatus.FINISHED, JobStatus.FAILED), 30, "the job")
        finally:
            stopping.set()

    threading.Thread(target=stop_when_done, daemon=True).start()
    worker.work(logging_level="ERROR")
    assert ok.get_status(refresh=True) == JobStatus.FINISHED
    assert [job.get_status(refresh=True) for job in refused] == [JobStatus.FAILED] * len(refused)
    assert not pwned.exists()
    assert target.applied == [(ControlAction.ACTIVATE, GOOD)]


GARBAGE = {
    b"not-json": b"{nope",
    b"a-list": b"[1, 2]",
    b"empty": b"{}",
    b"wrong-types": b'{"name": "wrong-types", "model": 7, "engine": "builtin"}',
    b"other-name": None,  # filled with GOOD's spec: an entry must hold its own name's spec
    b"relative": b'{"name": "relative", "model": "models/x", "max_model_len": 64, "scaling": {}, "slo": {}}',
    b"bad-section": None,  # GOOD's spec with scaling replaced by a string
    b"\xff\xfe": b"{}",
    b"deep": b"[" * 5000 + b"]" * 5000,
}


def test_bad_registry_entries_are_skipped_and_the_rest_served(url, tiny_model):
    r = redis.Redis.from_url(url)
    Registry(r).deploy(parse_spec({"name": GOOD, "model": str(tiny_model), "max_model_len": 64}))
    good = r.hget(keys.FUNCTIONS, GOOD)
    garbage = {
        **GARBAGE,
        b"other-name": good,
        b"bad-section": good.replace(b'"scaling":{', b'"scaling":"x","_":{'),
    }
    r.hset(keys.FUNCTIONS, mapping=garbage)
    assert list(Registry(r).all()) == [GOOD]
    assert Registry(r).get("not-json") is None and Registry(r).get(GOOD) is not None
    assert Warmer(r, FAST).step() == []  # plans over the good entry (no workers here) without raising
    gw = AppClient(create_app(url, FAST))
    try:
        models = gw.request("GET", "/v1/models")
        assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == [GOOD]
        assert gw.request("GET", "/functions").status_code == 200
        resp = gw.request("POST", "/v1/completions", json={"model": "wrong-types", "prompt": "hi"})
        assert resp.status_code == 500 and "registry entry is invalid" in resp.json()["error"]["message"]
    finally:
        gw.close()


def test_a_worker_keeps_serving_beside_bad_entries(url, tiny_model):
    from gateway_inproc import serve_hot

    r = redis.Redis.from_url(url)
    r.hset(keys.FUNCTIONS, mapping=GARBAGE | {b"other-name": b"{}", b"bad-section": b"{}"})
    worker = serve_hot(url, GOOD, str(tiny_model), "trust-worker", max_model_len=64)
    gw = AppClient(create_app(url, FAST))
    try:
        resp = gw.request("POST", "/v1/completions", json={"model": GOOD, "prompt": "hi", "max_tokens": 3})
        assert resp.status_code == 200, resp.text
    finally:
        gw.close()
        worker.stop()
