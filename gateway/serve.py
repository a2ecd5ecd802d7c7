"""Serving the gateway with uvicorn, with the connection limits an endpoint on a network needs.

uvicorn already closes idle keep-alive connections (`timeout_keep_alive`) and caps the size of a request head
(h11's `max_incomplete_event_size`); both come from Settings. What it lacks is a deadline for the head itself:
the keep-alive timer runs only between requests and any byte received cancels it, so a client sending its
headers a byte at a time (slowloris) holds a connection forever. `HeadDeadlineH11` adds that deadline; the body
has its own, enforced while it is read (gateway/body.py).
"""

from __future__ import annotations

import asyncio
import ipaddress

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from protocol.settings import Settings


class HeadDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose next request head is not complete in time."""

    head_timeout_s = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on this keep-alive connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.head_timeout_s, self._expire)

    def _expire(self) -> None:
        # IDLE: h11 has not seen a whole request head since the deadline was armed
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach a server bound to `host`."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def serve(app: ASGIApp, host: str, port: int, settings: Settings) -> None:
    protocol = type("GatewayH11", (HeadDeadlineH11,), {"head_timeout_s": settings.header_timeout_s})
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=protocol,
        timeout_keep_alive=settings.keep_alive_s,
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )
