"""The universal worker: one process per device, serving any number of functions from Redis streams.

Threads, and why each exists:
- main: RQ SimpleWorker on this worker's control queue (RQ installs signal handlers, so it must be the main
  thread); control jobs move models between COLD/HOST/WARM/HOT;
- consumer: reads invocations of every function this worker holds WARM/HOT through the consumer group, and
  re-claims invocations left pending by dead workers (at-least-once delivery);
- engine loop: steps every HOT engine that has work and publishes tokens on per-request streams;
- heartbeat: refreshes liveness and the WorkerInfo the router, warmer and `warmserve status` read;
- cancel listener: aborts requests whose client went away.

Locking: one lock per function serialises that function's transitions, request starts and engine steps, so a
long load of one model never stalls serving of the others. The heartbeat and the consumer read a snapshot of the
model states taken after each transition, never the pool itself, so a worker busy loading still looks alive.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from rq import Queue, SimpleWorker

from functions.spec import FunctionSpec
from gpu_runtime import IncrementalDecoder, SamplingParams, Tokenizer
from invoker import control, keys
from invoker.registry import Registry
from invoker.schemas import Invocation, WorkerInfo, event
from invoker.serving import ServingModels, identity
from invoker.states import HOT, LOADING, SERVABLE
from invoker.submit import HEARTBEAT_TIMEOUT_S

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
REGISTRY_CHECK_S = 0.5  # how often the consumer looks for deploys and removals
RESPONSE_TTL_S = 600  # an answer nobody reads expires instead of piling up
MAX_INFLIGHT_PER_FUNCTION = 64


@dataclass
class Running:
    """One invocation being generated here."""

    inv: Invocation
    entry_id: bytes
    decoder: IncrementalDecoder | None = None  # None for a request that failed before it started
    text: str = ""  # everything decoded so far (for stop strings)
    sent_chars: int = 0  # how much of `text` has been turned into events
    pos: int = 0
    started: float = field(default_factory=time.time)
    outbox: list[dict] = field(default_factory=list)  # events not yet written to Redis
    finished: bool = False


def hold_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of `text`'s tail that could still grow into a stop string, so it must not be streamed yet."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    return keep


class Worker:
    def __init__(self, redis_url: str, device: str = "cpu", worker_id: str | None = None, **memory: int) -> None:
        self.r = redis.Redis.from_url(redis_url)
        self.redis_url = redis_url
        self.device = device
        self.worker_id = worker_id or f"{socket.gethostname()}-{device.replace(':', '')}-{uuid.uuid4().hex[:6]}"
        self.registry = Registry(self.r)
        self.models = ServingModels(device, **memory)
        self.tokenizers: dict[str, Tokenizer] = {}  # by serving identity, so a redeploy loads the new one
        self.specs: dict[str, FunctionSpec] = {}
        self.specs_version = -1
        self.specs_checked = 0.0
        self.specs_lock = threading.Lock()
        self.running: dict[str, Running] = {}
        self.last_used: dict[str, float] = {}  # keep-alive clock per function, read by the warmer
        self.fn_locks: dict[str, threading.RLock] = {}
        self.moving: set[str] = set()  # functions whose model a transition is moving right now
        self.states: dict[str, str] = {}  # snapshot of the model states, refreshed after each transition
        self.mem = {"total_bytes": 0, "free_bytes": 0, "lendable_kv_bytes": 0}
        self.work = threading.Event()
        self.stopping = threading.Event()
        self.started = time.time()
        self.last_reclaim = 0.0
        self.refresh_snapshot()

    def lock(self, function: str) -> threading.RLock:
        return self.fn_locks.setdefault(function, threading.RLock())  # setdefault is atomic under the GIL

    def refresh_snapshot(self) -> None:
        self.states, self.mem = self.models.states(), self.models.memory()

    def transition(self, function: str, action: str, spec: FunctionSpec) -> str:
        """Move one function's model (caller holds its lock); the snapshot shows it LOADING meanwhile."""
        t0 = time.perf_counter()
        self.moving.add(function)
        try:
            state = self.models.apply(action, spec)
        finally:
            self.moving.discard(function)
            self.refresh_snapshot()
        log.info("%s %s -> %s in %.1f ms", action, function, state, (time.perf_counter() - t0) * 1e3)
        if state in SERVABLE:  # let the next cold request route at once instead of waiting out the lock
            self.r.delete(keys.routing_lock(function))
        return state

    # ---- control jobs (RQ main thread) ----
    def apply_control(self, action: str, function: str) -> str:
        spec = self.spec(function)
        if spec is None:
            raise ValueError(f"function '{function}' is not deployed")
        with self.lock(function):
            if action in ("deactivate", "evict") and self.inflight(function):
                raise RuntimeError(f"'{function}' has {self.inflight(function)} running requests; not moving it")
            state = self.transition(function, action, spec)
        self.publish_info()
        return state

    # ---- registry ----
    def spec(self, function: str) -> FunctionSpec | None:
        if function not in self.specs:  # deployed a moment ago, before the consumer's periodic check
            self.refresh_specs()
        return self.specs.get(function)

    def refresh_specs(self) -> None:
        """Pick up deploys and removals; retire models whose function is gone or now names another model."""
        with self.specs_lock:  # the consumer and the control thread both refresh
            version = self.registry.version()
            if version == self.specs_version:
                return
            old, self.specs, self.specs_version = self.specs, self.registry.all(), version
            for name, spec in old.items():
                new = self.specs.get(name)
                if new is None or identity(new) != identity(spec):
                    self.retire(name, "removed" if new is None else "redeployed with another model")

    def retire(self, function: str, why: str) -> None:
        with self.lock(function):
            runs = [run for run in list(self.running.values()) if run.inv.function == function]
            engine = self.models.hot_engine(function)
            for run in runs:
                if engine is not None:
                    engine.abort(run.inv.request_id)
                self.finish_error(run, 410, f"function '{function}' was {why} while this request ran")
            while engine is not None and engine.has_unfinished():
                engine.step()  # let the engine release the aborted requests' KV before the model leaves
            self.models.drop(function)
            self.refresh_snapshot()
        log.info("function %s was %s; its model left this worker", function, why)

    def tokenizer(self, spec: FunctionSpec) -> Tokenizer:
        key = identity(spec)
        if key not in self.tokenizers:
            self.tokenizers[key] = Tokenizer.from_pretrained(spec.model)
        return self.tokenizers[key]

    def inflight(self, function: str) -> int:
        return sum(1 for run in list(self.running.values()) if run.inv.function == function)

    # ---- heartbeat ----
    def info(self) -> WorkerInfo:
        inflight: dict[str, int] = {}
        for run in list(self.running.values()):
            inflight[run.inv.function] = inflight.get(run.inv.function, 0) + 1
        states = dict(self.states)
        states.update({fn: LOADING for fn in list(self.moving)})
        return WorkerInfo(
            worker_id=self.worker_id,
            host=socket.gethostname(),
            device=self.device,
            total_bytes=self.mem["total_bytes"],
            free_bytes=self.mem["free_bytes"],
            lendable_kv_bytes=self.mem["lendable_kv_bytes"],
            models=states,
            inflight=inflight,
            last_used=dict(self.last_used),
            started=self.started,
            heartbeat=time.time(),
        )

    def publish_info(self) -> None:
        info = self.info()
        with self.r.pipeline() as p:
            p.zadd(keys.WORKERS, {self.worker_id: info.heartbeat})
            p.hset(keys.worker(self.worker_id), "info", info.to_json())
            p.expire(keys.worker(self.worker_id), int(HEARTBEAT_TIMEOUT_S * 4))
            # workers gone for a minute drop out of the set entirely
            p.zremrangebyscore(keys.WORKERS, "-inf", info.heartbeat - 60)
            p.execute()

    def heartbeat_once(self) -> None:
        self.stopping.wait(HEARTBEAT_S)
        if not self.moving:  # the pool is busy during a transition: keep the last snapshot, stay alive
            self.refresh_snapshot()  # also catches moves the engine makes itself (KV reclaim evicts borrowers)
        self.publish_info()

    def forever(self, body: Callable[[], None]) -> None:
        """Run a thread's body until shutdown; an error is logged and retried, never ends the thread."""
        while not self.stopping.is_set():
            try:
                body()
            except redis.RedisError as exc:
                log.warning("%s: redis error (%s); retrying in 1 s", body.__name__, exc)
                self.stopping.wait(1.0)
            except Exception:
                log.exception("%s failed; retrying in 1 s", body.__name__)
                self.stopping.wait(1.0)

    # ---- consuming invocations ----
    def served_streams(self) -> dict[str, str]:
        return {
            keys.invocations(fn): ">"
            for fn, state in self.states.items()
            if fn in self.specs and state in SERVABLE and self.inflight(fn) < MAX_INFLIGHT_PER_FUNCTION
        }

    def consume_once(self) -> None:
        now = time.monotonic()
        if now - self.specs_checked > REGISTRY_CHECK_S:
            self.specs_checked = now
            self.refresh_specs()
        if now - self.last_reclaim > HEARTBEAT_S:
            self.last_reclaim = now
            self.reclaim_orphans()
        streams = self.served_streams()
        if not streams:
            self.stopping.wait(0.1)
            return
        got = self.r.xreadgroup(keys.GROUP, self.worker_id, streams, count=16, block=200)
        for stream, entries in got or []:
            for entry_id, fields in entries:
                self.start(stream.decode(), entry_id, fields)

    def reclaim_orphans(self) -> None:
        """Take over invocations claimed by workers whose heartbeat stopped (or by this worker before a restart)."""
        alive_since = time.time() - HEARTBEAT_TIMEOUT_S
        for fn, state in list(self.states.items()):
            if state not in SERVABLE or fn not in self.specs:
                continue
            stream = keys.invocations(fn)
            try:
                consumers = self.r.xinfo_consumers(stream, keys.GROUP)
            except redis.ResponseError:
                continue  # stream or group gone (function removed)
            names = [c["name"].decode() if isinstance(c["name"], bytes) else c["name"] for c in consumers]
            with self.r.pipeline(transaction=False) as p:
                for name in names:
                    p.zscore(keys.WORKERS, name)
                scores = p.execute()
            for c, name, score in zip(consumers, names, scores, strict=True):
                mine = name == self.worker_id
                if not mine and score is not None and score >= alive_since:
                    continue
                if c["pending"] == 0:
                    if not mine:
                        self.r.xgroup_delconsumer(stream, keys.GROUP, name)
                    continue
                pending = self.r.xpending_range(stream, keys.GROUP, "-", "+", 64, consumername=name)
                ids = [p["message_id"] for p in pending]
                if mine:  # entries this worker id claimed in a previous life and no longer runs
                    running = {run.entry_id for run in self.running.values()}
                    ids = [i for i in ids if i not in running]
                    if not ids:
                        continue
                # min_idle_time makes XCLAIM atomic between live workers: the first claim resets the idle time,
                # so a second worker reclaiming at the same moment gets nothing and the answer is generated once.
                idle_ms = 0 if mine else int(HEARTBEAT_TIMEOUT_S * 1000)
                for entry_id, fields in self.r.xclaim(stream, keys.GROUP, self.worker_id, idle_ms, ids):
                    if fields:
                        log.warning(
                            "re-delivering %s of %s from %s",
                            entry_id,
                            fn,
                            "before a restart" if mine else f"dead worker {name}",
                        )
                        self.start(stream, entry_id, fields)
                    else:  # the entry was deleted (already answered); just drop the claim
                        self.r.xack(stream, keys.GROUP, entry_id)

    def start(self, stream: str, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """Begin generating one invocation; whatever goes wrong is answered to its client, never raised."""
        try:
            inv = Invocation.from_fields(fields)
        except (KeyError, ValueError, TypeError) as exc:
            log.error("dropping malformed invocation %s on %s: %s", entry_id, stream, exc)
            self.drop_entry(stream, entry_id)
            return
        spec = self.spec(inv.function)
        if inv.request_id in self.running:
            return  # already generating it (claimed twice)
        if spec is None:
            self.finish_error(Running(inv, entry_id), 404, f"function '{inv.function}' is not deployed")
            return
        run = None
        try:
            with self.lock(spec.name):
                if self.states.get(spec.name) != HOT:
                    self.transition(spec.name, "activate", spec)  # WARM -> HOT on the first request
                engine = self.models.hot_engine(spec.name)
                run = Running(inv, entry_id, IncrementalDecoder(self.tokenizer(spec), list(inv.prompt_ids)))
                s = inv.sampling
                params = SamplingParams(
                    max_tokens=s.max_tokens,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    top_k=s.top_k,
                    seed=s.seed,
                    stop_token_ids=s.stop_token_ids,
                    ignore_eos=s.ignore_eos,
                )
                engine.add_request(inv.request_id, list(inv.prompt_ids), params)
                self.running[inv.request_id] = run
        except ValueError as exc:  # the engine refused this request (e.g. longer than the model allows)
            self.finish_error(run or Running(inv, entry_id), 400, str(exc))
            return
        except Exception as exc:  # a model that can't load fails its requests, not the worker
            log.exception("cannot start %s on %s", inv.request_id, inv.function)
            self.finish_error(
                run or Running(inv, entry_id), 503, f"function '{inv.function}' could not be served: {exc}"
            )
            return
        self.last_used[inv.function] = time.time()
        with self.r.pipeline(transaction=False) as p:
            p.xadd(
                keys.response(inv.request_id), event("start", worker=self.worker_id, prompt_tokens=len(inv.prompt_ids))
            )
            p.expire(keys.response(inv.request_id), RESPONSE_TTL_S)
            p.execute()
        self.work.set()

    def drop_entry(self, stream: str, entry_id: bytes) -> None:
        with self.r.pipeline() as p:
            p.xack(stream, keys.GROUP, entry_id)
            p.xdel(stream, entry_id)
            p.execute()

    # ---- generating ----
    def engine_once(self) -> None:
        """Step every HOT engine that has work once (round robin over models), then publish their tokens."""
        busy = False
        for fn in {run.inv.function for run in list(self.running.values())}:
            with self.lock(fn):
                engine = self.models.hot_engine(fn)
                if engine is None or not engine.has_unfinished():
                    continue
                busy = True
                try:
                    outs = engine.step()
                except Exception as exc:
                    log.exception("engine step failed for %s", fn)
                    self.fail_function(fn, engine, str(exc))
                    continue
            self.collect(outs)
        self.flush()
        if not busy:
            self.work.wait(0.05 if not self.running else 0.01)
            self.work.clear()

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
                    run.text, finished, reason = run.text[:hit], True, "stop"
                limit = len(run.text) if finished else len(run.text) - hold_back(run.text, stops)
                delta = run.text[run.sent_chars : max(limit, run.sent_chars)]
                run.sent_chars += len(delta)
                run.outbox.append(event("token", pos=run.pos, id=tok, text=delta))
                if run.pos == 0:
                    log.debug(
                        "%s: %.1f ms queued, first token %.1f ms after start",
                        run.inv.request_id,
                        (run.started - run.inv.created) * 1e3,
                        (time.time() - run.started) * 1e3,
                    )
                run.pos += 1
                if hit >= 0:
                    break
            if finished:
                if not out.finished:  # a stop string ended it: the engine must stop too
                    engine = self.models.hot_engine(run.inv.function)
                    if engine is not None:
                        engine.abort(run.inv.request_id)
                if run.sent_chars < len(run.text):
                    run.outbox.append(event("token", pos=run.pos, id=-1, text=run.text[run.sent_chars :]))
                run.outbox.append(event("done", finish_reason=reason or "stop", completion_tokens=run.pos))
                run.finished = True

    def flush(self) -> None:
        """Write every outbox in one round trip; only then are finished invocations acknowledged. If Redis fails,
        the events stay in their outboxes and go with the next flush, so no position is ever skipped."""
        runs = [run for run in list(self.running.values()) if run.outbox]
        if not runs:
            return
        with self.r.pipeline(transaction=False) as p:
            for run in runs:
                for ev in run.outbox:
                    p.xadd(keys.response(run.inv.request_id), ev)
                if run.finished:
                    p.expire(keys.response(run.inv.request_id), RESPONSE_TTL_S)
            p.execute()
        for run in runs:
            run.outbox.clear()
            if run.finished:
                self.ack(run)

    def ack(self, run: Running) -> None:
        """The answer is complete on its stream: only now does the invocation leave the queue."""
        self.running.pop(run.inv.request_id, None)
        self.last_used[run.inv.function] = time.time()
        self.drop_entry(keys.invocations(run.inv.function), run.entry_id)

    def finish_error(self, run: Running, status: int, message: str) -> None:
        run.finished = True
        with self.r.pipeline(transaction=False) as p:
            p.xadd(keys.response(run.inv.request_id), event("error", status=status, message=message))
            p.expire(keys.response(run.inv.request_id), RESPONSE_TTL_S)
            p.execute()
        self.ack(run)

    def fail_function(self, function: str, engine, message: str) -> None:
        """An engine step raised: fail the function's running requests and free them in the engine."""
        for run in [r for r in list(self.running.values()) if r.inv.function == function]:
            engine.abort(run.inv.request_id)
            self.finish_error(run, 500, f"engine failure: {message}")

    # ---- cancellation ----
    def cancel_once(self) -> None:
        with self.r.pubsub(ignore_subscribe_messages=True) as pubsub:
            pubsub.subscribe(keys.CANCEL_CHANNEL)
            while not self.stopping.is_set():
                msg = pubsub.get_message(timeout=0.5)
                run = self.running.get(msg["data"].decode()) if msg else None
                if run is None:
                    continue
                engine = self.models.hot_engine(run.inv.function)
                if engine is not None:
                    engine.abort(run.inv.request_id)  # thread-safe: takes effect at the engine's next step
                run.finished = True
                log.info("cancelled %s (client disconnected)", run.inv.request_id)
                self.ack(run)

    # ---- lifecycle ----
    def run(self) -> None:
        control.bind(self)
        self.refresh_specs()
        self.publish_info()
        log.info("worker %s on %s registered (redis %s)", self.worker_id, self.device, self.redis_url)
        threads = [
            threading.Thread(target=self.forever, args=(body,), name=body.__name__, daemon=True)
            for body in (self.heartbeat_once, self.consume_once, self.engine_once, self.cancel_once)
        ]
        for t in threads:
            t.start()
        queue = Queue(keys.control_queue(self.worker_id), connection=self.r)
        rq_worker = SimpleWorker([queue], connection=self.r, name=f"{self.worker_id}-ctl-{os.getpid()}")
        try:
            rq_worker.work(logging_level="WARNING")
        finally:
            self.stopping.set()
            for t in threads:
                t.join(timeout=5)
            self.r.zrem(keys.WORKERS, self.worker_id)
            self.r.delete(keys.worker(self.worker_id))
            log.info("worker %s stopped", self.worker_id)
