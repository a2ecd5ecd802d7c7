"""The HTTP face of WarmServe: OpenAI-compatible inference plus function CRUD, on Starlette.

The gateway holds no state of its own beyond caches: functions live in Redis, invocations go to Redis streams,
answers come back on per-request streams. Any number of gateways can run side by side.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import anyio
import orjson
import redis
import redis.asyncio as aredis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from functions.spec import FunctionSpec, SpecError, model_roots, parse_spec, parse_yaml, quote
from gateway import auth
from gateway.answers import Assembly, merged, resumed
from gateway.body import read_body
from gateway.errors import ApiError
from gateway.metrics import Metrics
from gateway.openai_api import Parsed, parse_chat, parse_completion
from gpu_runtime.tokenizer import Tokenizer
from invoker.fanout import AnswerReader
from invoker.registry import Registry
from invoker.submit import Accepted, Answer, InvokerClient, NoWorkers, QueueFull, TooLarge, live_workers
from protocol import keys
from protocol.messages import Failed, Invocation, Token
from protocol.settings import Settings
from protocol.states import ModelState

log = logging.getLogger(__name__)
REDIS_RETRY_AFTER_S = 2  # a Redis restart with append-only persistence takes about this long


def json_response(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def sse_data(body: dict) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


def refusal(exc: Exception) -> ApiError:
    """The HTTP error for an invocation the invoker would not accept."""
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), code="queue_full", retry_after=exc.retry_after_s)
    if isinstance(exc, TooLarge):
        return ApiError(400, str(exc), param=exc.param, code="request_too_large")
    return ApiError(503, str(exc), code="no_workers", retry_after=5)


class Gateway:
    def __init__(self, redis_url: str, settings: Settings) -> None:
        self.settings = settings
        # a bounded pool: under thousands of requests a command waits for a connection instead of failing
        self.r = aredis.Redis(
            connection_pool=aredis.BlockingConnectionPool.from_url(
                redis_url, max_connections=settings.redis_connections
            )
        )
        self.sync_r = redis.Redis.from_url(redis_url)
        self.registry = Registry(self.sync_r)
        self.invoker = InvokerClient(
            self.r, self.sync_r, settings, AnswerReader(aredis.Redis.from_url(redis_url), self.r)
        )
        self.metrics = Metrics()
        self.tokenizers: dict[tuple[str, str], Tokenizer] = {}
        self.roots = model_roots(settings.model_roots)

    # ---- helpers ----
    async def spec(self, name: object, caller: auth.Principal = auth.OPEN_ACCESS) -> FunctionSpec:
        if not isinstance(name, str) or not name:
            raise ApiError(400, "'model' is required: the name of a deployed function", param="model")
        # a function the caller's key may not call is answered exactly like one that does not exist
        raw = await self.r.hget(keys.FUNCTIONS, name) if caller.allows(name) else None
        if raw is None:
            raise ApiError(
                404,
                f"function {quote(name)} is not deployed (see GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        try:
            return FunctionSpec.from_json(raw)
        except SpecError as exc:
            log.error("function %s: its registry entry is not a valid spec: %s", quote(name), exc)
            message = f"function {quote(name)}: its registry entry is invalid (see the gateway log)"
            raise ApiError(500, message) from None

    def tokenizer(self, spec: FunctionSpec) -> Tokenizer:
        """The function's tokenizer; a broken one is our fault (500 naming the function), not the client's."""
        key = (spec.name, spec.model)
        if key not in self.tokenizers:
            try:
                self.tokenizers[key] = Tokenizer.from_pretrained(spec.model)
            except Exception as exc:
                log.exception("function %s: cannot load its tokenizer", spec.name)
                raise ApiError(500, f"function '{spec.name}': cannot load its tokenizer: {exc}") from None
        return self.tokenizers[key]

    async def body_json(self, request: Request) -> dict:
        raw = await read_body(request, self.settings.max_body_bytes, self.settings.body_timeout_s)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"request body is not valid JSON: {str(exc)[:100]}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    # ---- inference ----
    async def completions(self, request: Request) -> Response:
        return await self.infer(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self.infer(request, chat=True)

    async def infer(self, request: Request, chat: bool) -> Response:
        name, received = "?", time.monotonic()
        caller = auth.principal(request)
        try:
            body = await self.body_json(request)
            spec = await self.spec(body.get("model"), caller)
            name = spec.name
            # loading a tokenizer, tokenizing and chat templates are CPU work: keep them off the event loop that
            # streams answers (a loaded tokenizer is just looked up: a thread's hop costs a busy loop's turn)
            tok = self.tokenizers.get((spec.name, spec.model)) or await asyncio.to_thread(self.tokenizer, spec)
            parsed = await asyncio.to_thread(parse_chat if chat else parse_completion, body, spec, tok)
            await auth.charge_tokens(self.r, self.settings, caller, parsed.budget)
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            accepted = await self.submit(spec, rid, parsed)
            self.metrics.part("accept", time.monotonic() - received)
            answer = Assembly(rid, spec.name, parsed, tok, chat)
            state = accepted[0].state
            if parsed.stream:
                resp = await self.stream(spec, answer, accepted, caller, state)
            else:
                resp = await self.collect(spec, answer, accepted, state)
            resp.headers["x-warmserve-state"] = state  # where its model was on arrival: HOT ... COLD
            return resp
        except ApiError as err:
            self.metrics.request(name, err.status)
            return auth.redacted(err, caller).response()

    async def submit(self, spec: FunctionSpec, rid: str, parsed: Parsed) -> list[Accepted]:
        """One invocation per prompt, all accepted or none: those queued before a refusal are cancelled."""
        ids = [rid] if len(parsed.prompts) == 1 else [f"{rid}-{i}" for i in range(len(parsed.prompts))]
        accepted: list[Accepted] = []
        try:
            for request_id, prompt in zip(ids, parsed.prompts, strict=True):
                inv = Invocation(request_id, spec.name, prompt.ids, parsed.sampling)
                accepted.append(await self.invoker.submit(inv, spec))
        except (QueueFull, NoWorkers, TooLarge) as exc:
            for done in accepted:
                await self.invoker.cancel(done.inv.request_id)
            raise refusal(exc) from None
        return accepted

    def answer_streams(self, spec: FunctionSpec, accepted: list[Accepted], stream: bool) -> list[AsyncIterator[Answer]]:
        timeout = self.settings.request_timeout_s
        return [
            self.invoker.events(spec, a.inv.request_id, timeout, restartable=not stream, accepted=a) for a in accepted
        ]

    async def finish(
        self, events: AsyncIterator, streams: list[AsyncIterator[Answer]], answer: Assembly, accepted: list[Accepted]
    ) -> None:
        """Close an answer's readers, and stop the prompts still generating (the client went away, or another of
        its prompts failed)."""
        await events.aclose()
        for s in streams:
            await s.aclose()
        for a, prompt in zip(accepted, answer.answers, strict=True):
            if prompt.running():
                await self.invoker.cancel(a.inv.request_id)
            elif a.answered_at:
                self.metrics.part("answer_end", time.time() - a.answered_at)

    async def collect(self, spec: FunctionSpec, answer: Assembly, accepted: list[Accepted], state: str) -> Response:
        t0, streams = time.monotonic(), self.answer_streams(spec, accepted, stream=False)
        events, first = merged(streams), True
        try:
            async for i, ev in events:
                answer.add(i, ev)
                if isinstance(ev, Failed):
                    raise ApiError(ev.status, ev.message)
                if first and isinstance(ev, Token):
                    first = False
                    self.metrics.first_token(spec.name, time.monotonic() - t0, state)
        finally:
            await self.finish(events, streams, answer, accepted)
        if not answer.complete():
            raise ApiError(500, f"function '{spec.name}': the answer stream ended without a result")
        self.metrics.request(spec.name, 200)
        self.metrics.generated(spec.name, answer.usage()["completion_tokens"])
        return json_response(answer.body())

    async def stream(
        self, spec: FunctionSpec, answer: Assembly, accepted: list[Accepted], caller: auth.Principal, state: str
    ) -> Response:
        t0, streams = time.monotonic(), self.answer_streams(spec, accepted, stream=True)
        events, early = merged(streams), []
        try:  # an error before any token still gets its HTTP status: wait until every prompt's answer has begun
            async for i, ev in events:
                if isinstance(ev, Failed):
                    answer.add(i, ev)
                    raise ApiError(ev.status, ev.message)
                early.append((i, ev))
                if len({j for j, _ in early}) == len(streams):
                    break
        except BaseException:
            await self.finish(events, streams, answer, accepted)
            raise

        async def sse() -> AsyncIterator[bytes]:
            first, rest = True, resumed(early, events)
            try:
                async for i, ev in rest:
                    chunks = answer.add(i, ev)
                    if isinstance(ev, Failed):
                        yield sse_data(auth.redacted(ApiError(ev.status, ev.message), caller).body())
                        self.metrics.request(spec.name, ev.status)
                        break
                    if first and isinstance(ev, Token):
                        first = False
                        self.metrics.first_token(spec.name, time.monotonic() - t0, state)
                    for choice in chunks:
                        yield sse_data(
                            answer.chunk([choice], answer.usage() if answer.parsed.continuous_usage else None)
                        )
                else:
                    if answer.parsed.include_usage:
                        yield sse_data(answer.chunk([], answer.usage()))
                    self.metrics.request(spec.name, 200)
                    self.metrics.generated(spec.name, answer.usage()["completion_tokens"])
                yield b"data: [DONE]\n\n"
            finally:
                # Starlette cancels this generator when the client disconnects; without a shield every await
                # here would be cancelled too and the worker would generate for nobody.
                with anyio.CancelScope(shield=True):
                    await rest.aclose()
                    await self.finish(events, streams, answer, accepted)

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @staticmethod
    def model_card(spec: FunctionSpec) -> dict:
        return {
            "id": spec.name,
            "object": "model",
            "created": 0,
            "owned_by": "warmserve",
            "max_model_len": spec.max_model_len,
        }

    async def models(self, request: Request) -> Response:
        caller = auth.principal(request)
        specs = {n: s for n, s in (await asyncio.to_thread(self.registry.all)).items() if caller.allows(n)}
        return json_response({"object": "list", "data": [self.model_card(s) for s in specs.values()]})

    async def model(self, request: Request) -> Response:
        """GET /v1/models/{id}: one function as an OpenAI model object, or 404."""
        try:
            spec = await self.spec(request.path_params["name"], auth.principal(request))
        except ApiError as err:
            return err.response()
        return json_response(self.model_card(spec))

    # ---- function CRUD ----
    def parse_deploy(self, raw: bytes, fmt: str) -> FunctionSpec:
        """A deploy body into a spec whose model lies inside the model roots (runs in a thread: YAML and disk)."""
        if fmt == "yaml":
            return parse_yaml(raw.decode("utf-8", errors="replace"), "request body", roots=self.roots)
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"request body is not valid JSON: {str(exc)[:100]}") from None
        return parse_spec(doc, "request body", roots=self.roots)

    async def deploy(self, request: Request) -> Response:
        try:
            fmt = spec_format(request.headers.get("content-type", ""))
            raw = await read_body(request, self.settings.max_spec_bytes, self.settings.body_timeout_s)
            spec = await asyncio.to_thread(self.parse_deploy, raw, fmt)
            name = request.path_params.get("name")
            if name is not None and name != spec.name:
                raise ApiError(400, f"URL names {quote(name)} but the spec names '{spec.name}'", param="name")
            created = await asyncio.to_thread(self.registry.deploy, spec)
        except SpecError as err:
            return ApiError(400, str(err), param=err.field).response()
        except ApiError as err:
            return err.response()
        log.info(
            "%s function %s (model %s, engine %s)",
            "deployed" if created else "updated",
            spec.name,
            spec.model,
            spec.engine,
        )
        return json_response(
            {"name": spec.name, "created": created, "spec": orjson.loads(spec.to_json())},
            201 if created else 200,
        )

    async def list_functions(self, request: Request) -> Response:
        specs = await asyncio.to_thread(self.registry.all)
        return json_response({"functions": [orjson.loads(s.to_json()) for s in specs.values()]})

    async def get_function(self, request: Request) -> Response:
        try:
            spec = await self.spec(request.path_params["name"])
        except ApiError as err:
            return err.response()
        return json_response(orjson.loads(spec.to_json()))

    async def delete_function(self, request: Request) -> Response:
        name = request.path_params["name"]
        if not await asyncio.to_thread(self.registry.remove, name):
            return ApiError(404, f"function {quote(name)} is not deployed").response()
        log.info("removed function %s", name)
        return json_response({"name": name, "deleted": True})

    # ---- operations ----
    async def healthz(self, request: Request) -> Response:
        try:
            await self.r.ping()
        except redis.RedisError as exc:
            return json_response({"status": "error", "redis": str(exc)}, 503)
        return json_response({"status": "ok"})

    async def queue_depths(self) -> dict[str, int]:
        names = [k.decode() for k in await self.r.hkeys(keys.FUNCTIONS)]
        depths = await asyncio.gather(*(self.invoker.queue_depth(n) for n in names))
        return dict(zip(names, depths, strict=True))

    async def metrics_endpoint(self, request: Request) -> Response:
        depths = await self.queue_depths()
        workers = await live_workers(self.r, self.settings)
        counters = {w.worker_id: w.counters for w in workers}
        return Response(self.metrics.render(depths, len(workers), counters), media_type="text/plain; version=0.0.4")

    async def status(self, request: Request) -> Response:
        depths = await self.queue_depths()
        workers = await live_workers(self.r, self.settings)
        return json_response(
            {
                "workers": [w.__dict__ for w in workers],
                "functions": {
                    n: {"queue_depth": d, "states": {w.worker_id: w.models.get(n, ModelState.COLD) for w in workers}}
                    for n, d in depths.items()
                },
            }
        )

    def routes(self) -> list[Route]:
        return [
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{name}", self.model, methods=["GET"]),
            Route("/functions", self.list_functions, methods=["GET"]),
            Route("/functions", self.deploy, methods=["POST"]),
            Route("/functions/{name}", self.get_function, methods=["GET"]),
            Route("/functions/{name}", self.deploy, methods=["PUT"]),
            Route("/functions/{name}", self.delete_function, methods=["DELETE"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/health", self.healthz, methods=["GET"]),  # what guidellm and other clients probe
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
            Route("/status", self.status, methods=["GET"]),
        ]


# Browsers send text/plain (and form types) across sites without asking first; JSON and YAML types need a CORS
# preflight we never grant, so accepting only these keeps another site's page from deploying through a browser.
SPEC_TYPES = {
    "application/json": "json",
    "application/yaml": "yaml",
    "application/x-yaml": "yaml",
    "text/yaml": "yaml",
}


def spec_format(content_type: str) -> str:
    fmt = SPEC_TYPES.get(content_type.split(";")[0].strip().lower())
    if fmt is None:
        allowed = ", ".join(SPEC_TYPES)
        raise ApiError(415, f"a function spec needs content-type {allowed}; got {quote(content_type)}")
    return fmt


def create_app(redis_url: str, settings: Settings | None = None, require_keys: bool = False) -> Starlette:
    """The gateway app; with `require_keys` every request but /healthz needs an API key (see gateway/auth.py)."""
    gw = Gateway(redis_url, settings or Settings.from_env())

    async def on_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        err = ApiError(500, f"internal error: {type(exc).__name__}: {str(exc)[:200]}")
        return auth.redacted(err, auth.principal(request)).response()

    async def on_http_error(request: Request, exc: Exception) -> Response:
        # the router's own 404 (no such route) and 405 (wrong method), in OpenAI's error shape
        assert isinstance(exc, HTTPException)
        message = f"{request.method} {request.url.path[:100]}: {exc.detail}"
        return ApiError(exc.status_code, message, headers=dict(exc.headers or {})).response()

    async def on_redis_error(request: Request, exc: Exception) -> Response:
        # Redis is down or restarting: nothing was accepted, so the client may simply retry
        log.warning("%s %s: Redis unavailable (%s); answered 503", request.method, request.url.path, exc)
        message = f"the gateway's store (Redis) is unavailable: {exc}"
        return ApiError(503, message, code="store_unavailable", retry_after=REDIS_RETRY_AFTER_S).response()

    app = Starlette(
        routes=gw.routes(),
        middleware=[Middleware(auth.AuthMiddleware, r=gw.r, settings=gw.settings, required=require_keys)],
        exception_handlers={Exception: on_error, redis.RedisError: on_redis_error, HTTPException: on_http_error},
    )
    app.state.gateway = gw
    return app


__all__ = ["create_app"]
