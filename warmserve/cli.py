"""`warmserve`: run the stack (`up`, or each process alone) and manage functions through the gateway."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import httpx
import orjson

from functions.spec import SpecError, load_file

DEFAULT_URL = os.environ.get("WARMSERVE_URL", "http://127.0.0.1:8000")
DEFAULT_REDIS = os.environ.get("WARMSERVE_REDIS", "redis://127.0.0.1:6379/0")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def call(method: str, url: str, **kw) -> httpx.Response:
    try:
        return httpx.request(method, url, timeout=kw.pop("timeout", 60.0), **kw)
    except httpx.HTTPError as exc:
        raise SystemExit(f"error: cannot reach the gateway at {url}: {exc}") from None


def error_text(resp: httpx.Response) -> str:
    try:
        return resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return resp.text


# ---- process commands ----
def cmd_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from protocol.settings import Settings

    settings = Settings.from_env(**({"request_timeout_s": args.request_timeout} if args.request_timeout else {}))
    uvicorn.run(create_app(args.redis, settings), host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.process import Worker

    memory = {}
    if args.gpu_bytes:
        memory["gpu_bytes"] = args.gpu_bytes
    if args.host_cache_bytes:
        memory["host_cache_bytes"] = args.host_cache_bytes
    Worker(args.redis, args.device, args.worker_id, **memory).run()
    return 0


def cmd_warmer(args: argparse.Namespace) -> int:
    from protocol.settings import Settings
    from warmer.loop import run_warmer

    run_warmer(args.redis, Settings.from_env(**({"warmer_interval_s": args.interval} if args.interval else {})))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from warmserve.up import up

    return up(args)


# ---- client commands ----
def cmd_deploy(args: argparse.Namespace) -> int:
    try:
        spec = load_file(args.file)  # resolve paths relative to the file, and fail here with the file's name
    except SpecError as exc:
        return fail(str(exc))
    resp = call("POST", f"{args.url}/functions", content=spec.to_json(), headers={"content-type": "application/json"})
    if resp.status_code >= 400:
        return fail(f"{args.file}: {error_text(resp)}")
    print(f"{'deployed' if resp.json()['created'] else 'updated'} {spec.name} ({spec.engine}, {spec.model})")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    fns = call("GET", f"{args.url}/functions").json()["functions"]
    status = call("GET", f"{args.url}/status").json()["functions"]
    print(f"{'NAME':24} {'ENGINE':12} {'DTYPE':9} {'MAX_LEN':>7} {'QUEUE':>5}  MODEL")
    for f in fns:
        depth = status.get(f["name"], {}).get("queue_depth", 0)
        print(f"{f['name']:24} {f['engine']:12} {f['dtype']:9} {f['max_model_len']:>7} {depth:>5}  {f['model']}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    resp = call("DELETE", f"{args.url}/functions/{args.name}")
    if resp.status_code >= 400:
        return fail(error_text(resp))
    print(f"removed {args.name}")
    return 0


def cmd_invoke(args: argparse.Namespace) -> int:
    body: dict = {"model": args.name, "max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": args.prompt}]
    else:
        path, body["prompt"] = "/v1/completions", args.prompt
    if not args.stream:
        resp = call("POST", f"{args.url}{path}", json=body, timeout=args.timeout)
        if resp.status_code >= 400:
            return fail(error_text(resp))
        choice = resp.json()["choices"][0]
        print(choice["message"]["content"] if args.chat else choice["text"])
        return 0
    body["stream"] = True
    try:
        with httpx.stream("POST", f"{args.url}{path}", json=body, timeout=args.timeout) as resp:
            if resp.status_code >= 400:
                resp.read()
                return fail(error_text(resp))
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = orjson.loads(line[6:])
                if "error" in chunk:
                    return fail(chunk["error"]["message"])
                for choice in chunk["choices"]:
                    text = choice.get("delta", {}).get("content") if args.chat else choice.get("text")
                    print(text or "", end="", flush=True)
    except httpx.HTTPError as exc:
        return fail(f"stream broke: {exc}")
    print()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = call("GET", f"{args.url}/status").json()
    print(f"{len(st['workers'])} live worker(s)")
    for w in st["workers"]:
        gib = 1 << 30
        print(
            f"  {w['worker_id']}  device={w['device']}"
            f"  free={w['free_bytes'] / gib:.2f}/{w['total_bytes'] / gib:.2f} GiB"
            f"  lendable_kv={w['lendable_kv_bytes'] / gib:.2f} GiB"
        )
        for fn, state in sorted(w["models"].items()):
            print(f"    {fn:24} {state:5} inflight={w['inflight'].get(fn, 0)}")
    print("functions")
    for fn, info in sorted(st["functions"].items()):
        where = ", ".join(f"{wid}:{s}" for wid, s in info["states"].items()) or "no workers"
        print(f"  {fn:24} queue={info['queue_depth']:<4} {where}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="warmserve", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    def with_url(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--url", default=DEFAULT_URL, help="gateway URL (env WARMSERVE_URL)")
        return sp

    up = sub.add_parser("up", help="the whole stack on this machine")
    up.add_argument("--redis", default=None, help="use this Redis instead of the embedded server")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--functions", default=None, help="directory of function YAMLs to deploy (default: examples)")
    up.add_argument("--device", default=None, help="worker device (default: one worker per GPU, else cpu)")
    up.set_defaults(fn=cmd_up)

    gw = sub.add_parser("gateway", help="run the HTTP gateway")
    gw.add_argument("--redis", default=DEFAULT_REDIS)
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8000)
    gw.add_argument("--request-timeout", type=float, default=None, help="seconds (default: settings)")
    gw.set_defaults(fn=cmd_gateway)

    wk = sub.add_parser("worker", help="run one worker for one device")
    wk.add_argument("--redis", default=DEFAULT_REDIS)
    wk.add_argument("--device", default="cpu", help="cpu or cuda:N")
    wk.add_argument("--worker-id", default=None)
    wk.add_argument("--gpu-bytes", type=int, default=None, help="pool size on the device")
    wk.add_argument("--host-cache-bytes", type=int, default=None, help="pinned host cache size")
    wk.set_defaults(fn=cmd_worker)

    wm = sub.add_parser("warmer", help="run the predictive warmer")
    wm.add_argument("--redis", default=DEFAULT_REDIS)
    wm.add_argument("--interval", type=float, default=None, help="seconds between plans (default: settings)")
    wm.set_defaults(fn=cmd_warmer)

    # `sim` hands all its arguments to the simulator's own parser (see main)
    sub.add_parser("sim", help="cluster simulator (see `warmserve sim --help`)", add_help=False)

    dp = with_url(sub.add_parser("deploy", help="deploy (or update) a function from YAML"))
    dp.add_argument("file")
    dp.set_defaults(fn=cmd_deploy)
    with_url(sub.add_parser("ls", help="list functions")).set_defaults(fn=cmd_ls)
    rm = with_url(sub.add_parser("rm", help="remove a function"))
    rm.add_argument("name")
    rm.set_defaults(fn=cmd_rm)
    iv = with_url(sub.add_parser("invoke", help="call a function"))
    iv.add_argument("name")
    iv.add_argument("prompt")
    iv.add_argument("--stream", action="store_true")
    iv.add_argument("--chat", action="store_true", help="use the chat endpoint (applies the chat template)")
    iv.add_argument("--max-tokens", type=int, default=32)
    iv.add_argument("--temperature", type=float, default=0.0)
    iv.add_argument("--timeout", type=float, default=300.0)
    iv.set_defaults(fn=cmd_invoke)
    with_url(sub.add_parser("status", help="workers, devices, model states, queue depths")).set_defaults(fn=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sim"]:
        from sim.cli import main as sim_main

        setup_logging()
        return sim_main(argv[1:])
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
