"""The universal worker: one process per device, serving any number of functions from Redis streams.

Threads, and why each exists:
- main: RQ SimpleWorker on this worker's control queue (RQ installs signal handlers, so it must be the main
  thread); control jobs move models between COLD/HOST/WARM/HOT;
- consumer: reads invocations of every function this worker holds WARM/HOT through the consumer group, and
  re-claims invocations left pending by dead workers (at-least-once delivery);
- engine loop: steps every HOT engine that has work and publishes tokens on per-request streams;
- heartbeat: refreshes liveness and the WorkerInfo the router, warmer and `warmserve status` read;
- cancel listener: aborts requests whose client went away.
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
from gpu_runtime import SamplingParams, Tokenizer
from gpu_runtime.tokenizer import IncrementalDecoder
from invoker import control, keys
from invoker.registry import Registry
from invoker.schemas import Invocation, WorkerInfo, event
from invoker.serving import ServingModels
from invoker.states import SERVABLE
from invoker.submit import HEARTBEAT_TIMEOUT_S

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
RESPONSE_TTL_S = 600  # an answer nobody reads expires instead of piling up
MAX_INFLIGHT_PER_FUNCTION = 64


@dataclass
class Running:
    """One invocation being generated here."""

    inv: Invocation
    entry_id: bytes
    decoder: IncrementalDecoder
    text: str = ""  # everything decoded so far (for stop strings)
    sent_chars: int = 0  # how much of `text` has been published
    pos: int = 0
    started: float = field(default_factory=time.time)


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
        self.tokenizers: dict[str, Tokenizer] = {}
        self.specs: dict[str, FunctionSpec] = {}
        self.specs_version = -1
        self.running: dict[str, Running] = {}
        self.last_used: dict[str, float] = {}  # keep-alive clock per function, read by the warmer
        self.lock = threading.RLock()  # guards models/engines between control jobs and the engine loop
        self.work = threading.Event()
        self.stopping = threading.Event()
        self.started = time.time()
        self.last_reclaim = 0.0

    # ---- control jobs (RQ main thread) ----
    def apply_control(self, action: str, function: str) -> str:
        spec = self.spec(function)
        if spec is None:
            raise ValueError(f"function '{function}' is not deployed")
        t0 = time.perf_counter()
        with self.lock:
            if action in ("deactivate", "evict") and self.inflight(function):
                raise RuntimeError(f"'{function}' has {self.inflight(function)} running requests; not moving it")
            state = self.models.apply(action, spec)
        log.info("%s %s -> %s in %.1f ms", action, function, state, (time.perf_counter() - t0) * 1e3)
        if state in SERVABLE:  # let the next cold request route at once instead of waiting out the lock
            self.r.delete(keys.routing_lock(function))
        self.publish_info()
        return state

    # ---- registry ----
    def spec(self, function: str) -> FunctionSpec | None:
        version = self.registry.version()
        if version != self.specs_version:
            self.specs, self.specs_version = self.registry.all(), version
            for gone in set(self.models.states()) - set(self.specs):
                log.info("function %s was removed; evicting it", gone)
                with self.lock:
                    self.models.drop(gone)
        return self.specs.get(function)

    def tokenizer(self, spec: FunctionSpec) -> Tokenizer:
        if spec.name not in self.tokenizers:
            self.tokenizers[spec.name] = Tokenizer.from_pretrained(spec.model)
        return self.tokenizers[spec.name]

    def inflight(self, function: str) -> int:
        return sum(1 for run in list(self.running.values()) if run.inv.function == function)

    # ---- heartbeat ----
    def info(self) -> WorkerInfo:
        mem = self.models.memory()
        inflight: dict[str, int] = {}
        for run in list(self.running.values()):
            inflight[run.inv.function] = inflight.get(run.inv.function, 0) + 1
        return WorkerInfo(
            worker_id=self.worker_id,
            host=socket.gethostname(),
            device=self.device,
            total_bytes=mem["total_bytes"],
            free_bytes=mem["free_bytes"],
            lendable_kv_bytes=mem["lendable_kv_bytes"],
            models=self.models.states(),
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
        self.spec("")  # refresh the registry
        states = self.models.states()
        return {
            keys.invocations(fn): ">"
            for fn in self.specs
            if states.get(fn) in SERVABLE and self.inflight(fn) < MAX_INFLIGHT_PER_FUNCTION
        }

    def consume_once(self) -> None:
        streams = self.served_streams()
        if time.monotonic() - self.last_reclaim > HEARTBEAT_S:
            self.last_reclaim = time.monotonic()
            self.reclaim_orphans()
        if not streams:
            self.stopping.wait(0.1)
            return
        got = self.r.xreadgroup(keys.GROUP, self.worker_id, streams, count=16, block=200)
        for _stream, entries in got or []:
            for entry_id, fields in entries:
                self.start(entry_id, fields)

    def reclaim_orphans(self) -> None:
        """Take over invocations claimed by workers whose heartbeat stopped."""
        alive_since = time.time() - HEARTBEAT_TIMEOUT_S
        for fn, state in self.models.states().items():
            if state not in SERVABLE:
                continue
            stream = keys.invocations(fn)
            try:
                consumers = self.r.xinfo_consumers(stream, keys.GROUP)
            except redis.ResponseError:
                continue  # stream or group gone (function removed)
            for c in consumers:
                name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                if name == self.worker_id:
                    continue
                score = self.r.zscore(keys.WORKERS, name)
                if score is not None and score >= alive_since:
                    continue
                if c["pending"] == 0:
                    self.r.xgroup_delconsumer(stream, keys.GROUP, name)
                    continue
                pending = self.r.xpending_range(stream, keys.GROUP, "-", "+", 64, consumername=name)
                ids = [p["message_id"] for p in pending]
                for entry_id, fields in self.r.xclaim(stream, keys.GROUP, self.worker_id, 0, ids):
                    if fields:
                        log.warning("re-delivering %s of %s from dead worker %s", entry_id, fn, name)
                        self.start(entry_id, fields)
                    else:  # the entry was deleted (already answered); just drop the claim
                        self.r.xack(stream, keys.GROUP, entry_id)

    def start(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """Begin generating one invocation (read from the stream or re-claimed from a dead worker)."""
        try:
            inv = Invocation.from_fields(fields)
        except (KeyError, ValueError, TypeError) as exc:
            log.error("dropping malformed invocation %s: %s", entry_id, exc)
            return
        spec = self.spec(inv.function)
        if spec is None:
            self.finish_error(inv, entry_id, 404, f"function '{inv.function}' is not deployed")
            return
        if inv.request_id in self.running:
            return  # already generating it (claimed twice)
        try:
            with self.lock:
                engine = self.models.engine(spec)  # WARM -> HOT on the first request
                run = Running(inv, entry_id, IncrementalDecoder(self.tokenizer(spec)))
                self.running[inv.request_id] = run
                s = inv.sampling
                engine.add_request(
                    inv.request_id,
                    list(inv.prompt_ids),
                    SamplingParams(
                        max_tokens=s.max_tokens,
                        temperature=s.temperature,
                        top_p=s.top_p,
                        top_k=s.top_k,
                        seed=s.seed,
                        stop_token_ids=s.stop_token_ids,
                        ignore_eos=s.ignore_eos,
                    ),
                )
        except Exception as exc:  # a model that can't load fails its requests, not the worker
            log.exception("cannot start %s on %s", inv.request_id, inv.function)
            self.running.pop(inv.request_id, None)
            self.finish_error(inv, entry_id, 503, f"function '{inv.function}' could not be served: {exc}")
            return
        self.last_used[inv.function] = time.time()
        self.emit(inv.request_id, event("start", worker=self.worker_id, prompt_tokens=len(inv.prompt_ids)))
        self.work.set()

    # ---- generating ----
    def engine_once(self) -> None:
        """Step every HOT engine that has work once (round robin over models), then publish their tokens."""
        busy = False
        for fn in {run.inv.function for run in list(self.running.values())}:
            with self.lock:
                engine = self.models.hot_engine(fn)
                if engine is None or not engine.has_unfinished():
                    continue
                busy = True
                try:
                    outs = engine.step()
                except Exception as exc:
                    log.exception("engine step failed for %s", fn)
                    self.fail_function(fn, str(exc))
                    continue
            self.publish(outs)
        if not busy:
            self.work.wait(0.05 if not self.running else 0.01)
            self.work.clear()

    def publish(self, outs: list) -> None:
        with self.r.pipeline(transaction=False) as p:
            done = []
            for out in outs:
                run = self.running.get(out.request_id)
                if run is None:
                    continue
                finished, reason = out.finished, out.finish_reason
                for tok in out.new_token_ids:
                    run.text += run.decoder.push([tok])
                    stops = run.inv.sampling.stop
                    hit = min((i for i in (run.text.find(s) for s in stops) if i >= 0), default=-1)
                    if hit >= 0:
                        run.text, finished, reason = run.text[:hit], True, "stop"
                    limit = len(run.text) if finished else len(run.text) - hold_back(run.text, stops)
                    delta = run.text[run.sent_chars : max(limit, run.sent_chars)]
                    run.sent_chars += len(delta)
                    self.emit(run.inv.request_id, event("token", pos=run.pos, id=tok, text=delta), pipe=p)
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
                        self.models.hot_engine(run.inv.function).abort(run.inv.request_id)
                    tail = run.text[run.sent_chars :]
                    if tail:
                        self.emit(run.inv.request_id, event("token", pos=run.pos, id=-1, text=tail), pipe=p)
                    self.emit(
                        run.inv.request_id,
                        event("done", finish_reason=reason or "stop", completion_tokens=run.pos),
                        pipe=p,
                    )
                    done.append(run)
            p.execute()
        for run in done:
            self.ack(run.inv, run.entry_id)

    def emit(self, request_id: str, fields: dict, pipe: redis.client.Pipeline | None = None) -> None:
        target = pipe if pipe is not None else self.r.pipeline(transaction=False)
        target.xadd(keys.response(request_id), fields)
        target.expire(keys.response(request_id), RESPONSE_TTL_S)
        if pipe is None:
            target.execute()

    def ack(self, inv: Invocation, entry_id: bytes) -> None:
        """The answer is complete on its stream: only now does the invocation leave the queue."""
        self.running.pop(inv.request_id, None)
        self.last_used[inv.function] = time.time()
        stream = keys.invocations(inv.function)
        with self.r.pipeline() as p:
            p.xack(stream, keys.GROUP, entry_id)
            p.xdel(stream, entry_id)
            p.execute()

    def finish_error(self, inv: Invocation, entry_id: bytes, status: int, message: str) -> None:
        self.emit(inv.request_id, event("error", status=status, message=message))
        self.ack(inv, entry_id)

    def fail_function(self, function: str, message: str) -> None:
        for run in [r for r in self.running.values() if r.inv.function == function]:
            self.finish_error(run.inv, run.entry_id, 500, f"engine failure: {message}")

    # ---- cancellation ----
    def cancel_once(self) -> None:
        with self.r.pubsub(ignore_subscribe_messages=True) as pubsub:
            pubsub.subscribe(keys.CANCEL_CHANNEL)
            while not self.stopping.is_set():
                msg = pubsub.get_message(timeout=0.5)
                run = self.running.get(msg["data"].decode()) if msg else None
                if run is None:
                    continue
                with self.lock:
                    engine = self.models.hot_engine(run.inv.function)
                    if engine is not None:
                        engine.abort(run.inv.request_id)
                log.info("cancelled %s (client disconnected)", run.inv.request_id)
                self.ack(run.inv, run.entry_id)

    # ---- lifecycle ----
    def run(self) -> None:
        control.bind(self)
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
