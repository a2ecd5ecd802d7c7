"""The simulator's baselines on the live cluster (warmer/baselines.py): the same policy objects decide, the live
cluster gets the control jobs, and nothing is sent twice while the worker has not reported it yet."""

from __future__ import annotations

import time

from rq import Queue
from test_warmer_loop import GIB, jobs, report

from functions.spec import parse_spec
from invoker import history
from invoker.registry import Registry
from protocol import keys
from protocol.messages import Invocation, SamplingParams
from protocol.settings import DEFAULTS
from warmer.baselines import BaselineWarmer


def deploy(r, model, *names: str, keep_alive_s: float = 60) -> None:
    for name in names:
        Registry(r).deploy(parse_spec({"name": name, "model": str(model), "scaling": {"keep_alive_s": keep_alive_s}}))


def queue_request(r, fn: str) -> None:
    r.xadd(keys.invocations(fn), Invocation(f"req-{fn}-{time.time()}", fn, [1, 2], SamplingParams()).to_fields())


def test_ondemand_evicts_the_idle_owner_of_the_gpu_then_loads_the_waiting_function(r, tiny_model):
    deploy(r, tiny_model, "a", "b")
    report(r, "w", {"a": "HOT"}, last_used=time.time() - 5)  # idle, within its keep-alive
    queue_request(r, "b")
    warmer = BaselineWarmer(r, "ondemand", DEFAULTS)
    sent = warmer.step()
    # ServerlessLLM-like: an instance owns its GPU, so the idle one makes room (least recently used)
    assert [(a.kind, a.function) for a in sent] == [("evict", "a"), ("activate", "b")]
    assert jobs(r, "w") == [("evict", "a"), ("activate", "b")]
    Queue(keys.control_queue("w"), connection=r).empty()  # the worker took both jobs, has not reported yet
    assert warmer.step() == []  # what it sent a moment ago counts as done


def test_ondemand_scales_to_zero_after_its_keep_alive(r, tiny_model):
    deploy(r, tiny_model, "a")
    report(r, "w", {"a": "HOT"}, last_used=time.time() - 120)
    assert [(a.kind, a.function) for a in BaselineWarmer(r, "ondemand", DEFAULTS).step()] == [("evict", "a")]


def test_ollama_keeps_several_models_on_one_gpu(r, tiny_model):
    deploy(r, tiny_model, "a", "b")
    report(r, "w", {"a": "HOT"}, free=80 * GIB, last_used=time.time() - 5)
    queue_request(r, "b")
    sent = BaselineWarmer(r, "ollama", DEFAULTS).step()
    assert [(a.kind, a.function) for a in sent] == [("activate", "b")]  # room beside "a": nothing evicted


def test_static_places_by_past_demand_and_holds_the_placement(r, tiny_model):
    deploy(r, tiny_model, "a", "b")
    now = time.time()
    with r.pipeline() as p:
        for minute in range(60):
            history.record_arrival(p, "a", now - 60 * minute - 1)
        p.execute()
    report(r, "w", {"c": "HOT"}, free=10 * GIB)
    warmer = BaselineWarmer(r, "static", DEFAULTS)
    sent = warmer.step(now)
    assert sorted((a.kind, a.function) for a in sent) == [("activate", "a"), ("activate", "b")]
    report(r, "w", {"a": "HOT", "b": "HOT"}, free=8 * GIB)
    r.delete(keys.control_queue("w"))
    warmer.recent.clear()
    assert warmer.step(now) == []  # placed once, never moved
