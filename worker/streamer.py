"""Turning invocations into answers: start a request on its model's engine, step the engines, detokenize, cut
at stop strings, and write each request's events to its answer stream.

An invocation leaves its function's stream (XACK + XDEL) only after its whole answer is on the answer stream, so
a worker that dies mid-answer leaves it pending for another worker to claim. Events wait in a per-request outbox
until one pipelined write succeeds: if Redis fails, they go with the next flush and no position is skipped.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

import redis

from functions.spec import FunctionSpec
from gpu_runtime.memory import HostCacheFull, ModelLoadError, ModelTooLarge, PoolExhausted
from gpu_runtime.tokenizer import IncrementalDecoder
from modelinfo import ModelFileError
from protocol import keys
from protocol.errors import NotDeployed, RequestError
from protocol.messages import Done, Failed, FinishReason, Invocation, Start, Token, encode_events
from protocol.settings import Settings
from worker.models import Models, ServingEngine
from worker.running import Counters, Running, RunningTable

log = logging.getLogger(__name__)
# With nothing produced, the publisher still flushes this often: outboxes a failed write left behind (a Redis
# outage) and acknowledgements are retried on that beat.
PUBLISH_IDLE_S = 0.05


def hold_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of `text`'s tail that could still grow into a stop string, so it must not be streamed yet."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    return keep


def failure(function: str, exc: Exception) -> Failed:
    """The answer a request gets for `exc`, by cause: 4xx only for the client's own mistake."""
    if isinstance(exc, RequestError):
        return Failed(exc.status, str(exc))
    if isinstance(exc, (PoolExhausted, ModelTooLarge, HostCacheFull)):
        return Failed(503, f"function '{function}' cannot be brought up on this worker now: {exc}")
    if isinstance(exc, (ModelLoadError, ModelFileError)):
        return Failed(500, f"function '{function}': its model files cannot be loaded: {exc}")
    return Failed(500, f"function '{function}': server error: {type(exc).__name__}: {exc}")


