"""Reading work: invocations through the consumer group, orphans of dead workers, and cancellations.

A worker reads a function's stream only while it holds the model WARM or HOT and has room for more of its
requests. Delivery is at least once: an entry stays pending until the streamer acknowledges the whole answer, and
entries pending on a worker whose heartbeat stopped are claimed by a live one and run again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from protocol import keys
from protocol.settings import Settings
from protocol.states import ModelState
from worker.running import Counters, RunningTable

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]  # (entry id, fields)
Start = Callable[[str, list[Entry]], None]  # (stream, its entries in order)


class Consumer:
    def __init__(
        self,
        r: redis.Redis,
        settings: Settings,
        worker_id: str,
        running: RunningTable,
        counters: Counters,
        start: Start,
        cancel: Callable[[str], None],
    ) -> None:
        self.r = r
        self.settings = settings
        self.worker_id = worker_id
        self.running = running
        self.counters = counters
        self.start = start
        self.cancel = cancel
        self.last_reclaim = 0.0

    def served_streams(self, states: dict[str, ModelState]) -> dict[str, str]:
        inflight = self.running.inflight()
        limit = self.settings.max_inflight_per_function
        return {
            keys.invocations(fn): ">" for fn, state in states.items() if state.servable and inflight.get(fn, 0) < limit
        }

    def defer_reclaim(self, seconds: float) -> None:
        """Judge no worker dead for `seconds` (after a Redis outage, when every heartbeat is stale)."""
        self.last_reclaim = max(self.last_reclaim, time.monotonic() + seconds)

    def consume_once(self, states: dict[str, ModelState], stopping: threading.Event, block_ms: int = 200) -> None:
        """One blocking read over the streams of every servable function (and, once per heartbeat, a reclaim)."""
        now = time.monotonic()
        if now - self.last_reclaim > self.settings.heartbeat_s:
            self.last_reclaim = now
            self.reclaim_orphans(states)
        streams = self.served_streams(states)
        if not streams:
            stopping.wait(0.1)
            return
        got = self.r.xreadgroup(keys.GROUP, self.worker_id, streams, count=self.settings.read_batch, block=block_ms)
        for stream, entries in got or []:
            self.start(stream.decode(), entries)

    def reclaim_orphans(self, states: dict[str, ModelState]) -> None:
        """Take over invocations claimed by workers whose heartbeat stopped (or by this worker before a restart)."""
        for fn, state in states.items():
            if state.servable:
                self.reclaim_stream(keys.invocations(fn))

    def reclaim_stream(self, stream: str) -> None:
        try:
            consumers = self.r.xinfo_consumers(stream, keys.GROUP)
        except redis.ResponseError:
            return  # stream or group gone (function removed)
        names = [c["name"].decode() if isinstance(c["name"], bytes) else c["name"] for c in consumers]
        with self.r.pipeline(transaction=False) as p:
            for name in names:
                p.zscore(keys.WORKERS, name)
            scores = p.execute()
        alive_since = time.time() - self.settings.heartbeat_timeout_s
        for c, name, score in zip(consumers, names, scores, strict=True):
            mine = name == self.worker_id
            if not mine and score is not None and score >= alive_since:
                continue
            if c["pending"] == 0:
                if not mine:
                    self.r.xgroup_delconsumer(stream, keys.GROUP, name)
                continue
            self.claim(stream, name, mine)

    def claim(self, stream: str, owner: str, mine: bool) -> None:
        pending = self.r.xpending_range(stream, keys.GROUP, "-", "+", 64, consumername=owner)
        ids = [p["message_id"] for p in pending]
        if mine:  # entries this worker id claimed in a previous life and no longer runs
            running = self.running.entry_ids()
            ids = [i for i in ids if i not in running]
            if not ids:
                return
        # min_idle_time makes XCLAIM atomic between live workers: the first claim resets the idle time, so a
        # second worker reclaiming at the same moment gets nothing and the answer is generated once.
        idle_ms = 0 if mine else int(self.settings.heartbeat_timeout_s * 1000)
        claimed = []
        for entry_id, fields in self.r.xclaim(stream, keys.GROUP, self.worker_id, idle_ms, ids):
            if not fields:  # the entry was deleted (already answered); just drop the claim
                self.r.xack(stream, keys.GROUP, entry_id)
                continue
            source = "before a restart" if mine else f"dead worker {owner}"
            log.warning("re-delivering %s of %s from %s", entry_id, stream, source)
            self.counters.add("redelivered")
            claimed.append((entry_id, fields))
        if claimed:
            self.start(stream, claimed)

    def listen_cancels(self, stopping: threading.Event) -> None:
        """Abort requests whose client went away (gateways publish their ids)."""
        with self.r.pubsub(ignore_subscribe_messages=True) as pubsub:
            pubsub.subscribe(keys.CANCEL_CHANNEL)
            while not stopping.is_set():
                msg = pubsub.get_message(timeout=0.5)
                if msg:
                    self.cancel(msg["data"].decode())
