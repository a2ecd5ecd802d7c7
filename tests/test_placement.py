"""warmer.placement.plan on hand-built cluster views: each test pins one rule of the planner."""

from dataclasses import replace

import pytest

from protocol.states import ControlAction, ModelState
from warmer.cluster import GPU, Action, ClusterView, FunctionSpec, Instance, Load, Worker, apply_actions
from warmer.forecast import Prediction
from warmer.placement import Options, plan

GB = 10**9
CAP = 76 * GB


def spec(name: str, tp: int = 1, weights: float = 14, kv: float = 30, cap: float = 8.0, keep: float = 60.0):
    return FunctionSpec(name, int(weights * GB), int(kv * GB), tp=tp, keep_alive_s=keep, capacity_rps=cap)


def gpus(n: int, free: list[float] | None = None, lend: list[float] | None = None) -> tuple[GPU, ...]:
    free = free or [CAP / GB] * n
    lend = lend or [0] * n
    return tuple(GPU(i, CAP, int(free[i] * GB), int(lend[i] * GB)) for i in range(n))


def worker(name: str, n: int = 2, cached=("a", "b", "c", "d"), **kw) -> Worker:
    return Worker(name, gpus(n, **kw), frozenset(cached))


def view(workers, specs, instances=(), load=None) -> ClusterView:
    return ClusterView(tuple(workers), {s.name: s for s in specs}, tuple(instances), load or {})


def settle(v: ClusterView, preds, now: float = 0.0) -> tuple[list[Action], ClusterView]:
    acts = plan(v, preds, now)
    return acts, apply_actions(v, acts, now)


def test_prewarms_forecast_demand_and_is_idempotent():
    v = view([worker("w0", 4), worker("w1", 4)], [spec("a"), spec("b", tp=2, weights=26), spec("c")])
    preds = {"a": Prediction(20.0, 30.0), "b": Prediction(2.0, 4.0), "c": Prediction(0.0, 0.0)}
    acts, after = settle(v, preds)
    pre = [a for a in acts if a.kind == "prewarm"]
    assert sum(a.function == "a" for a in pre) == 6  # peak 30 req/s + the 50% burst margin, at 8 per instance
    assert sum(a.function == "b" for a in pre) == 1
    assert not any(a.function == "c" for a in acts)  # forecast idle: nothing
    assert all(len(a.gpus) == 2 and a.gpus[0] % 2 == 0 for a in pre if a.function == "b")  # aligned TP group
    assert plan(after, preds, 0.0) == []
    # and once the loads are done (LOADING -> WARM), planning again still changes nothing but activations
    warm = replace(after, instances=tuple(replace(x, state=ModelState.WARM) for x in after.instances))
    acts2, after2 = settle(warm, preds)
    assert {a.kind for a in acts2} <= {"activate"}
    assert sum(a.function == "a" for a in acts2) == 3  # mean 20 req/s -> 3 HOT, the rest stay WARM for bursts
    assert plan(after2, preds, 0.0) == []


def test_evict_aware_avoids_lender_forecast_to_need_its_kv():
    # Both GPUs have only lent KV memory free. The lender on GPU 0 ("busy") is forecast near its capacity, the
    # one on GPU 1 ("quiet") is forecast idle: the new copy must go where it will not be pushed out.
    lenders = [
        Instance("busy", "w0", (0,), ModelState.HOT, 0, 0, kv_used_bytes=2 * GB, kv_reserved_bytes=30 * GB),
        Instance("quiet", "w0", (1,), ModelState.HOT, 0, 0, kv_used_bytes=2 * GB, kv_reserved_bytes=30 * GB),
    ]
    w = worker("w0", 2, cached=("busy", "quiet", "new"), free=[2, 2], lend=[28, 28])
    specs = [spec("busy"), spec("quiet"), spec("new", kv=10)]  # its weights and its pool fit in lent memory
    preds = {"busy": Prediction(7.0, 8.0), "quiet": Prediction(0.1, 0.2), "new": Prediction(1.0, 2.0)}
    acts = plan(view([w], specs, lenders), preds, 0.0)
    pre = [a for a in acts if a.kind == "prewarm" and a.function == "new"]
    assert [a.gpus for a in pre] == [(1,)]
    # if both lenders are forecast busy, the lent memory is not safe anywhere: no prewarm
    preds["quiet"] = Prediction(7.0, 8.0)
    assert not [a for a in plan(view([w], specs, lenders), preds, 0.0) if a.function == "new"]


def test_does_not_colocate_functions_likely_to_burst_together():
    # "a" is WARM on GPU 0 and bursty; GPU 0 and GPU 1 are otherwise equal. A bursty "b" goes to GPU 1.
    inst = [Instance("a", "w0", (0,), ModelState.WARM, 0, 0)]
    v = view([worker("w0", 2, free=[62, 76])], [spec("a"), spec("b")], inst)
    preds = {"a": Prediction(1.0, 7.0), "b": Prediction(1.0, 7.0)}
    pre = [a for a in plan(v, preds, 0.0) if a.kind == "prewarm" and a.function == "b"]
    assert pre and all(0 not in a.gpus for a in pre)


def test_prefers_worker_with_weights_in_host_memory():
    v = view([worker("w0", 2, cached=()), worker("w1", 2, cached=("a",))], [spec("a")])
    acts = plan(v, {"a": Prediction(1.0, 2.0)}, 0.0)
    assert [(a.kind, a.worker) for a in acts] == [("prewarm", "w1")]
    # when no worker has it, read it from disk first (load_host), then prewarm
    v2 = view([worker("w0", 2, cached=())], [spec("a")])
    assert [a.kind for a in plan(v2, {"a": Prediction(1.0, 2.0)}, 0.0)] == ["load_host", "prewarm"]


def test_reactive_scale_up_for_unforecast_burst():
    hot = [Instance("a", "w0", (0,), ModelState.HOT, 0, 0, inflight=50)]
    load = {"a": Load(arrivals_rps=0.0, inflight=50, queued=40)}
    v = view([worker("w0", 2)], [spec("a")], hot, load)
    acts, after = settle(v, {"a": Prediction(0.0, 0.0)})
    assert [(a.kind, a.gpus) for a in acts] == [("prewarm", (1,))]
    assert plan(after, {"a": Prediction(0.0, 0.0)}, 0.0) == []  # a copy is on its way: no second one


def test_keep_alive_scale_down_then_evict():
    x = Instance("a", "w0", (0,), ModelState.HOT, 0, 0)
    v = view([worker("w0", 1)], [spec("a", keep=60)], [x])
    assert plan(v, {}, 30.0) == []  # idle 30 s < keep_alive
    acts, after = settle(v, {}, 61.0)
    assert [a.kind for a in acts] == ["deactivate", "evict"]
    assert after.instances == ()
    # min_instances keeps one resident (WARM) whatever the forecast
    v_min = view([worker("w0", 1)], [replace(spec("a", keep=60), min_instances=1)], [x])
    assert [a.kind for a in plan(v_min, {}, 61.0)] == ["deactivate"]


def test_evicts_idle_copy_of_less_demanded_function_to_make_room():
    inst = [Instance("low", "w0", (0,), ModelState.WARM, 0, 0)]
    v = view(
        [worker("w0", 1, free=[50], cached=("low", "high"))], [spec("low", weights=60), spec("high", weights=60)], inst
    )
    preds = {"low": Prediction(0.1, 0.2), "high": Prediction(5.0, 6.0)}
    acts, after = settle(v, preds)
    assert [(a.kind, a.function) for a in acts] == [("evict", "low"), ("prewarm", "high")]
    assert plan(after, preds, 0.0) == []
    # never the other way round: a less demanded function does not evict a busier one
    assert plan(after, {"low": Prediction(5.0, 6.0), "high": Prediction(6.0, 7.0)}, 0.0) == []


def test_new_copy_goes_where_compute_is_spare():
    # Engines sharing a GPU take turns: a copy next to a HOT function forecast to fill its GPU adds no capacity.
    hot = [
        Instance("big", "w0", (0,), ModelState.HOT, 0, 0, inflight=40),
        Instance("small", "w0", (1,), ModelState.HOT, 0, 0),
    ]
    v = view(
        [worker("w0", 2, cached=("big", "small", "x"), free=[40, 40])], [spec("big"), spec("small"), spec("x")], hot
    )
    preds = {"big": Prediction(7.5, 7.9), "small": Prediction(0.2, 0.4), "x": Prediction(1.0, 2.0)}
    pre = [a for a in plan(v, preds, 0.0) if a.kind == "prewarm" and a.function == "x"]
    assert [a.gpus for a in pre] == [(1,)]


