"""Simulator: policy behaviour on tiny hand-made workloads, conservation, memory bounds, determinism, CLI."""

import json

import numpy as np
import pytest

from modelinfo import config_from_dict
from protocol.settings import DEFAULTS
from sim import paper_setup
from sim.cli import _parser, main
from sim.engine_model import load_profile
from sim.models import CONFIGS, MODELS
from sim.policies import WarmServe
from sim.scenario import POLICIES, Scenario, make_functions, make_policy, run_policy
from sim.traces import Workload, load_azure, powerlaw
from warmer.forecast import make_forecaster

DAY = 86_400
PROFILE = load_profile()


def scenario(times, history=None, outputs=50, prompt=512, warmup=0.0, start=3 * DAY, duration=None) -> Scenario:
    """One llama-7b function on one worker with two GPUs; `times` are offsets from `start`."""
    t = start + np.asarray(times, dtype=float)
    n = len(t)
    wl = Workload(
        t=t,
        fn=np.zeros(n, np.int16),
        prompt=np.full(n, prompt, np.int32),
        output=np.full(n, outputs, np.int32),
        functions=("f",),
        start_s=start,
        duration_s=duration or float(times[-1]) + 1.0,
    )
    fns = make_functions(PROFILE, ["llama-7b"], ["f"], wl, keep_alive_s=60.0)
    hist = np.zeros((1, int(start // DEFAULTS.window_s)), np.int64) if history is None else history[None, :]
    return Scenario(PROFILE, fns, wl, n_nodes=1, gpus_per_node=2, history=hist, warmup_s=warmup)


def ttft(sim) -> np.ndarray:
    return sim.first_token - sim.w.t


def load_time() -> float:
    return MODELS["llama-7b"].shard_bytes / PROFILE.pcie_bytes_per_s


def test_ondemand_pays_a_load_on_a_cold_request_always_warm_never_does():
    sc = scenario([10.0, 11.0, 200.0])  # the third comes after keep_alive (60 s): scaled to zero by then
    od, _ = run_policy(sc, "ondemand")
    aw, _ = run_policy(sc, "always-warm")
    cold = load_time() + PROFILE.cold_engine_start_s
    t_od, t_aw = ttft(od), ttft(aw)
    assert t_od[0] >= cold and t_od[2] >= cold
    assert t_od[1] >= cold - 1.0  # arrived during the load: waits for it too
    assert np.all(t_aw < 0.1)
    assert od.counters["loads"] == 2


def test_warmserve_prewarms_ahead_of_a_periodic_burst():
    # Three days of history: 300 requests in window 2 of each day (600-900 s), nothing otherwise. The run starts
    # at 300 s of day 3; the burst arrives at 600 s as usual.
    hist = np.zeros(3 * 288 + 1, np.int64)  # up to the run start: day 3, window 0
    hist[2::288] = 300
    burst = 300.0 + np.linspace(0, 299, 300)
    sc = scenario(burst, history=hist, start=3 * DAY + 300, duration=900.0)
    ws, _ = run_policy(sc, "warmserve")
    assert ttft(ws)[0] < 0.2  # resident before the first request
    assert np.percentile(ttft(ws), 99) < sc.functions[0].slo_ttft_s
    # without the history nothing is predicted: the first request pays the copy (reactive scale-up)
    cold, _ = run_policy(scenario(burst, start=3 * DAY + 300, duration=900.0), "warmserve")
    assert ttft(cold)[0] >= load_time()
    od, _ = run_policy(sc, "ondemand")
    assert ttft(od)[0] >= load_time() + PROFILE.cold_engine_start_s


@pytest.fixture(scope="module")
def small():
    return paper_setup.build(6.0, seed=1, duration_s=300.0)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_request_finishes_exactly_once_and_memory_fits(small, policy):
    sim, s = run_policy(small, policy, sample_s=1.0)
    n = len(small.workload)
    # _done raises on a second finish of one request; ollama answers 503 once its queue is full
    assert sim.completed + sim.counters["refused"] + sim.counters["dropped"] == n
    served = ~np.isnan(sim.first_token)
    assert served.sum() == sim.completed and not np.isnan(sim.finish[served]).any()
    assert np.all(sim.first_token[served] >= sim.w.t[served]) and np.all(sim.finish[served] >= sim.first_token[served])
    assert sim.max_mem_frac <= 1.0 + 1e-9
    assert all(sim.weights[g] >= -1 and sim.kv[g] >= -1 for g in range(sim.n_gpus))
    assert set(s) >= {
        "policy",
        "requests",
        "ttft_p50_s",
        "ttft_p99_s",
        "slo_attainment",
        "throughput_rps",
        "gpu_seconds",
    }
    assert s["policy"] == policy and 0.0 <= s["slo_attainment"] <= 1.0


def test_deterministic_with_a_seed():
    def go(seed):
        _, s = run_policy(paper_setup.build(8.0, seed=seed, duration_s=300.0), "warmserve")
        return {k: v for k, v in s.items() if k != "wall_s"}

    assert go(3) == go(3)
    assert go(3) != go(4)


def test_warmserve_policy_plans_with_the_live_warmers_settings():
    # The simulated warmer must be the deployed one: same forecaster, windows, lead, interval and history.
    live = (DEFAULTS.window_s, DEFAULTS.lead_s, DEFAULTS.warmer_interval_s, DEFAULTS.history_windows)
    forecaster = make_forecaster(DEFAULTS.forecast_method, window_s=DEFAULTS.window_s)
    for pol in (WarmServe(np.zeros((1, 1))), make_policy("warmserve", scenario([1.0]))):
        assert (pol.window_s, pol.lead_s, pol.tick_s, pol.history_windows) == live
        assert pol.forecaster == forecaster
    assert paper_setup.build(4.0, duration_s=60.0).settings == DEFAULTS
    assert _parser().parse_args(["run"]).forecast == DEFAULTS.forecast_method


def test_model_sizes_are_modelinfos():
    for name, (raw, tp) in CONFIGS.items():
        cfg = config_from_dict(raw)
        m = MODELS[name]
        assert (m.weight_bytes, m.kv_bytes_per_token, m.tp) == (
            cfg.weight_bytes("bfloat16"),
            cfg.kv_bytes_per_token("bfloat16"),
            tp,
        )
    assert MODELS["llama-70b"].kv_bytes_per_token == 2 * 80 * 8 * 128 * 2  # GQA: 8 KV heads of 128
    assert MODELS["llama-7b"].params == pytest.approx(6.74e9, rel=1e-3)  # Llama-2-7B's published size


def test_cli_run_writes_summaries(tmp_path):
    out = tmp_path / "r.json"
    assert main(["run", "--rate", "4", "--duration", "200", "--policies", "ondemand,static", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["policy"] for r in rows] == ["ondemand", "static"]
    assert main(["run", "--profile", str(tmp_path / "missing.json")]) == 2
    with pytest.raises(SystemExit):
        main(["run", "--policies", "nope"])


def test_bad_inputs_name_file_and_field(tmp_path):
    bad = tmp_path / "p.json"
    d = json.loads((paper_setup.DEFAULT_PROFILE).read_text())
    del d["links"]["pcie_h2d_bytes_per_s"]
    bad.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="links.pcie_h2d_bytes_per_s"):
        load_profile(bad)
    bad.write_text(json.dumps(d | {"models": {}}))
    with pytest.raises(ValueError, match="sim/models.py"):  # sizes come from modelinfo, never a second source
        load_profile(bad)
    csv = tmp_path / "t.csv"
    csv.write_text("TIMESTAMP,Tokens\n2023-11-16 18:15:46.68,3\n")
    with pytest.raises(ValueError, match="t.csv"):
        load_azure(csv)


def test_powerlaw_shares():
    w = powerlaw(4, 2.0)
    assert w.sum() == pytest.approx(1.0) and w[0] / w[1] == pytest.approx(4.0)


def test_servegen_envelope_day_scenario_runs():
    sc = paper_setup.build(4.0, seed=2, duration_s=600.0, envelope="servegen", start_s=7 * DAY + 14 * 3600)
    assert sc.history.shape == (len(sc.functions), (7 * DAY + 14 * 3600) // 300)
    sim, s = run_policy(sc, "warmserve")
    assert sim.completed == len(sc.workload) and s["requests"] > 0
    with pytest.raises(ValueError, match="envelope"):
        paper_setup.build(4.0, envelope="weekly")


def test_same_seed_replays_exactly_in_another_process(tmp_path):
    # Within one process object addresses tend to repeat; across processes they do not, so this catches any
    # decision that depends on them (e.g. iterating a set of instances).
    import os
    import subprocess
    import sys

    def go(i: int) -> list[dict]:
        out = tmp_path / f"{i}.json"
        cmd = [sys.executable, "-m", "sim", "run", "--rate", "12", "--duration", "300", "--json", str(out),
               "--policies", "warmserve,static,ondemand,ollama"]  # fmt: skip
        env = os.environ | {"PYTHONHASHSEED": str(i)}
        subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=paper_setup.DEFAULT_PROFILE.parents[2])
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in json.loads(out.read_text())]

    assert go(1) == go(2)
