"""A gateway app and a worker in this process against a real Redis, for tests that need many fast requests.

The app is driven through httpx's ASGI transport on one event loop owned by the client (the gateway's Redis
connections belong to that loop), from plain synchronous tests. The worker runs its serving threads here too and
is given the model HOT directly, as the router would have it activated.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import httpx
import redis

from functions.spec import parse_spec
from invoker.registry import Registry
from protocol.settings import Settings
from protocol.states import ControlAction

FAST = Settings(heartbeat_s=0.2, heartbeat_timeout_s=1.0, registry_check_s=0.1, request_timeout_s=30)
MIB = 1 << 20


class AppClient:
    """Synchronous calls into an ASGI app; `run` executes any coroutine on the app's loop."""

    def __init__(self, app: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.transport = httpx.ASGITransport(app=app)
        self.client = httpx.AsyncClient(transport=self.transport, base_url="http://gateway")

    def run(self, coro: Coroutine) -> Any:
        return self.loop.run_until_complete(coro)

    def request(self, method: str, url: str, key: str | None = None, **kw: Any) -> httpx.Response:
        headers = {**kw.pop("headers", {}), **({"authorization": f"Bearer {key}"} if key else {})}
        return self.run(self.client.request(method, url, headers=headers, **kw))

    def close(self) -> None:
        self.run(self.client.aclose())
        self.run(cancel_background())
        self.loop.close()


async def cancel_background() -> None:
    """End the tasks the gateway started on this loop (its answer reader), so the loop closes cleanly."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def db_url(redis_url: str, db: int) -> str:
    return f"{redis_url.rsplit('/', 1)[0]}/{db}"


def serve_hot(url: str, name: str, model: str, worker_id: str, **spec: Any):
    """Deploy `name` and start an in-process worker holding it HOT; returns the worker (call .stop())."""
    from worker.process import Worker  # torch: only tests that serve import it

    r = redis.Redis.from_url(url)
    Registry(r).deploy(parse_spec({"name": name, "model": model, **spec}))
    w = Worker(url, "cpu", worker_id, settings=FAST, gpu_bytes=256 * MIB, host_cache_bytes=256 * MIB)
    w.start()
    w.apply_control(ControlAction.ACTIVATE, name)
    return w
