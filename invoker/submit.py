"""The gateway's side of the invoker: enqueue an invocation, route it to a worker, read its answer back.

Routing is by consumer group: every worker that holds a function WARM or HOT reads that function's stream, so an
invocation goes to whichever such worker has capacity first. When no live worker holds the function (a cold
invocation), the router sends `activate` control jobs to the workers with the most free memory; the request waits
in the stream meanwhile and is never lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import redis
import redis.asyncio as aredis
from rq import Queue

from functions.spec import FunctionSpec
from invoker import history
from protocol import keys
from protocol.messages import Done, Event, Failed, Invocation, Restart, Start, Token, WorkerInfo, decode_event
from protocol.settings import Settings
from protocol.states import ControlAction

log = logging.getLogger(__name__)

Answer = Event | Restart


class QueueFull(Exception):
    def __init__(self, function: str, depth: int, limit: int, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"function '{function}' has {depth} queued invocations (limit {limit})")


class NoWorkers(Exception):
    pass


async def live_workers(r: aredis.Redis, settings: Settings) -> list[WorkerInfo]:
    """Workers whose heartbeat is fresh, with what they last reported."""
    ids = await r.zrangebyscore(keys.WORKERS, time.time() - settings.heartbeat_timeout_s, "+inf")
    infos = await asyncio.gather(*(r.hget(keys.worker(i.decode()), "info") for i in ids))
    return [WorkerInfo.from_json(raw) for raw in infos if raw]


def live_workers_sync(r: redis.Redis, settings: Settings) -> list[WorkerInfo]:
    """`live_workers` for synchronous callers (the warmer)."""
    ids = r.zrangebyscore(keys.WORKERS, time.time() - settings.heartbeat_timeout_s, "+inf")
    with r.pipeline(transaction=False) as p:
        for i in ids:
            p.hget(keys.worker(i.decode()), "info")
        infos = p.execute()
    return [WorkerInfo.from_json(raw) for raw in infos if raw]


class InvokerClient:
    def __init__(self, r: aredis.Redis, sync_redis: redis.Redis, settings: Settings) -> None:
        self.r = r
        self.sync_redis = sync_redis  # RQ is synchronous; its enqueues run in a thread
        self.settings = settings

    async def queue_depth(self, function: str) -> int:
        return int(await self.r.xlen(keys.invocations(function)))

    async def submit(self, inv: Invocation, spec: FunctionSpec) -> None:
        """Accept an invocation or raise QueueFull / NoWorkers; once this returns, the request is durable."""
        depth = await self.queue_depth(spec.name)
        if depth >= spec.scaling.max_queue:
            raise QueueFull(spec.name, depth, spec.scaling.max_queue, retry_after_s=max(1, depth // 50))
        workers = await live_workers(self.r, self.settings)
        if not workers:
            raise NoWorkers("no live worker is registered; start one with `warmserve worker`")
        async with self.r.pipeline(transaction=False) as p:
            p.xadd(keys.invocations(spec.name), inv.to_fields())
            history.record_arrival(p, spec.name, inv.created, self.settings.history_bucket_s)
            await p.execute()
        await self.ensure_routed(spec, workers)

    async def ensure_routed(self, spec: FunctionSpec, workers: list[WorkerInfo] | None = None) -> None:
        """Make sure enough live workers hold `spec` WARM/HOT; send activate jobs when they don't."""
        workers = await live_workers(self.r, self.settings) if workers is None else workers
        hosting = [w for w in workers if spec.name in w.models and w.models[spec.name].servable]
        want = min(max(1, spec.scaling.min_instances), spec.scaling.max_instances, len(workers))
        if len(hosting) >= want:
            return
        if not await self.r.set(keys.routing_lock(spec.name), b"1", nx=True, ex=self.settings.routing_lock_s):
            return  # another gateway (or an earlier request) already asked
        others = sorted((w for w in workers if w not in hosting), key=lambda w: -w.free_bytes)
        for w in others[: want - len(hosting)]:
            log.info("routing cold function %s to worker %s (activate)", spec.name, w.worker_id)
            await asyncio.to_thread(
                send_control, self.sync_redis, w.worker_id, ControlAction.ACTIVATE, spec.name, self.settings
            )

    async def events(
        self, spec: FunctionSpec, request_id: str, timeout_s: float, restartable: bool = False
    ) -> AsyncIterator[Answer]:
        """Yield the request's events in order, each token position once, ending with `Done` or `Failed`.

        A re-delivered invocation starts again at position 0 on another worker. When nothing has reached the
        client yet (`restartable`: a non-streamed answer), the re-run replaces the partial answer: a `Restart`
        says so. Otherwise positions already sent are skipped, and the client sees one complete answer.
        """
        key = keys.response(request_id)
        last_id, next_pos, starts = "0", 0, 0
        start = last_event = time.monotonic()
        try:
            while True:
                got = await self.r.xread({key: last_id}, count=256, block=1000)
                now = time.monotonic()
                if not got:
                    if now - start > timeout_s:
                        yield Failed(504, f"function '{spec.name}' gave no answer within {timeout_s:.0f} s")
                        return
                    if now - last_event > self.settings.reroute_after_s:
                        last_event = now
                        await self.ensure_routed(spec)
                    continue
                last_event = now
                for entry_id, fields in got[0][1]:
                    last_id = entry_id
                    ev = decode_event(fields)
                    if isinstance(ev, Start):
                        starts += 1
                        if starts > 1 and restartable:
                            next_pos = 0
                            yield Restart(ev.worker)
                    elif isinstance(ev, Token):
                        if ev.pos != next_pos:
                            continue  # a re-execution replaying positions the client already has
                        next_pos += 1
                    yield ev
                    if isinstance(ev, Done | Failed):
                        return
        finally:
            await self.r.delete(key)

    async def cancel(self, request_id: str) -> None:
        """The client went away: tell workers to stop generating (best effort)."""
        await self.r.publish(keys.CANCEL_CHANNEL, request_id)


def send_control(r: redis.Redis, worker_id: str, action: ControlAction, function: str, settings: Settings) -> str:
    """Enqueue one control job on a worker's RQ queue (by import path: no worker code here); returns the job id."""
    job = Queue(keys.control_queue(worker_id), connection=r).enqueue(
        keys.CONTROL_JOB,
        ControlAction(action).value,
        function,
        job_timeout=settings.control_job_timeout_s,
        result_ttl=3600,
        failure_ttl=24 * 3600,
    )
    return job.id
