"""What each warmserve technique earns, pinned on tiny workloads: a better forecast never does worse, forecasting
beats reacting on a periodic burst, an unfittable request is refused and blocks nobody, KV lending is used (and
does no worse than not lending) when memory is short, sharing only what the lender's forecast leaves idle, and a
pool activated once today's traffic outgrew yesterday's peak is sized for today's; and the diagnosis tool
(sim/diagnose.py) gives every miss one reason and undoes its trial changes."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from test_sim import DAY, MODELS, PROFILE, scenario, ttft

from protocol.settings import DEFAULTS
from protocol.states import ModelState
from sim import periodic as periodic_shape
from sim.cluster import Inst
from sim.policies import Ablation, WarmServe
from sim.scenario import make_functions, run_policy


def periodic():
    """300 requests in window 2 of each of three days of history, and again in the run (start: window 1)."""
    hist = np.zeros(3 * 288 + 1, np.int64)
    hist[2::288] = 300
    burst = 300.0 + np.linspace(0, 299, 300)
    return scenario(burst, history=hist, start=3 * DAY + 300, duration=900.0)


def test_a_better_forecast_never_does_worse_and_forecasting_beats_reacting():
    sc = periodic()
    runs = {p: run_policy(sc, p) for p in ("warmserve-oracle", "warmserve", "warmserve-reactive")}
    slo = {p: s["slo_attainment"] for p, (_, s) in runs.items()}
    mean = {p: s["ttft_mean_s"] for p, (_, s) in runs.items()}
    first = {p: ttft(sim)[0] for p, (sim, _) in runs.items()}
    assert slo["warmserve-oracle"] >= slo["warmserve"] >= slo["warmserve-reactive"]
    assert mean["warmserve-oracle"] <= mean["warmserve"] + 1e-3
    # Without a forecast the burst's first request waits for a copy (~0.3 s); with one it finds the model WARM.
    assert first["warmserve-oracle"] < 0.2 and first["warmserve"] < 0.2 < first["warmserve-reactive"]
    assert mean["warmserve-reactive"] > mean["warmserve"]


def test_forecasting_beats_reacting_by_a_margin_when_a_cold_copy_is_a_disk_read():
    # The same daily burst, dense (200 requests in 20 s), on a worker whose host cache holds nothing: a copy made
    # when the burst arrives reads 13.5 GB from disk (~2.3 s), and every request of those seconds misses its SLO.
    # The forecast prewarms the copy ahead of the window; the oracle does at least as well.
    hist = np.zeros(3 * 288 + 1, np.int64)
    hist[2::288] = 200
    sc = scenario(300.0 + np.linspace(0, 20, 200), history=hist, start=3 * DAY + 300, duration=900.0)
    sc = replace(sc, profile=replace(PROFILE, host_memory_bytes=10**9))
    slo = {p: run_policy(sc, p)[1]["slo_attainment"] for p in ("warmserve-oracle", "warmserve", "warmserve-reactive")}
    assert slo["warmserve-oracle"] >= slo["warmserve"] >= slo["warmserve-reactive"] + 0.05


def test_an_unfittable_request_is_refused_and_blocks_nobody():
    sc = scenario([1.0, 2.0, 3.0])
    room = (PROFILE.usable_bytes - MODELS["llama-7b"].shard_bytes) / MODELS["llama-7b"].kv_bytes_per_token
    prompt = sc.workload.prompt.copy()
    prompt[0] = int(room) + 1  # alone on an empty GPU its KV still does not fit next to the weights
    sc = replace(sc, workload=replace(sc.workload, prompt=prompt))
    for policy in ("warmserve", "ondemand", "ollama", "static"):
        sim, s = run_policy(sc, policy)
        assert sim.refused.tolist() == [True, False, False] and s["counters"]["refused"] == 1
        assert np.isnan(sim.first_token[0]) and not np.isnan(sim.first_token[1:]).any()
        assert s["requests"] == 2  # refused requests are the client's error: not measured


def memory_short():
    """One GPU. "a" runs all along with a KV pool that leaves no room for a second model's weights; "b" bursts at
    the same time every day. Only in a's idle pool can b's weights wait for their burst."""
    hist = np.zeros((2, 3 * 288 + 1), np.int64)
    hist[0] = 60
    hist[1, 2::288] = 100
    t_a = np.arange(0.0, 900.0, 5.0)
    t_b = 300.0 + np.linspace(0, 100, 100)
    order = np.argsort(np.concatenate([t_a, t_b]), kind="stable")  # arrivals in time order, as the sim reads them
    sc = scenario(np.concatenate([t_a, t_b])[order], start=3 * DAY + 300, duration=900.0, history=hist[0])
    fn = np.concatenate([np.zeros(len(t_a), np.int16), np.ones(len(t_b), np.int16)])[order]
    wl = replace(sc.workload, fn=fn, functions=("a", "b"))
    pool = PROFILE.usable_bytes - MODELS["llama-7b"].shard_bytes - 5e9  # 5 GB free: less than b's 13.5 GB
    fns = [replace(sc.functions[0], kv_pool_bytes=pool), replace(sc.functions[0], name="b")]
    return replace(sc, workload=wl, functions=fns, history=hist, gpus_per_node=1), fn


@pytest.mark.parametrize("lending", [True, False])
def test_lending_is_used_when_memory_is_short(lending):
    sc, fn = memory_short()
    sim, s = run_policy(sc, "warmserve" if lending else "warmserve-nolend")
    first_b = ttft(sim)[fn == 1][0]
    if lending:
        assert first_b < 0.2  # b was WARM in a's idle pool, activated in milliseconds
    else:
        assert first_b > MODELS["llama-7b"].shard_bytes / PROFILE.pcie_bytes_per_s  # b waited for a copy


def test_lending_does_no_worse_than_no_lending_when_memory_is_short():
    # b's pool shares only what a's own forecast leaves idle, so a keeps the pages its traffic needs: lending
    # gains b's burst and costs a nothing.
    sc, fn = memory_short()
    (lend, s_lend), (nolend, s_nolend) = run_policy(sc, "warmserve"), run_policy(sc, "warmserve-nolend")
    assert s_lend["slo_attainment"] >= s_nolend["slo_attainment"]
    assert s_lend["ttft_mean_s"] <= s_nolend["ttft_mean_s"]
    assert s_lend["counters"]["borrowed_pools"] >= 1 and s_nolend["counters"]["borrowed_pools"] == 0
    a_lend, a_nolend = ttft(lend)[fn == 0], ttft(nolend)[fn == 0]
    assert np.percentile(a_lend, 99) <= np.percentile(a_nolend, 99) + 1e-3  # the lender is not slowed


def test_a_pool_shares_only_what_its_lenders_forecast_leaves_idle():
    # a lender with a 40 GB pool using 10 GB: forecast at half its pool's capacity it lends 40 - max(10, 20) GB;
    # forecast at capacity it lends nothing
    lender = Inst(1, 0, (0,), 0, ModelState.HOT, 0.0, shard=1, reserve=40e9)
    lender.kv_bytes = 10e9
    borrower = Inst(2, 1, (0,), 0, ModelState.WARM, 0.0, shard=1, reserve=10e9)
    sim = SimpleNamespace(on_gpu=[[lender, borrower]], by_fn=[[lender], [borrower]])
    policy = WarmServe(np.zeros((2, 0), np.int64))
    policy._use = {0: 0.5}
    assert policy.pool_lend(sim, 0, borrower) == pytest.approx(20e9)
    policy._use = {0: 1.0}
    assert policy.pool_lend(sim, 0, borrower) == 0.0
    assert WarmServe(np.zeros((2, 0), np.int64), ablation=Ablation(lending=False)).pool_lend(sim, 0, borrower) == 0


def test_periodic_groups_burst_in_their_own_window_every_hour():
    env = periodic_shape._envelope(len(periodic_shape.STEADY), 2)
    per_hour = 3600 // periodic_shape.SLOT_S
    assert (env[: len(periodic_shape.STEADY)] == 1).all()
    for g in range(periodic_shape.GROUPS):
        row = env[len(periodic_shape.STEADY) + g * periodic_shape.PER_GROUP]
        w = periodic_shape.burst_window(g)
        assert np.flatnonzero(row).tolist() == [w, per_hour + w]
        assert row.mean() == pytest.approx(1.0)  # the hour's traffic, all in one window
    # groups evenly spaced, each in its own window: a gap between bursts for the planner to swap copies in
    assert len({periodic_shape.burst_window(g) for g in range(periodic_shape.GROUPS)}) == periodic_shape.GROUPS


def test_a_pool_grows_when_todays_traffic_outgrows_yesterdays_peak():
    # Yesterday "f" saw one request per window, so its pool holds one request; today it bursts at 1.25 req/s for
    # a minute, twice. Once a window of today's traffic is counted, copies activated for the second burst get
    # a pool sized for today's rate and serve it batched; with pools kept at yesterday's size each copy runs one
    # request at a time and the burst queues (mean TTFT 3.5 s against 0.02 s).
    hist = np.ones(3 * 288, np.int64)
    times = np.concatenate([np.arange(0.0, 60.0, 0.8), np.arange(400.0, 460.0, 0.8)])
    sc = scenario(times, history=hist, outputs=200, start=3 * DAY, duration=900.0)
    peak = hist[-288:].max() / DEFAULTS.window_s
    sc = replace(sc, functions=make_functions(PROFILE, ["llama-7b"], ["f"], sc.workload, 60.0, np.array([peak])))
    runs = {}
    for resize in (True, False):
        policy = WarmServe(sc.history)
        policy.resize_pools = resize
        runs[resize] = run_policy(sc, "warmserve", policy=policy)
    (grown, s_grown), (fixed, s_fixed) = runs[True], runs[False]
    second = fixed.w.t >= fixed.w.start_s + 400.0
    assert s_grown["counters"]["pool_resizes"] >= 1 and s_fixed["counters"]["pool_resizes"] == 0
    assert grown.policy.kv_reserve(0) >= 2 * sc.functions[0].kv_pool_bytes
    assert s_grown["slo_attainment"] > s_fixed["slo_attainment"] + 0.3
    assert np.mean(ttft(grown)[second]) < 0.5 * np.mean(ttft(fixed)[second])
    # the first burst, before any of today's windows is counted, is served alike
    assert np.mean(ttft(grown)[~second]) == pytest.approx(np.mean(ttft(fixed)[~second]))


def test_the_diagnosis_accounts_for_every_miss_and_undoes_its_trials():
    # sim/diagnose.py: each missed request gets one reason, and a trial change is gone after its block
    from sim import diagnose, sizing
    from warmer import placement

    def current():
        return sizing.size, placement._gpu_util, placement._demand, vars(WarmServe)["_forecast_use"]

    before = current()
    with diagnose.trial(["minbatch8", "util", "burstm"]):
        assert all(a is not b for a, b in zip(current(), before, strict=True))
    assert all(a is b for a, b in zip(current(), before, strict=True))
    sc = periodic()
    r = diagnose.run(sc, "warmserve", detail=True)
    requests = sum(f["requests"] for f in r["functions"])
    misses = sum(f["misses"] for f in r["functions"])
    assert misses == sum(r["why"].values()) == round((1 - r["slo_attainment"]) * requests)
    assert r["slo_attainment"] == run_policy(sc, "warmserve")[1]["slo_attainment"]  # instrumenting changes nothing
