"""The live warmer against real Redis: reads worker reports and history, sends RQ control jobs, is idempotent."""

from __future__ import annotations

import time

from rq import Queue

from functions.spec import parse_spec
from invoker import history
from invoker.registry import Registry
from protocol import keys
from protocol.messages import WorkerInfo
from warmer.loop import Warmer

GIB = 1 << 30


def report(r, worker_id: str, models: dict[str, str], free: int = 8 * GIB, last_used: float | None = None) -> None:
    now = time.time()
    info = WorkerInfo(
        worker_id, "host", "cpu", 10 * GIB, free, 0, models, {}, {m: last_used or now for m in models}, now - 100, now
    )
    r.zadd(keys.WORKERS, {worker_id: now})
    r.hset(keys.worker(worker_id), "info", info.to_json())


def jobs(r, worker_id: str) -> list[tuple[str, str]]:
    return [
        tuple(j.args)
        for j in Queue(keys.control_queue(worker_id), connection=r, serializer=keys.CONTROL_SERIALIZER).jobs
    ]


def test_min_instances_get_prewarmed_once_even_across_restarts(r, tiny_model):
    Registry(r).deploy(parse_spec({"name": "always", "model": str(tiny_model), "scaling": {"min_instances": 1}}))
    report(r, "wa", {})
    report(r, "wb", {}, free=9 * GIB)
    sent = Warmer(r).step()
    # disk -> host cache, then host -> GPU, queued in that order on one worker
    assert [(a.kind, a.function) for a in sent] == [("load_host", "always"), ("prewarm", "always")]
    target = sent[0].worker
    assert {a.worker for a in sent} == {target}
    assert jobs(r, target) == [("load_host", "always"), ("prewarm", "always")]
    r.delete(keys.WARMER_STATE)  # even without its memory of what it sent, a restarted warmer
    assert Warmer(r).step() == []  # sees the jobs still queued on the worker
    Queue(keys.control_queue(target), connection=r).empty()  # the worker took the jobs and is loading
    report(r, target, {"always": "LOADING"})
    assert Warmer(r).step() == []  # a copy on its way: no second prewarm on the other worker
    report(r, target, {"always": "WARM"})
    assert Warmer(r).step() == []  # WARM satisfies min_instances with no demand


def test_forecast_demand_activates_and_idle_scales_down(r, tiny_model):
    spec = parse_spec({"name": "busy", "model": str(tiny_model), "scaling": {"keep_alive_s": 30}})
    Registry(r).deploy(spec)
    now = time.time()
    with r.pipeline() as p:  # steady traffic for the last hour: the forecast expects more
        for minute in range(60):
            for _ in range(30):
                history.record_arrival(p, "busy", now - 60 * minute - 1)
        p.execute()
    report(r, "wa", {"busy": "WARM"})
    assert [(a.kind, a.worker) for a in Warmer(r).step(now)] == [("activate", "wa")]
    r.delete(keys.history("busy"), keys.WARMER_STATE)
    Queue(keys.control_queue("wa"), connection=r).empty()  # the worker ran the activation
    report(r, "wa", {"busy": "HOT"}, last_used=now - 120)  # idle past keep-alive, no demand left
    sent = Warmer(r).step(now)
    # scale to zero: the KV pages go first, then the weights leave the GPU (kept in host memory)
    assert [(a.kind, a.function, a.worker) for a in sent] == [("deactivate", "busy", "wa"), ("evict", "busy", "wa")]
    assert jobs(r, "wa") == [("deactivate", "busy"), ("evict", "busy")]
