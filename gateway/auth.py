"""Who may call what: one ASGI middleware checks the API key of every request but /healthz (and /health).

A plain ASGI middleware, not Starlette's BaseHTTPMiddleware: that one buffers and re-wraps streaming responses,
and the answers here are long server-sent-event streams. The middleware authenticates, checks the route against
the key's scope, counts the request against the key's rate limit, and leaves the caller (a `Principal`) in the
request's state; handlers ask it which functions the caller may see and whether it may see host paths.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import redis
import redis.asyncio as aredis
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import apikeys, ratelimit
from gateway.apikeys import ApiKey
from gateway.errors import ApiError
from protocol.settings import Settings

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/health"})  # liveness probes carry no key
INVOKE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models"})  # all else needs admin
# Absolute host paths in an error message (not our own API routes): shown to admins only.
HOST_PATH = re.compile(r"(?<![\w/.~-])/(?!v1/)[^\s'\"]*[^\s'\".,:;)\]]")


@dataclass(frozen=True)
class Principal:
    """The caller of one request; `key` is None on an open gateway, where every caller is an admin."""

    key: ApiKey | None

    @property
    def admin(self) -> bool:
        return self.key is None or self.key.admin

    def allows(self, function: str) -> bool:
        return self.key is None or self.key.allows(function)


OPEN_ACCESS = Principal(None)


def principal(request: Request) -> Principal:
    return request.scope.get("state", {}).get("principal", OPEN_ACCESS)


def redacted(err: ApiError, caller: Principal) -> ApiError:
    """The error as this caller may see it: host paths hidden from everyone but admins."""
    if caller.admin:
        return err
    message = HOST_PATH.sub("<path>", err.message)
    return ApiError(err.status, message, err.param, err.code, err.retry_after, err.headers)


def bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if kind.lower() == "bearer" and token.strip() else None
    return None


def limit(own: int | None, default: int) -> int:
    return default if own is None else own


class AuthMiddleware:
    def __init__(self, app: ASGIApp, r: aredis.Redis, settings: Settings, required: bool) -> None:
        self.app, self.r, self.settings, self.required = app, r, settings, required

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            caller = await self.authenticate(scope) if self.required else OPEN_ACCESS
        except ApiError as err:
            await err.response()(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = caller
        await self.app(scope, receive, send)

    async def authenticate(self, scope: Scope) -> Principal:
        token = bearer(scope)
        if token is None:
            raise unauthorized("missing API key: send it as 'Authorization: Bearer <key>'")
        try:
            key = await apikeys.lookup(self.r, token)
            if key is None:
                raise unauthorized("invalid or revoked API key")
            invoke_path = scope["path"] in INVOKE_PATHS or scope["path"].startswith("/v1/models/")
            if not invoke_path and not key.admin:
                raise ApiError(403, "this API key's scope (invoke) allows only /v1/ inference and model listing")
            await ratelimit.charge(self.r, key.id, "requests", 1, limit(key.rpm, self.settings.rate_rpm))
        except ratelimit.Limited as exc:
            raise ApiError(429, str(exc), code="rate_limit_exceeded", retry_after=exc.retry_after_s) from None
        except redis.RedisError as exc:
            log.warning("cannot check an API key: redis error (%s)", exc)
            raise ApiError(503, "cannot check the API key now (store unavailable)", retry_after=1) from None
        return Principal(key)


async def charge_tokens(r: aredis.Redis, settings: Settings, caller: Principal, tokens: int) -> None:
    """Count a request's tokens (prompt + max_tokens) against its key; 429 when over the key's minute."""
    if caller.key is None:
        return
    try:
        await ratelimit.charge(r, caller.key.id, "tokens", tokens, limit(caller.key.tpm, settings.rate_tpm))
    except ratelimit.Limited as exc:
        raise ApiError(429, str(exc), code="rate_limit_exceeded", retry_after=exc.retry_after_s) from None


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
