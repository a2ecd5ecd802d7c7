"""One reader of answer streams per gateway process, fanning their entries out to the requests waiting for them.

A blocking XREAD per waiting request holds one Redis connection each, so a gateway with thousands of streaming
clients would need thousands of connections (the pool ran out at about 100). Instead one task reads every waiting
request's answer stream with a single XREAD (it takes any number of keys) on a connection of its own, and puts
each entry on that request's asyncio queue. A request that starts waiting while the read blocks wakes it with an
entry on this reader's own wake stream, so its first event is not held up by the block timeout. While Redis is
down the reader retries; waiting requests keep waiting (their own timeouts still run) and resume when it is back.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

import redis
import redis.asyncio as aredis

from protocol import keys

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]  # (stream entry id, fields)
RESPONSE_PREFIX = keys.response("").encode()
WAKE_TTL_S = 60  # the wake stream of a gateway that is gone expires


@dataclass
class Waiter:
    queue: asyncio.Queue[Entry] = field(default_factory=asyncio.Queue)
    last_id: bytes = b"0"  # read from the start: entries written before the request subscribed count too


class AnswerReader:
    def __init__(self, reader: aredis.Redis, r: aredis.Redis, block_ms: int = 1000, count: int = 256) -> None:
        self.reader = reader  # its own connection: the blocking read must never wait for a pooled one
        self.r = r
        self.block_ms = block_ms
        self.count = count
        self.wake_key = keys.gateway_wake(uuid.uuid4().hex)
        self.wake_id = b"0"
        self.waiters: dict[str, Waiter] = {}
        self.reading = False  # an XREAD is in flight
        self.woken = False  # a wake entry was sent during this read
        self.wanted = asyncio.Event()  # set while some request waits
        self.task: asyncio.Task | None = None

    async def subscribe(self, request_id: str) -> asyncio.Queue[Entry]:
        """Start delivering `request_id`'s answer entries, from the first, to the returned queue."""
        waiter = self.waiters[request_id] = Waiter()
        self.wanted.set()
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self.run(), name="answer-reader")
        if self.reading and not self.woken:
            self.woken = True
            try:
                async with self.r.pipeline(transaction=False) as p:
                    p.xadd(self.wake_key, {b"w": b"1"}, maxlen=1)
                    p.expire(self.wake_key, WAKE_TTL_S)
                    await p.execute()
            except redis.RedisError:
                pass  # Redis is down: the reader is retrying and will include this request
        return waiter.queue

    def unsubscribe(self, request_id: str) -> None:
        self.waiters.pop(request_id, None)
        if not self.waiters:
            self.wanted.clear()

    async def run(self) -> None:
        down = False
        while True:
            await self.wanted.wait()
            streams = {keys.response(rid): w.last_id for rid, w in self.waiters.items()}
            streams[self.wake_key] = self.wake_id
            self.reading, self.woken = True, False
            try:
                got = await self.reader.xread(streams, count=self.count, block=self.block_ms)
            except redis.RedisError as exc:
                if not down:
                    log.warning(
                        "answer reader: Redis unreachable (%s); %d waiting requests keep waiting, retrying every 0.5 s",
                        exc,
                        len(self.waiters),
                    )
                down = True
                await asyncio.sleep(0.5)
                continue
            finally:
                self.reading = False
            if down:
                log.warning("answer reader: Redis is back; reading %d answer streams again", len(self.waiters))
                down = False
            for key, entries in got or []:
                self.dispatch(key, entries)

    def dispatch(self, key: bytes, entries: list[Entry]) -> None:
        if key == self.wake_key.encode():
            self.wake_id = entries[-1][0]
            return
        waiter = self.waiters.get(key[len(RESPONSE_PREFIX) :].decode())
        if waiter is None:
            return  # the request stopped waiting while this read was in flight
        waiter.last_id = entries[-1][0]
        for entry in entries:
            waiter.queue.put_nowait(entry)
