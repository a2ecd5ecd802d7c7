"""Reading a request body with its limits enforced while reading, not after.

Starlette's `request.body()` reads everything first, so a client could make the gateway buffer any amount, or
hold a request open forever by sending one byte a minute. Here the size is checked against Content-Length before
reading and against every chunk as it arrives (413), and the whole read has a deadline (408).
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from gateway.errors import ApiError


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s") from None
    return b"".join(chunks)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is over {limit} bytes", code="request_too_large")