def test_action_kind_is_a_control_action():
    # The live warmer reads queued control jobs back as strings: they become the same enum members.
    assert Action("evict", "a", "w0", (0,)).kind is ControlAction.EVICT
    assert Action(ControlAction.PREWARM, "a", "w0", (0,)) == Action("prewarm", "a", "w0", (0,))
    with pytest.raises(ValueError, match="unknown control action"):
        Action("warm_up", "a", "w0")


def test_an_exact_forecast_still_gets_the_burst_margin():
    # peak == mean (an oracle): resident copies still cover the planner's margin for bursts inside the window
    v = view([worker("w0", 4)], [spec("a")])
    acts = plan(v, {"a": Prediction(8.0, 8.0)}, 0.0)
    assert sum(a.kind == "prewarm" for a in acts) == 2  # 8 req/s x 1.5 at 8 per instance
    assert sum(a.kind == "prewarm" for a in plan(v, {"a": Prediction(8.0, 8.0)}, 0.0, Options(burst_margin=0))) == 1


def test_speculative_disk_reads_do_not_queue_behind_a_busy_disk():
    # The worker's disk already reads two functions' weights: a forecast-only copy needing a disk read waits for
    # a later plan; a function with requests waiting and no copy (starved) still gets its read.
    busy = Worker("w0", gpus(2), frozenset(), frozenset({"x", "y"}))
    v = view([busy], [spec("a")])
    assert plan(v, {"a": Prediction(1.0, 2.0)}, 0.0) == []
    starved = view([busy], [spec("a")], load={"a": Load(arrivals_rps=1.0, queued=3)})
    assert [a.kind for a in plan(starved, {}, 0.0)] == ["load_host", "prewarm"]
    assert [a.kind for a in plan(v, {"a": Prediction(1.0, 2.0)}, 0.0, Options(max_disk_reads=3))] == [
        "load_host",
        "prewarm",
    ]


def test_requests_waiting_may_take_an_idle_copy_of_a_more_forecast_function():
    # A copy and its pool fill a GPU. "top" (forecast busier) serves on GPU 2 and has a second, idle copy on GPU 0
    # for its forecast peak; "low" has one busy copy on GPU 1. Once low's requests queue, its extra copy may take
    # top's idle one: requests waiting now come before a forecast's spare copy.
    inst = [
        Instance("top", "w0", (0,), ModelState.HOT, 0, 0),
        Instance("low", "w0", (1,), ModelState.HOT, 0, 0, inflight=4),
        Instance("top", "w0", (2,), ModelState.HOT, 0, 0, inflight=1),
    ]
    specs = [spec("top", kv=60), spec("low", kv=60)]
    v = view([worker("w0", 3, free=[2, 2, 2], cached=("top", "low"))], specs, inst)
    preds = {"top": Prediction(2.0, 8.0), "low": Prediction(1.0, 1.0)}
    assert plan(v, preds, 30.0) == []  # no queue: the forecast decides
    queued = replace(v, load={"low": Load(arrivals_rps=1.0, inflight=4, queued=5)})
    # top's copy served a request 5 s ago: about to be used again, it is not taken (no ping-pong)
    assert plan(queued, preds, 5.0) == []
    acts = [(a.kind, a.function, a.gpus) for a in plan(queued, preds, 30.0)]
    assert acts == [("deactivate", "top", (0,)), ("evict", "top", (0,)), ("prewarm", "low", (0,))]


def test_saturated_pools_add_a_copy_before_requests_queue():
    # An exact forecast (peak == mean) says two copies serve the rate, but both copies' KV pools are nearly full
    # (a copy runs below its nominal capacity next to busy neighbours): one more is activated before anything
    # queues, and none while the pools have room.
    def hot(g: int, used: float) -> Instance:
        return Instance("a", "w0", (g,), ModelState.HOT, 0, 0, inflight=40, kv_used_bytes=int(used * GB),
                        kv_reserved_bytes=30 * GB)  # fmt: skip

    warm = Instance("a", "w0", (2,), ModelState.WARM, 0, 0)
    load = {"a": Load(arrivals_rps=12.0, inflight=80)}
    preds = {"a": Prediction(12.0, 12.0)}
    roomy = view([worker("w0", 4, cached=("a",))], [spec("a")], [hot(0, 10), hot(1, 10), warm], load)
    assert [a.kind for a in plan(roomy, preds, 0.0)] == []
    full = replace(roomy, instances=(hot(0, 27), hot(1, 28), warm))
    assert [(a.kind, a.gpus) for a in plan(full, preds, 0.0)] == [("activate", (2,))]