class Streamer:
    def __init__(
        self,
        r: redis.Redis,
        settings: Settings,
        worker_id: str,
        models: Models,
        running: RunningTable,
        counters: Counters,
        spec: Callable[[str], FunctionSpec | None],
    ) -> None:
        self.r = r
        self.settings = settings
        self.worker_id = worker_id
        self.models = models
        self.running = running
        self.counters = counters
        self.spec = spec
        self.work = threading.Event()  # set when a request starts, so an idle engine loop wakes at once
        self.produced: deque[list] = deque()  # engine outputs the publisher has not turned into events
        self.outputs_ready = threading.Event()
        self.prefix_seen: dict[str, tuple[int, int, int]] = {}  # function -> (id of its engine, hit, query) counted

    # ---- starting ----
    def start(self, stream: str, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """Begin generating one invocation; whatever goes wrong is answered to its client, never raised."""
        try:
            inv = Invocation.from_fields(fields)
        except (KeyError, ValueError, TypeError) as exc:
            log.error("dropping malformed invocation %s on %s: %s", entry_id, stream, exc)
            self.counters.add("malformed")
            self.drop_entry(stream, entry_id)
            return
        run = Running(inv, entry_id)
        if not self.running.add(run):
            self.drop_duplicate(stream, entry_id, inv.request_id)
            return
        spec = self.spec(inv.function)
        if spec is None:
            self.fail(run, failure(inv.function, NotDeployed(f"function '{inv.function}' is not deployed")))
            return
        try:
            with self.models.lock(spec.name):
                engine = self.models.engine_for_request(spec)
                run.decoder = IncrementalDecoder(self.models.tokenizer(spec), list(inv.prompt_ids))
                engine.add_request(inv.request_id, list(inv.prompt_ids), inv.sampling)
        except Exception as exc:  # a model that can't load fails its requests, not the worker
            answer = failure(spec.name, exc)
            if answer.status >= 500:
                log.exception("cannot start %s on %s", inv.request_id, inv.function)
            self.fail(run, answer)
            return
        self.write(run, [Start(self.worker_id, len(inv.prompt_ids))], finished=False)
        self.work.set()

    def drop_duplicate(self, stream: str, entry_id: bytes, request_id: str) -> None:
        """Already generating this request: the same entry claimed twice (keep it), or a second entry a gateway
        submitted because the first was lost in a Redis restart (drop it: the running copy answers)."""
        first = self.running.get(request_id)
        if first is not None and first.entry_id != entry_id:
            log.info("%s is already running here; dropping its re-submitted entry %s", request_id, entry_id)
            self.drop_entry(stream, entry_id)

    # ---- generating ----
    def step_once(self) -> None:
        """Step every HOT engine that has work once (round robin over models) and hand their outputs to the
        publisher. Detokenizing and writing to Redis happen on the publisher thread, so the device computes the
        next step while the last one's tokens are published (done inline, they left the GPU idle for a few
        milliseconds of Python per step at a few hundred streams)."""
        busy = False
        for fn in {run.inv.function for run in self.running.all()}:
            with self.models.lock(fn):
                engine = self.models.hot_engine(fn)
                if engine is None or not engine.has_unfinished():
                    continue
                busy = True
                try:
                    outs = engine.step()
                except Exception as exc:
                    log.exception("engine step failed for %s", fn)
                    self.fail_function(fn, Failed(500, f"function '{fn}': engine failure: {exc}"))
                    continue
                self.count_prefix_cache(fn, engine)
            if outs:
                self.produced.append(outs)
                self.outputs_ready.set()
        if not busy:
            self.work.wait(0.01 if self.running.all() else 0.05)
            self.work.clear()

    def publish_once(self) -> None:
        """Turn everything the engines produced since the last round into events and write them in one round
        trip. When the publisher falls behind, its rounds simply grow: more tokens per entry, fewer entries."""
        self.outputs_ready.wait(PUBLISH_IDLE_S)
        self.outputs_ready.clear()
        while self.produced:
            self.collect(self.produced.popleft())
        self.flush()

    def count_prefix_cache(self, function: str, engine: ServingEngine) -> None:
        """Add the prompt tokens this engine found in its prefix cache (and looked up) since the last step to the
        worker's counters (engines without a prefix cache report nothing)."""
        if not hasattr(engine, "prefix_cache_tokens"):
            return
        hit, query = engine.prefix_cache_tokens()
        seen_engine, seen_hit, seen_query = self.prefix_seen.get(function, (0, 0, 0))
        if seen_engine != id(engine):  # a new engine for this function counts from zero
            seen_hit = seen_query = 0
        if query > seen_query:
            self.counters.add("prefix_cache_hit_tokens", hit - seen_hit)
            self.counters.add("prefix_cache_query_tokens", query - seen_query)
        self.prefix_seen[function] = (id(engine), hit, query)

    def collect(self, outs: list) -> None:
        """Turn engine outputs into events in each request's outbox (positions advance here, once)."""
        for out in outs:
            run = self.running.get(out.request_id)
            if run is None or run.finished:
                continue
            finished, reason = out.finished, out.finish_reason
            stops = run.inv.sampling.stop
            longest = max((len(s) for s in stops), default=0)
            for tok in out.new_token_ids:
                run.text += run.decoder.push([tok])
                start = max(0, run.sent_chars - longest)  # a stop can only begin in the text not yet sent
                hit = min((i for i in (run.text.find(s, start) for s in stops) if i >= 0), default=-1)
                if hit >= 0:
                    run.text, finished, reason = run.text[:hit], True, FinishReason.STOP
                limit = len(run.text) if finished else len(run.text) - hold_back(run.text, stops)
                delta = run.text[run.sent_chars : max(limit, run.sent_chars)]
                run.sent_chars += len(delta)
                run.outbox.append(Token(run.pos, tok, delta))
                run.pos += 1
                if hit >= 0:
                    break
            if finished:
                if not out.finished:  # a stop string ended it: the engine must stop too
                    self.abort_in_engine(run)
                if run.sent_chars < len(run.text):
                    run.outbox.append(Token(run.pos, -1, run.text[run.sent_chars :]))
                run.outbox.append(Done(reason or FinishReason.STOP, run.pos))
                run.finished = True

    def flush(self) -> None:
        """Write every outbox in one round trip, one entry per request; only then are finished invocations
        acknowledged. When Redis fails, the events go back to their outboxes for the next flush (the gateway
        skips positions it has) and acks are retried here."""
        taken = [(run, run.outbox) for run in self.running.all() if run.outbox]
        for run, _ in taken:
            run.outbox = []
        if taken:
            ttl = self.settings.response_ttl_s
            try:
                with self.r.pipeline(transaction=False) as p:
                    for run, events in taken:
                        p.xadd(keys.response(run.inv.request_id), encode_events(events))
                        if run.finished:
                            p.expire(keys.response(run.inv.request_id), ttl)
                    p.execute()
            except redis.RedisError:
                for run, events in taken:
                    run.outbox[:0] = events
                raise
            for run, _ in taken:
                run.answered = run.finished and not run.outbox  # a Failed another thread queued meanwhile
        for run in self.running.all():
            if run.answered:
                self.ack(run)

    # ---- ending ----
    def write(self, run: Running, events: list, finished: bool) -> None:
        """Write events for one request now (outside the engine loop's batching). A final answer Redis refused
        waits in the outbox for the publisher's next flush (a finished run's outbox is no one else's)."""
        try:
            with self.r.pipeline(transaction=False) as p:
                p.xadd(keys.response(run.inv.request_id), encode_events(events))
                p.expire(keys.response(run.inv.request_id), self.settings.response_ttl_s)
                p.execute()
        except redis.RedisError:
            if finished:
                run.outbox.extend(events)
            raise
        if finished:
            run.answered = True
            self.ack(run)

    def ack(self, run: Running) -> None:
        """The answer is complete on its stream: only now does the invocation leave the queue (then the table,
        so a request no longer counted in flight is gone from the queue too)."""
        self.drop_entry(keys.invocations(run.inv.function), run.entry_id)
        self.running.pop(run.inv.request_id)

    def drop_entry(self, stream: str, entry_id: bytes) -> None:
        with self.r.pipeline() as p:
            p.xack(stream, keys.GROUP, entry_id)
            p.xdel(stream, entry_id)
            p.execute()

    def fail(self, run: Running, answer: Failed) -> None:
        run.finished = True
        self.counters.add(f"failed_{answer.status}")
        self.write(run, [answer], finished=True)

    def fail_function(self, function: str, answer: Failed) -> None:
        """Fail every running request of one function and free them in its engine (caller holds its lock)."""
        for run in self.running.of(function):
            self.abort_in_engine(run)
            self.fail(run, answer)

    def abort_in_engine(self, run: Running) -> None:
        engine = self.models.hot_engine(run.inv.function)
        if engine is not None:
            engine.abort(run.inv.request_id)  # thread-safe: takes effect at the engine's next step

    def cancel(self, request_id: str) -> None:
        """The client went away: stop generating and let the invocation go (nobody will read the answer)."""
        run = self.running.get(request_id)
        if run is None:
            return
        self.abort_in_engine(run)
        run.finished = run.answered = True  # nobody reads the answer: nothing more to write
        self.counters.add("cancelled")
        log.info("cancelled %s (client disconnected)", request_id)
        self.ack(run)

    def retire(self, function: str, why: str) -> None:
        """A function was removed or now names another model: end its requests, then drop its model."""
        with self.models.lock(function):
            self.fail_function(function, Failed(410, f"function '{function}' was {why} while this request ran"))
            engine = self.models.hot_engine(function)
            while engine is not None and engine.has_unfinished():
                engine.step()  # let the engine release the aborted requests' KV before the model leaves
            self.models.drop(function)
        log.info("function %s was %s; its model left this worker", function, why)
