"""The gateway's side of the invoker: enqueue an invocation, route it to a worker, read its answer back.

Routing is by consumer group: every worker that holds a function WARM or HOT reads that function's stream, so an
invocation goes to whichever such worker has capacity first. When no live worker holds the function (a cold
invocation), the router sends `activate` control jobs to the workers with the most free memory; the request waits
in the stream meanwhile and is never lost.

Answers come back through the gateway process's one `AnswerReader` (no Redis connection per waiting request). The
gateway that holds the client also holds its `Invocation`: if the entry vanished from the stream without an answer
(a Redis restart that had not persisted it), it is submitted again; workers run a request id once at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import redis
import redis.asyncio as aredis
from rq import Queue

from functions.spec import FunctionSpec
from invoker import admission, history
from invoker.fanout import AnswerReader
from protocol import keys
from protocol.messages import Done, Event, Failed, Invocation, Restart, Start, Token, WorkerInfo, decode_events
from protocol.settings import Settings
from protocol.states import ARRIVAL_ORDER, ControlAction, ModelState

log = logging.getLogger(__name__)

Answer = Event | Restart


class QueueFull(Exception):
    def __init__(self, function: str, depth: int, limit: int, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"function '{function}' has {depth} queued invocations (limit {limit})")


class TooLarge(Exception):
    """The request can never fit any live worker: refused before it is queued, where it would block its function."""

    def __init__(self, refusal: admission.Refusal) -> None:
        self.param = refusal.param
        super().__init__(refusal.message)


class NoWorkers(Exception):
    pass


@dataclass
class Accepted:
    """An invocation now durable in its function's stream, and where: enough to find out whether it was lost."""

    inv: Invocation
    entry_id: bytes
    state: ModelState = ModelState.COLD  # its function's model on arrival, at best across live workers
    answered_at: float = 0.0  # when a worker wrote the last entry of its answer (Redis's clock; 0 until then)


@dataclass
class Progress:
    """How far the client has one answer: per sequence index, the next position it needs and whether it is done."""

    sequences: int
    next_pos: dict[int, int] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)

    def fresh(self, ev: Token) -> bool:
        """Whether `ev` is the position its sequence needs next (a re-execution replays ones the client has)."""
        if ev.pos != self.next_pos.get(ev.index, 0):
            return False
        self.next_pos[ev.index] = ev.pos + 1
        return True

    @property
    def complete(self) -> bool:
        return len(self.done) >= self.sequences


async def live_workers(r: aredis.Redis, settings: Settings) -> list[WorkerInfo]:
    """Workers whose heartbeat is fresh, with what they last reported."""
    return (await depth_and_workers(r, settings))[1]


async def depth_and_workers(r: aredis.Redis, settings: Settings, stream: str = "") -> tuple[int, list[WorkerInfo]]:
    """The length of `stream` (0 without one) and the live workers, in two pipelined round trips: every round
    trip of a request's admission waits a turn of the gateway's event loop, which is long when it is busy."""
    async with r.pipeline(transaction=False) as p:
        p.zrangebyscore(keys.WORKERS, time.time() - settings.heartbeat_timeout_s, "+inf")
        if stream:
            p.xlen(stream)
        ids, *depth = await p.execute()
    infos = []
    if ids:
        async with r.pipeline(transaction=False) as p:
            for i in ids:
                p.hget(keys.worker(i.decode()), "info")
            infos = await p.execute()
    return int(depth[0]) if depth else 0, [WorkerInfo.from_json(raw) for raw in infos if raw]


def state_on_arrival(workers: list[WorkerInfo], function: str) -> ModelState:
    """The state a request finds its function's model in: the best across live workers (COLD where none has it).
    The gateway returns it in `x-warmserve-state` and counts TTFT by it."""
    states = [w.models[function] for w in workers if function in w.models]
    return min(states, key=ARRIVAL_ORDER.index, default=ModelState.COLD)


def live_workers_sync(r: redis.Redis, settings: Settings) -> list[WorkerInfo]:
    """`live_workers` for synchronous callers (the warmer)."""
    ids = r.zrangebyscore(keys.WORKERS, time.time() - settings.heartbeat_timeout_s, "+inf")
    with r.pipeline(transaction=False) as p:
        for i in ids:
            p.hget(keys.worker(i.decode()), "info")
        infos = p.execute()
    return [WorkerInfo.from_json(raw) for raw in infos if raw]


