"""`warmserve`: run the stack (`up`, or each process alone) and manage functions through the gateway."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import httpx
import orjson

from functions.spec import SpecError, load_document

DEFAULT_URL = os.environ.get("WARMSERVE_URL", "http://127.0.0.1:8000")
DEFAULT_REDIS = os.environ.get("WARMSERVE_REDIS", "redis://127.0.0.1:6379/0")
API_KEY = os.environ.get("WARMSERVE_API_KEY")  # sent as a Bearer token by every client command
# `up`'s embedded Redis port when none is given: fixed, so the README's `redis-cli -p 16379` lines reach it, and
# not 6379, so it never collides with a Redis the machine already runs.
REDIS_PORT = 16379


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:  # one INFO line per HTTP call from httpx is noise in a CLI; -v shows it
        logging.getLogger("httpx").setLevel(logging.WARNING)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def call(method: str, url: str, **kw) -> httpx.Response:
    headers = {**kw.pop("headers", {}), **({"authorization": f"Bearer {API_KEY}"} if API_KEY else {})}
    try:
        return httpx.request(method, url, timeout=kw.pop("timeout", 60.0), headers=headers, **kw)
    except httpx.HTTPError as exc:
        raise SystemExit(f"error: cannot reach the gateway at {url}: {exc}") from None


def error_text(resp: httpx.Response) -> str:
    try:
        return resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return resp.text


# ---- process commands ----
def cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.app import create_app
    from gateway.serve import is_loopback, serve
    from protocol.settings import Settings

    settings = Settings.from_env(**({"request_timeout_s": args.request_timeout} if args.request_timeout else {}))
    # reachable from other machines: keys unless the operator says otherwise, in so many words
    require_keys = args.auth if args.auth is not None else not is_loopback(args.host)
    if not require_keys:
        logging.getLogger("warmserve.gateway").warning(
            "gateway on %s:%s is OPEN: no API key needed, every caller is an admin", args.host, args.port
        )
    serve(create_app(args.redis, settings, require_keys=require_keys), args.host, args.port, settings)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    import redis

    from gateway import apikeys

    r = redis.Redis.from_url(args.redis)
    if args.keys_command == "create":
        functions = tuple(f for f in (args.functions or "").split(",") if f)
        try:
            key, token = apikeys.create(r, args.scope, functions, args.rpm, args.tpm, args.label)
        except ValueError as exc:
            return fail(str(exc))
        print(f"created {key.scope} key {key.id} ({', '.join(key.functions) or 'all functions'}); shown only once:")
        print(token)
    elif args.keys_command == "ls":
        print(f"{'ID':12} {'SCOPE':6} {'RPM':>7} {'TPM':>9}  {'CREATED':19}  {'LABEL':16} FUNCTIONS")
        for k in apikeys.list_keys(r):
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(k.created))
            rpm, tpm = ("default" if v is None else v for v in (k.rpm, k.tpm))
            print(f"{k.id:12} {k.scope:6} {rpm:>7} {tpm:>9}  {created:19}  {k.label:16} {','.join(k.functions) or '*'}")
    elif not apikeys.revoke(r, args.id):
        return fail(f"no key {args.id}")
    else:
        print(f"revoked {args.id}")
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

    settings = Settings.from_env(**({"warmer_interval_s": args.interval} if args.interval else {}))
    run_warmer(args.redis, settings, args.policy)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from warmserve.up import up

    return up(args)


# ---- client commands ----
def cmd_deploy(args: argparse.Namespace) -> int:
    try:
        doc = load_document(args.file)  # checked here first, so an error names the file
    except SpecError as exc:
        return fail(str(exc))
    resp = call(
        "POST", f"{args.url}/functions", content=orjson.dumps(doc), headers={"content-type": "application/json"}
    )
    if resp.status_code >= 400:
        return fail(f"{args.file}: {error_text(resp)}")
    got = resp.json()
    spec = got["spec"]
    print(f"{'deployed' if got['created'] else 'updated'} {spec['name']} ({spec['engine']}, {spec['model']})")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    resp = call("GET", f"{args.url}/functions")
    if resp.status_code >= 400:
        return fail(error_text(resp))
    fns = resp.json()["functions"]
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
        headers = {"authorization": f"Bearer {API_KEY}"} if API_KEY else {}
        with httpx.stream("POST", f"{args.url}{path}", json=body, timeout=args.timeout, headers=headers) as resp:
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
    resp = call("GET", f"{args.url}/status")
    if resp.status_code >= 400:
        return fail(error_text(resp))
    st = resp.json()
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
    redis_choice = up.add_mutually_exclusive_group()  # a port for the embedded server, or a Redis of one's own
    redis_choice.add_argument("--redis", default=None, help="use this Redis instead of the embedded server")
    redis_choice.add_argument(
        "--redis-port", type=int, default=REDIS_PORT, help=f"the embedded server's port (default {REDIS_PORT})"
    )
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--functions", default=None, help="directory of function YAMLs to deploy (default: examples)")
    up.add_argument("--device", default=None, help="worker device (default: one worker per GPU, else cpu)")
    up.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require API keys (default: only when --host is not loopback); up creates an admin key and prints it",
    )
    up.set_defaults(fn=cmd_up)

    gw = sub.add_parser("gateway", help="run the HTTP gateway")
    gw.add_argument("--redis", default=DEFAULT_REDIS)
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8000)
    gw.add_argument("--request-timeout", type=float, default=None, help="seconds (default: settings)")
    gw.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require API keys (default: required unless --host is loopback; --no-auth runs open)",
    )
    gw.set_defaults(fn=cmd_gateway)

    ks = sub.add_parser("keys", help="API keys: create, ls, revoke (straight in Redis)")
    ks.add_argument("--redis", default=DEFAULT_REDIS)
    ks_sub = ks.add_subparsers(dest="keys_command", required=True)
    kc = ks_sub.add_parser("create", help="a new key; printed once, alone on the last line")
    kc.add_argument("--scope", choices=("admin", "invoke"), required=True)
    kc.add_argument("--functions", default=None, help="invoke keys: only these functions (comma-separated)")
    kc.add_argument("--rpm", type=int, default=None, help="requests per minute (default: settings; 0: unlimited)")
    kc.add_argument("--tpm", type=int, default=None, help="tokens per minute (default: settings; 0: unlimited)")
    kc.add_argument("--label", default="", help="a note for `keys ls`")
    ks_sub.add_parser("ls", help="every key (never the secret)")
    kr = ks_sub.add_parser("revoke", help="delete a key: refused from the next request on")
    kr.add_argument("id")
    ks.set_defaults(fn=cmd_keys)

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
    # the simulator's policies (sim/scenario.py POLICIES) but always-warm, which needs GPUs the cluster lacks
    wm.add_argument(
        "--policy",
        choices=("warmserve", "ondemand", "ondemand-tuned", "serverlessllm", "ollama", "static"),
        default="warmserve",
        help="warmserve, or a baseline as the simulator runs it (docs/benchmarks.md, Live replay)",
    )
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
