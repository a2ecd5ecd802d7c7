"""A stand-in worker that answers invocations by writing answer events straight to Redis, with no model.

It exercises the gateway alone (its fan-out of answers to thousands of waiting clients) at a rate no CPU engine
reaches. It registers like a real worker holding its functions HOT, reads their streams through the consumer group,
and answers each invocation with `Start`, `max_tokens` tokens whose text is `token_text(pos)`, and `Done`: one
token per open request per round, all in one pipelined write, each entry acknowledged once its answer is written.
With `hold`, nothing is answered until that many invocations are open, so they all wait at the same moment.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

import redis

from protocol import keys
from protocol.messages import Done, FinishReason, Invocation, Start, Token, WorkerInfo, encode_events
from protocol.states import ModelState

HEARTBEAT_S = 1.0


def token_text(pos: int) -> str:
    return f"t{pos} "


@dataclass
class Answering:
    inv: Invocation
    stream: str
    entry_id: bytes
    pos: int = 0


@dataclass
class FakeWorker:
    redis_url: str
    functions: list[str]
    hold: int = 0  # answer nothing until this many invocations are open (at most `hold_s` seconds)
    hold_s: float = 30.0
    worker_id: str = "fake-worker"
    serving: set[str] = field(default_factory=set)  # functions whose streams are read now (all, unless changed)
    answered: dict[str, int] = field(default_factory=dict)  # request id -> answers written (1 unless duplicated)

    def __post_init__(self) -> None:
        self.serving = self.serving or set(self.functions)
        self.r = redis.Redis.from_url(self.redis_url)

    def heartbeat(self) -> None:
        now = time.time()
        info = WorkerInfo(
            self.worker_id, socket.gethostname(), "fake", 1 << 40, 1 << 40, 0,
            {fn: ModelState.HOT for fn in self.functions}, {}, {}, now, now,
        )  # fmt: skip
        with self.r.pipeline(transaction=False) as p:
            p.zadd(keys.WORKERS, {self.worker_id: now})
            p.hset(keys.worker(self.worker_id), "info", info.to_json())
            p.execute()

    def run(self, stop: threading.Event) -> None:
        """Answer until `stop` is set."""
        open_: dict[str, Answering] = {}
        beat = first_at = 0.0
        while not stop.is_set():
            if time.monotonic() - beat > HEARTBEAT_S:
                self.heartbeat()
                beat = time.monotonic()
            if not open_:
                first_at = time.monotonic()  # the hold runs from the first open request
            holding = self.hold and len(open_) < self.hold and time.monotonic() - first_at < self.hold_s
            self.read(open_, block_ms=100 if holding or not open_ else None)
            if holding:
                continue
            self.hold = 0
            if open_:
                self.answer_round(open_)

    def read(self, open_: dict[str, Answering], block_ms: int | None) -> None:
        streams = {keys.invocations(fn): ">" for fn in list(self.serving)}
        if not streams:
            time.sleep(0.05)
            return
        got = self.r.xreadgroup(keys.GROUP, self.worker_id, streams, count=1000, block=block_ms)
        for stream, entries in got or []:
            for entry_id, fields in entries:
                inv = Invocation.from_fields(fields)
                open_[inv.request_id] = Answering(inv, stream.decode(), entry_id)

    def answer_round(self, open_: dict[str, Answering]) -> None:
        """One entry for every open request (Start first, then a token each round, then Done), one write."""
        done = []
        with self.r.pipeline(transaction=False) as p:
            for rid, a in open_.items():
                key = keys.response(rid)
                events: list = [Start(self.worker_id, len(a.inv.prompt_ids))] if a.pos == 0 else []
                events.append(Token(a.pos, a.pos, token_text(a.pos)))
                a.pos += 1
                if a.pos == a.inv.sampling.max_tokens:
                    events.append(Done(FinishReason.LENGTH, a.pos))
                    done.append(rid)
                p.xadd(key, encode_events(events))
                if done and done[-1] == rid:
                    p.expire(key, 600)
            p.execute()
        for rid in done:
            a = open_.pop(rid)
            self.answered[rid] = self.answered.get(rid, 0) + 1
            with self.r.pipeline() as p:
                p.xack(a.stream, keys.GROUP, a.entry_id)
                p.xdel(a.stream, a.entry_id)
                p.execute()
