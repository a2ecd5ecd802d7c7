"""Turning invocations into answers: start a request on its model's engine, step the engines, and hand what they
produce to the publisher process (worker/publisher.py), which detokenizes, cuts at stop strings, writes each
request's events to its answer stream and acknowledges the invocation once its whole answer is written, so a
worker that dies mid-answer leaves it pending for another worker to claim.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import redis

from functions.spec import FunctionSpec
from gpu_runtime.memory import HostCacheFull, LoadYielded, ModelLoadError, ModelTooLarge, PoolExhausted
from modelinfo import ModelFileError
from protocol import keys
from protocol.errors import NotDeployed, RequestError
from protocol.messages import Failed, Invocation
from protocol.settings import Settings
from protocol.states import ControlAction, ModelState
from worker.models import Models, ServingEngine
from worker.publisher import Acked, Fail, Forget, Produced, PublisherProcess, Started, StopEngine
from worker.running import Counters, Running, RunningTable

log = logging.getLogger(__name__)


def us(seconds: float) -> int:
    """A delay as whole microseconds for the counters (0 when clocks out of step make it negative)."""
    return int(1e6 * max(0.0, seconds))


def failure(function: str, exc: Exception) -> Failed:
    """The answer a request gets for `exc`, by cause: 4xx only for the client's own mistake."""
    if isinstance(exc, RequestError):
        return Failed(exc.status, str(exc))
    if isinstance(exc, (PoolExhausted, ModelTooLarge, HostCacheFull, LoadYielded)):
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
        self.publisher: PublisherProcess  # started with the worker's threads (Worker.start)
        self.work = threading.Event()  # set when a request starts, so an idle engine loop wakes at once
        self.waiting: dict[str, list[Running]] = {}  # function -> requests that found no room for its KV yet
        self.prefix_seen: dict[str, tuple[int, int, int]] = {}  # function -> (id of its engine, hit, query) counted

    # ---- starting ----
    def start(self, stream: str, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Begin generating the invocations of one read; whatever goes wrong is answered to its client, never
        raised. All of a function's new requests join its engine under one hold of its lock: the engine thread
        steps between holds, so starting a read of 64 one at a time would take 64 steps."""
        runs: dict[str, list[Running]] = {}
        for entry_id, fields in entries:
            try:
                inv = Invocation.from_fields(fields)
            except (KeyError, ValueError, TypeError) as exc:
                log.error("dropping malformed invocation %s on %s: %s", entry_id, stream, exc)
                self.counters.add("malformed")
                self.drop_entry(stream, entry_id)
                continue
            run = Running(inv, entry_id)
            if self.running.add(run):
                runs.setdefault(inv.function, []).append(run)
            else:
                self.drop_duplicate(stream, entry_id, inv.request_id)
        for function, batch in runs.items():
            if function in self.waiting:  # behind the requests still waiting for room: first come, first served
                self.waiting[function] += batch
            else:
                self.start_function(function, batch)
        if runs:
            self.work.set()

    def retry_waiting(self) -> None:
        """Try again to start the requests that found no room for their model's KV (the consumer thread, after
        each read); those whose client left meanwhile are dropped."""
        for function in list(self.waiting):
            runs = [run for run in self.waiting.pop(function) if not run.finished]
            if runs:
                self.start_function(function, runs, retried=True)

    def start_function(self, function: str, runs: list[Running], retried: bool = False) -> None:
        spec = self.spec(function)
        if spec is None:
            for run in runs:
                self.refuse(run, failure(function, NotDeployed(f"function '{function}' is not deployed")))
            return
        lock = self.models.lock(spec.name)
        if not lock.acquire(blocking=False):
            if self.models.moving(spec.name):
                # The warmer is moving this model (a load from disk takes seconds): the requests wait beside this
                # thread, which goes on starting other models' requests, and are tried again after each read.
                self.waiting[function] = self.waiting.get(function, []) + runs
                return
            lock.acquire()  # the engine thread's step, or a short action: wait for it
        started = 0
        try:
            engine = self.engine_for(spec)
            self.models.tokenizer(spec)  # a broken tokenizer fails here, by cause, not in the publisher
            for run in runs:
                self.start_one(spec, engine, run)
                started += 1
        except PoolExhausted as exc:
            self.defer_or_refuse(spec.name, runs[started:], exc, retried)
        except Exception as exc:  # a model that can't load fails its requests, not the worker
            answer = failure(spec.name, exc)
            if answer.status >= 500:
                log.exception("cannot start %d requests on %s", len(runs) - started, spec.name)
            for run in runs[started:]:
                self.refuse(run, answer)
        finally:
            lock.release()

    def defer_or_refuse(self, function: str, runs: list[Running], exc: PoolExhausted, retried: bool) -> None:
        """No room for the model's KV while every other model is busy: the requests wait (still pending on this
        worker, so a crash re-delivers them) and are tried again after each read; one waiting longer than
        `start_wait_s` since its submission is answered 503."""
        young = [run for run in runs if time.time() - run.inv.created < self.settings.start_wait_s]
        for run in runs:
            if run not in young:
                log.warning("%s: request %s found no room for %.0f s; answering 503", function, run.inv.request_id,
                            self.settings.start_wait_s)  # fmt: skip
                self.refuse(run, failure(function, exc))
        if young:
            self.waiting[function] = young
        if not retried:
            self.counters.add("start_deferred", len(young))
            log.info("%s: no room for its KV now (%s); %d requests wait", function, exc, len(young))

    def engine_for(self, spec: FunctionSpec) -> ServingEngine:
        """`spec`'s HOT engine (the caller holds its lock). A WARM model whose KV finds no room takes it from idle
        HOT models, one at a time: requests here now come before an idle model's reservation (the warmer may
        have kept it HOT for a forecast; it activates it again when that traffic comes)."""
        while True:
            try:
                return self.models.engine_for_request(spec)
            except PoolExhausted:
                if not self.deactivate_idle(exclude=spec.name):
                    raise

    def deactivate_idle(self, exclude: str) -> bool:
        """Deactivate the least recently used HOT model with no request here whose lock is free now (tried, never
        waited for: the caller holds another model's lock); True if one went."""
        busy, used = self.running.inflight(), self.running.last_used()
        for fn in sorted(self.models.hot_functions(), key=lambda f: used.get(f, 0.0)):
            spec, lock = self.spec(fn), self.models.lock(fn)
            if fn == exclude or busy.get(fn) or spec is None or not lock.acquire(blocking=False):
                continue
            try:
                engine = self.models.hot_engine(fn)
                if engine is None or engine.has_unfinished() or self.running.of(fn):
                    continue
                log.info("deactivating idle %s to make room for a request of %s", fn, exclude)
                if self.models.apply(ControlAction.DEACTIVATE, spec) != ModelState.HOT:
                    self.counters.add("deactivated_for_requests")
                    return True
            finally:
                lock.release()
        return False

    def start_one(self, spec: FunctionSpec, engine: ServingEngine, run: Running) -> None:
        """Add one request to its engine (the caller holds the model's lock, so the engine cannot step it before
        the publisher knows it); a request the engine refuses is answered alone."""
        inv = run.inv
        try:
            engine.add_request(inv.request_id, list(inv.prompt_ids), inv.sampling)
        except Exception as exc:
            answer = failure(spec.name, exc)
            if answer.status >= 500:
                log.exception("cannot start %s on %s", inv.request_id, spec.name)
            self.refuse(run, answer)
            return
        run.added = time.time()
        self.publisher.send(Started(inv, run.entry_id, spec.model, run.added))
        self.count_admission(run)

    def count_admission(self, run: Running) -> None:
        """Submission at the gateway to a seat in the engine, and its parts: the gateway's checks up to the XADD
        (the entry id is Redis's clock), the wait in the stream until this worker read it, and the read to the
        engine (parsing, the model's lock). Three clocks: meaningful where hosts keep them in step (NTP)."""
        queued = keys.entry_time(run.entry_id)
        self.counters.add_many({
            "admitted": 1,
            "admission_us": us(run.added - run.inv.created),
            "submit_us": us(queued - run.inv.created),
            "queued_us": us(run.started - queued),
            "start_us": us(run.added - run.started),
        })  # fmt: skip

    def refuse(self, run: Running, answer: Failed) -> None:
        """Fail a request that never started: no Start event, so the client gets the failure's HTTP status."""
        self.publisher.send(Started(run.inv, run.entry_id, None))
        self.fail(run, answer)

    def drop_duplicate(self, stream: str, entry_id: bytes, request_id: str) -> None:
        """Already generating this request: the same entry claimed twice (keep it), or a second entry a gateway
        submitted because the first was lost in a Redis restart (drop it: the running copy answers)."""
        first = self.running.get(request_id)
        if first is not None and first.entry_id != entry_id:
            log.info("%s is already running here; dropping its re-submitted entry %s", request_id, entry_id)
            self.drop_entry(stream, entry_id)

    # ---- generating ----
    def step_once(self) -> None:
        """Step every HOT engine that has work once (round robin over models) and hand the outputs to the
        publisher process, so the next step starts while the last one's tokens are detokenized and written."""
        busy = False
        # an engine whose last requests were aborted (their clients left) is stepped until it lets them go, or
        # its KV would stay taken and the model could never step down
        for fn in {run.inv.function for run in self.running.all()} | self.models.unfinished():
            # Never wait for a model's lock here: its holder may be loading it (a request's activation from disk,
            # the warmer's prewarm: seconds), and every other model would stall meanwhile (seen live: HOT
            # requests got their first tokens together, after a cold model's load). A model whose lock is taken,
            # or asked for (requests being added), is stepped next round; the consumer sets `work` when it is done.
            lock = self.models.lock(fn)
            if not lock.acquire(blocking=False):
                continue
            try:
                busy = self.step_model(fn) or busy
            finally:
                lock.release()
        if not busy:
            self.work.wait(0.01 if self.running.all() else 0.05)
            self.work.clear()

    def step_model(self, fn: str) -> bool:
        """One step of `fn`'s HOT engine, if it has work (the caller holds the model's lock); True if it stepped."""
        engine = self.models.hot_engine(fn)
        if engine is None or not engine.has_unfinished():
            return False
        began = time.perf_counter()
        try:
            outs = engine.step()
        except Exception as exc:
            log.exception("engine step failed for %s", fn)
            self.fail_function(fn, Failed(500, f"function '{fn}': engine failure: {exc}"))
            return True
        self.count_step(fn, engine, outs, began)
        if outs:  # sent under the model's lock, so after the Started of every request in it
            self.publisher.send(Produced(outs, time.time()))
        return True

    def feedback_once(self, timeout_s: float = 0.5) -> None:
        """Act on one message of the publisher: a request's answer is written and acknowledged (it leaves the
        table), or a stop string ended it (the engine stops generating it)."""
        try:
            msg = self.publisher.receive(timeout_s)
        except (EOFError, OSError):
            # No answer of this worker can be written any more. Leave: the supervisor (`up`, compose) starts it
            # again and live workers re-deliver what it had claimed.
            log.critical("worker %s: its publisher process died; exiting", self.worker_id)
            os._exit(70)
        if isinstance(msg, Acked):
            self.running.pop(msg.request_id)
            if msg.first_token_s or msg.written_s:
                self.counters.add_many({
                    "answered": 1, "first_token_us": us(msg.first_token_s), "written_us": us(msg.written_s)
                })  # fmt: skip
        elif isinstance(msg, StopEngine):
            run = self.running.get(msg.request_id)
            if run is not None:
                self.abort_in_engine(run, msg.index)

    def count_step(self, function: str, engine: ServingEngine, outs: list, began: float) -> None:
        """Count one engine step for /metrics: its time, the sequences it advanced, prefix cache use."""
        self.counters.add("engine_steps")
        self.counters.add("engine_step_sequences", sum(1 for o in outs if o.new_token_ids))
        self.counters.add("engine_step_us", int(1e6 * (time.perf_counter() - began)))
        self.count_prefix_cache(function, engine)

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

    # ---- ending ----
    def drop_entry(self, stream: str, entry_id: bytes) -> None:
        with self.r.pipeline() as p:
            p.xack(stream, keys.GROUP, entry_id)
            p.xdel(stream, entry_id)
            p.execute()

    def fail(self, run: Running, answer: Failed) -> None:
        run.finished = True
        self.counters.add(f"failed_{answer.status}")
        self.publisher.send(Fail(run.inv.request_id, answer))

    def fail_function(self, function: str, answer: Failed) -> None:
        """Fail every running request of one function and free them in its engine (caller holds its lock)."""
        for run in self.running.of(function):
            self.abort_in_engine(run)
            self.fail(run, answer)

    def abort_in_engine(self, run: Running, index: int | None = None) -> None:
        """Stop generating the request (index None: all its sequences) or one of its sequences."""
        engine = self.models.hot_engine(run.inv.function)
        if engine is not None:
            engine.abort(run.inv.request_id, index)  # thread-safe: takes effect at the engine's next step

    def cancel(self, request_id: str) -> None:
        """The client went away: stop generating and let the invocation go (nobody will read the answer)."""
        run = self.running.get(request_id)
        if run is None:
            return
        self.abort_in_engine(run)
        run.finished = True
        self.publisher.send(Forget(request_id))  # nobody reads the answer: nothing more to write
        self.counters.add("cancelled")
        log.info("cancelled %s (client disconnected)", request_id)

    def retire(self, function: str, why: str) -> None:
        """A function was removed or now names another model: end its requests, then drop its model."""
        with self.models.lock(function):
            self.fail_function(function, Failed(410, f"function '{function}' was {why} while this request ran"))
            engine = self.models.hot_engine(function)
            while engine is not None and engine.has_unfinished():
                engine.step()  # let the engine release the aborted requests' KV before the model leaves
            self.models.drop(function)
        log.info("function %s was %s; its model left this worker", function, why)