class InvokerClient:
    def __init__(self, r: aredis.Redis, sync_redis: redis.Redis, settings: Settings, reader: AnswerReader) -> None:
        self.r = r
        self.sync_redis = sync_redis  # RQ is synchronous; its enqueues run in a thread
        self.settings = settings
        self.reader = reader

    async def queue_depth(self, function: str) -> int:
        return int(await self.r.xlen(keys.invocations(function)))

    async def submit(self, inv: Invocation, spec: FunctionSpec) -> Accepted:
        """Accept an invocation or raise QueueFull / NoWorkers / TooLarge (or a RedisError: not accepted); once
        this returns, the request is durable."""
        depth, workers = await depth_and_workers(self.r, self.settings, keys.invocations(spec.name))
        if depth >= spec.scaling.max_queue:
            raise QueueFull(spec.name, depth, spec.scaling.max_queue, retry_after_s=max(1, depth // 50))
        if not workers:
            raise NoWorkers("no live worker is registered; start one with `warmserve worker`")
        # n sequences share the prompt's KV; each needs its own for the tokens it generates
        generated = inv.sampling.max_tokens * inv.sampling.n
        if admission.sized(spec):  # arithmetic only
            refusal = admission.check(spec, len(inv.prompt_ids), generated, workers)
        else:  # the first request of a spec reads its model's config.json: off the event loop
            refusal = await asyncio.to_thread(admission.check, spec, len(inv.prompt_ids), generated, workers)
        if refusal is not None:
            raise TooLarge(refusal)
        async with self.r.pipeline(transaction=False) as p:
            p.xadd(keys.invocations(spec.name), inv.to_fields())
            history.record_arrival(p, spec.name, inv.created, self.settings.history_bucket_s)
            entry_id, *_ = await p.execute()
        accepted = Accepted(inv, entry_id, state_on_arrival(workers, spec.name))
        try:
            await self.ensure_routed(spec, workers)
        except redis.RedisError as exc:  # accepted already: a waiting request re-checks its routing
            log.warning("function %s: routing deferred (%s)", spec.name, exc)
        return accepted

    async def ensure_routed(self, spec: FunctionSpec, workers: list[WorkerInfo] | None = None) -> None:
        """Make sure enough live workers hold `spec` WARM/HOT; send activate jobs when they don't."""
        workers = await live_workers(self.r, self.settings) if workers is None else workers
        hosting = [w for w in workers if spec.name in w.models and w.models[spec.name].servable]
        want = min(max(1, spec.scaling.min_instances), spec.scaling.max_instances, len(workers))
        if len(hosting) >= want:
            return
        if (await self.r.get(keys.WARMER_POLICY) or b"warmserve") != b"warmserve":
            return  # the warmer plays a baseline (`warmserve warmer --policy`): it decides cold loads itself
        if not await self.r.set(keys.routing_lock(spec.name), b"1", nx=True, ex=self.settings.routing_lock_s):
            return  # another gateway (or an earlier request) already asked
        others = sorted((w for w in workers if w not in hosting), key=lambda w: -w.free_bytes)
        for w in others[: want - len(hosting)]:
            log.info("routing cold function %s to worker %s (activate)", spec.name, w.worker_id)
            await asyncio.to_thread(
                send_control, self.sync_redis, w.worker_id, ControlAction.ACTIVATE, spec.name, self.settings
            )

    async def events(
        self,
        spec: FunctionSpec,
        request_id: str,
        timeout_s: float,
        restartable: bool = False,
        accepted: Accepted | None = None,
    ) -> AsyncIterator[Answer]:
        """Yield the request's events in order, each token position of each sequence once, ending with the `Done`
        of its last sequence (the accepted invocation's `n`; 1 without one) or a `Failed`.

        A re-delivered invocation starts again at position 0 on another worker. When nothing has reached the
        client yet (`restartable`: a non-streamed answer), the re-run replaces the partial answer: a `Restart`
        says so. Otherwise positions already sent are skipped, and the client sees one complete answer.
        With `accepted`, an invocation lost from its stream, or a `Done` with positions missing (answer events
        lost in a Redis restart), is submitted again and its re-run completes the answer.
        """
        queue = await self.reader.subscribe(request_id)
        progress, starts = Progress(accepted.inv.sampling.n if accepted else 1), 0
        start = last_event = time.monotonic()
        try:
            while True:
                try:
                    entry_id, fields = queue.get_nowait() if not queue.empty() else await self.next_entry(queue)
                except TimeoutError:
                    now = time.monotonic()
                    if now - start > timeout_s:
                        yield Failed(504, f"function '{spec.name}' gave no answer within {timeout_s:.0f} s")
                        return
                    if now - last_event > self.settings.reroute_after_s:
                        last_event = now
                        await self.recheck(spec, accepted)
                    continue
                last_event = time.monotonic()
                for ev in decode_events(fields):
                    if isinstance(ev, Start):
                        starts += 1
                        if starts > 1 and restartable:
                            progress = Progress(progress.sequences)
                            yield Restart(ev.worker)
                    elif isinstance(ev, Token):
                        if not progress.fresh(ev):
                            continue  # a re-execution replaying positions the client already has
                    elif isinstance(ev, Done):
                        if ev.index in progress.done:
                            continue  # a re-execution finishing a sequence the client already has whole
                        gap = progress.next_pos.get(ev.index, 0)
                        if gap < ev.completion_tokens and accepted is not None:
                            await self.recheck(spec, accepted, lost=f"its answer lost positions {gap}.. of {ev.index}")
                            continue
                        progress.done.add(ev.index)
                    if (isinstance(ev, Failed) or progress.complete) and accepted is not None:
                        accepted.answered_at = keys.entry_time(entry_id)
                    yield ev
                    if isinstance(ev, Failed) or progress.complete:
                        return
        finally:
            self.reader.unsubscribe(request_id)
            try:
                await self.r.delete(keys.response(request_id))
            except redis.RedisError:
                pass  # it expires (response_ttl_s)

    @staticmethod
    async def next_entry(queue: asyncio.Queue) -> tuple[bytes, dict[bytes, bytes]]:
        async with asyncio.timeout(1.0):
            return await queue.get()

    async def recheck(self, spec: FunctionSpec, accepted: Accepted | None, lost: str = "") -> None:
        """A request heard nothing for a while (or `lost` says what it misses): re-route its function, and submit
        it again if it was lost. Never raises: a Redis outage leaves it waiting."""
        try:
            await self.ensure_routed(spec)
            if accepted is not None and (lost or await self.vanished(accepted)):
                await self.resubmit(accepted, lost or "its invocation vanished from the stream")
        except redis.RedisError as exc:
            log.warning("function %s: cannot re-check a waiting request (%s)", spec.name, exc)

    async def vanished(self, accepted: Accepted) -> bool:
        """The entry is gone from the stream yet its answer is not complete: a worker acknowledges (XACK + XDEL)
        only after the whole answer is written, so only a Redis restart that had not persisted it gets here."""
        stream = keys.invocations(accepted.inv.function)
        if await self.r.xrange(stream, accepted.entry_id, accepted.entry_id):
            return False
        last = await self.r.xrevrange(keys.response(accepted.inv.request_id), "+", "-", count=1)
        return not last or not isinstance(decode_events(last[0][1])[-1], Done | Failed)

    async def resubmit(self, accepted: Accepted, why: str) -> None:
        """Add the same invocation again (same request id and seed): its re-run regenerates the same tokens, and a
        worker still running the first copy drops the second."""
        stream = keys.invocations(accepted.inv.function)
        log.warning("request %s: %s (Redis restarted without it?); submitting it again", accepted.inv.request_id, why)
        try:  # the whole stream, group included, may be what was lost
            await self.r.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        accepted.entry_id = await self.r.xadd(stream, accepted.inv.to_fields())

    async def cancel(self, request_id: str) -> None:
        """The client went away: tell workers to stop generating (best effort)."""
        try:
            await self.r.publish(keys.CANCEL_CHANNEL, request_id)
        except redis.RedisError as exc:
            log.warning("request %s: cannot publish its cancel (%s); it runs to the end", request_id, exc)


def send_control(r: redis.Redis, worker_id: str, action: ControlAction, function: str, settings: Settings) -> str:
    """Enqueue one control job on a worker's RQ queue (by import path: no worker code here); returns the job id."""
    job = Queue(keys.control_queue(worker_id), connection=r, serializer=keys.CONTROL_SERIALIZER).enqueue(
        keys.CONTROL_JOB,
        ControlAction(action).value,
        function,
        job_timeout=settings.control_job_timeout_s,
        result_ttl=3600,
        failure_ttl=24 * 3600,
    )
    return job.id
