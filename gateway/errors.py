"""OpenAI-style errors: every failure the gateway returns has this JSON shape and the right status."""

from __future__ import annotations

import orjson
from starlette.responses import Response

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after: int = 0,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = (
            status,
            message,
            param,
            code,
            retry_after,
        )
        self.headers = headers or {}

    def body(self) -> dict:
        kind = TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        body = self.body()
        headers = {**self.headers, **({"Retry-After": str(self.retry_after)} if self.retry_after else {})}
        return Response(orjson.dumps(body), status_code=self.status, media_type="application/json", headers=headers)
