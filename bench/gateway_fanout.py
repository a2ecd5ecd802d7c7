"""How many answer events one gateway process relays to thousands of concurrent streaming clients.

Answers come from bench/fake_worker.py, in a process of its own, which writes answer events straight to Redis: the
gateway's fan-out (one XREAD over every waiting request's answer stream, a queue per request, SSE to each client)
is what is measured, not an engine. The fake worker answers nothing until every request is accepted and waiting,
so all `--streams` clients hold a stream at the same moment; then it writes one token per stream per round as
fast as Redis takes them. Clients are asyncio + httpx, split over `--client-procs` processes. Everything runs on
this machine's CPU: redis-server (no persistence), the gateway (one uvicorn process), the fake worker, the clients.

    python3 bench/gateway_fanout.py --streams 2000 --tokens 32 --out bench/results/gateway_fanout.json

Reported: errors (anything but a complete answer with one [DONE]), events relayed per second between the first
token any client received and the last [DONE], the gateway's CPU seconds per 1,000 events, and the Redis
connections open while every request waited.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import orjson  # noqa: E402
import redis  # noqa: E402

from bench.fake_worker import FakeWorker, token_text  # noqa: E402
from protocol import keys  # noqa: E402
from warmserve.tinymodel import build_tiny_llama  # noqa: E402

FN = "fanout"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(check, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise TimeoutError(what)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_stream(client: httpx.AsyncClient, url: str, tokens: int) -> dict:
    body = {"model": FN, "prompt": [1, 2, 3], "max_tokens": tokens, "stream": True}
    text, events, dones, first = [], 0, 0, None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                return {"error": f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"}
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    dones += 1
                elif line.startswith("data: "):
                    chunk = orjson.loads(line[6:])
                    if "error" in chunk:
                        return {"error": str(chunk["error"])[:200]}
                    first = first or time.time()
                    events += 1
                    text.append(chunk["choices"][0]["text"])
    except httpx.HTTPError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    if dones != 1 or "".join(text) != "".join(token_text(i) for i in range(tokens)):
        return {"error": f"incomplete answer: {dones} [DONE], {len(text)} chunks"}
    return {"first": first, "last": time.time(), "events": events}


def client_proc(url: str, streams: int, tokens: int, out: mp.Queue) -> None:
    async def run() -> list[dict]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=300) as client:
            return await asyncio.gather(*(one_stream(client, url, tokens) for _ in range(streams)))

    out.put(asyncio.run(run()))


def fake_worker_proc(redis_url: str, hold: int, stop: mp.Event) -> None:
    flag = threading.Event()
    threading.Thread(target=lambda: (stop.wait(), flag.set()), daemon=True).start()
    FakeWorker(redis_url, [FN], hold=hold, hold_s=120).run(flag)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=32, help="token events per answer")
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fanout-"))
    rport, gport = free_port(), free_port()
    redis_url, url = f"redis://127.0.0.1:{rport}/0", f"http://127.0.0.1:{gport}"
    procs = [subprocess.Popen(["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no",
                               "--dir", str(tmp), "--maxclients", "20000"], stdout=subprocess.DEVNULL)]  # fmt: skip
    stop = mp.Event()
    try:
        r = redis.Redis.from_url(redis_url)
        wait(r.ping, "redis-server")
        os.environ["WARMSERVE_CACHE"] = str(tmp)  # model paths must lie in the gateway's model roots
        build_tiny_llama(tmp / "models" / "tiny-llama")  # only its tokenizer is used, by the gateway
        gw_log = open(tmp / "gateway.log", "w")  # noqa: SIM115
        gateway = subprocess.Popen([sys.executable, "-m", "warmserve.cli", "gateway", "--redis", redis_url,
                                    "--port", str(gport)], stdout=gw_log, stderr=subprocess.STDOUT)  # fmt: skip
        procs.append(gateway)
        wait(lambda: httpx.get(f"{url}/healthz").status_code == 200, "gateway")
        spec = {"name": FN, "model": "cache:tiny-llama", "max_model_len": 1024, "scaling": {"max_queue": 100_000}}
        resp = httpx.post(f"{url}/functions", json=spec)
        assert resp.status_code == 201, resp.text
        worker = mp.Process(target=fake_worker_proc, args=(redis_url, args.streams, stop), daemon=True)
        worker.start()
        wait(lambda: r.zscore(keys.WORKERS, "fake-worker") is not None, "fake worker")

        out: mp.Queue = mp.Queue()
        share = [args.streams // args.client_procs + (i < args.streams % args.client_procs)
                 for i in range(args.client_procs)]  # fmt: skip
        clients = [mp.Process(target=client_proc, args=(url, n, args.tokens, out)) for n in share]
        t0 = time.time()
        for c in clients:
            c.start()
        wait(lambda: r.xlen(keys.invocations(FN)) >= args.streams, "every request accepted", 300)
        accepted_s = time.time() - t0
        connections = int(r.info("clients")["connected_clients"])
        cpu0 = cpu_seconds(gateway.pid)
        results = [x for _ in clients for x in out.get(timeout=600)]
        cpu = cpu_seconds(gateway.pid) - cpu0
        for c in clients:
            c.join()
    finally:
        stop.set()
        for p in reversed(procs):
            p.terminate()
            p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    ok = [x for x in results if "error" not in x]
    errors = [x["error"] for x in results if "error" in x]
    window = max(x["last"] for x in ok) - min(x["first"] for x in ok) if ok else float("nan")
    events = sum(x["events"] for x in ok)
    report = {
        "date": datetime.date.today().isoformat(),
        "device": f"CPU only, {os.cpu_count()} cores shared by redis-server, the gateway, fake worker and clients",
        "command": "python3 bench/gateway_fanout.py " + " ".join(sys.argv[1:]),
        "answers_from": "bench/fake_worker.py (answer events written straight to Redis; no engine)",
        "streams": args.streams,
        "tokens_per_answer": args.tokens,
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "all_accepted_s": round(accepted_s, 2),
        "redis_connections_while_all_wait": connections,
        "relay_window_s": round(window, 3),
        "events_relayed": events,
        "events_per_s": round(events / window),
        "gateway_cpu_s": round(cpu, 2),
        "gateway_cpu_ms_per_1000_events": round(1000 * cpu / max(events, 1) * 1000, 1),
        "answer_time_s_p50": round(statistics.median(x["last"] - x["first"] for x in ok), 3) if ok else None,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
