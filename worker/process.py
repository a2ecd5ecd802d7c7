"""The worker process: its threads, heartbeat, control jobs, and a clean start and stop.

Threads, and why each exists:
- main: RQ SimpleWorker on this worker's control queue (RQ installs signal handlers, so it must be the main
  thread); control jobs move models between COLD/HOST/WARM/HOT through `Models`;
- consumer: reads invocations of every function this worker holds WARM/HOT and re-claims orphans;
- engine: steps every HOT engine that has work and sends the outputs to the publisher process (`Streamer`);
- feedback: hears from the publisher process (worker/publisher.py: detokenizing, stop strings, writing answers and
  acknowledging invocations, off this process's GIL) which requests are done and which a stop string ended;
- heartbeat: refreshes liveness and the WorkerInfo the router, warmer and `warmserve status` read;
- cancels: aborts requests whose client went away.
A Redis outage stops none of them: a worker started while Redis is down waits for it, and every thread (the
control-job loop included) retries until it is back. Then, for one heartbeat timeout, no worker judges another
dead: all heartbeats paused with Redis, and re-claiming a live worker's requests would generate them twice.
They share three things, each guarding itself: the `RunningTable`, `Models` (a lock per function plus a short
lock for its dicts; the memory pool lets one model load while others serve), and the spec cache (`_specs_lock`).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from rq import Queue
from rq.exceptions import StopRequested

from functions.spec import FunctionSpec
from gpu_runtime.memory import ModelHost
from invoker.registry import Registry
from protocol import keys
from protocol.messages import WorkerInfo
from protocol.settings import Settings
from protocol.states import ControlAction, ModelState
from worker import control
from worker.consumer import Consumer
from worker.models import Models, identity
from worker.publisher import PublisherProcess
from worker.running import Counters, RunningTable
from worker.streamer import Streamer

log = logging.getLogger(__name__)


class Worker:
    def __init__(
        self,
        redis_url: str,
        device: str = "cpu",
        worker_id: str | None = None,
        settings: Settings | None = None,
        host: ModelHost | None = None,
        **memory: Any,
    ) -> None:
        self.settings = settings or Settings.from_env()
        self.r = redis.Redis.from_url(redis_url)
        self.redis_url = redis_url
        self.device = device
        self.worker_id = worker_id or f"{socket.gethostname()}-{device.replace(':', '')}-{uuid.uuid4().hex[:6]}"
        self.registry = Registry(self.r)
        self.models = Models(device, self.settings, host, **memory)
        self.running = RunningTable()
        self.counters = Counters()
        self.streamer = Streamer(
            self.r, self.settings, self.worker_id, self.models, self.running, self.counters, self.spec
        )
        self.consumer = Consumer(
            self.r, self.settings, self.worker_id, self.running, self.counters, self.streamer.start,
            self.streamer.cancel,
        )  # fmt: skip
        self._specs: dict[str, FunctionSpec] = {}
        self._specs_version = -1
        self._specs_checked = 0.0
        self._specs_lock = threading.Lock()
        self.stopping = threading.Event()
        self.started = time.time()
        self.threads: list[threading.Thread] = []
        self.publisher: PublisherProcess | None = None

    # ---- control jobs (RQ main thread) ----
    def apply_control(self, action: ControlAction, function: str) -> ModelState:
        spec = self.spec(function)
        if spec is None:
            raise ValueError(f"function '{function}' is not deployed")
        down = action in (ControlAction.DEACTIVATE, ControlAction.EVICT)
        if down:  # requests finishing right now (their last events being written) get a moment to leave
            deadline = time.monotonic() + self.settings.drain_wait_s
            while self.running.of(function) and time.monotonic() < deadline and not self.stopping.is_set():
                self.stopping.wait(0.01)
        with self.models.lock(function):
            busy = len(self.running.of(function))
            if down and busy:
                raise RuntimeError(f"'{function}' has {busy} running requests; not moving it")
            state = self.models.apply(action, spec)
        if state.servable:  # let the next cold request route at once instead of waiting out the lock
            self.r.delete(keys.routing_lock(function))
        self.publish_info()
        if action == ControlAction.ACTIVATE and state == ModelState.HOT:
            self.capture_graphs(function)
        return state

    def capture_graphs(self, function: str) -> None:
        """Capture the decode graphs of a model the warmer activated ahead of its traffic here, in the control job,
        one size per hold of its lock (a request arriving meanwhile steps in between). Left to its first steps, each
        capture would stall the engine thread, which every model's steps share, for tens of milliseconds, and the
        first of a model shape for seconds (its kernels compile); seen live in the replay. A model activated for a
        request (worker/streamer.py) captures lazily: its request should not wait for sizes it may never use."""
        engine = self.models.hot_engine(function)
        for rows in getattr(engine, "missing_graphs", list)():
            with self.models.lock(function):
                if self.models.hot_engine(function) is not engine or self.stopping.is_set():
                    return  # moved on meanwhile
                try:
                    engine.capture_graph(rows)
                except Exception:  # the lazy path is still there: never fail the activation for this
                    log.warning("%s: capturing the decode graph of %d rows failed", function, rows, exc_info=True)
                    return

    # ---- registry ----
    def spec(self, function: str) -> FunctionSpec | None:
        with self._specs_lock:
            known = self._specs.get(function)
        if known is None:  # deployed a moment ago, before the periodic check
            self.refresh_specs()
            with self._specs_lock:
                known = self._specs.get(function)
        return known

    def refresh_specs(self) -> None:
        """Pick up deploys and removals; retire models whose function is gone or now names another model."""
        with self._specs_lock:  # the consumer and the control thread both refresh
            version = self.registry.version()
            if version == self._specs_version:
                return
            old, self._specs, self._specs_version = self._specs, self.registry.all(), version
            gone = {
                name: "removed" if name not in self._specs else "redeployed with another model"
                for name, spec in old.items()
                if name not in self._specs or identity(self._specs[name]) != identity(spec)
            }
        for name, why in gone.items():
            self.streamer.retire(name, why)

    # ---- heartbeat ----
    def info(self) -> WorkerInfo:
        mem = self.models.memory()
        return WorkerInfo(
            worker_id=self.worker_id,
            host=socket.gethostname(),
            device=self.device,
            total_bytes=mem["total_bytes"],
            free_bytes=mem["free_bytes"],
            lendable_kv_bytes=mem["lendable_kv_bytes"],
            models=self.models.states(),
            inflight=self.running.inflight(),
            last_used=self.running.last_used(),
            started=self.started,
            heartbeat=time.time(),
            counters=self.counters.snapshot(),
        )

    def publish_info(self) -> None:
        info = self.info()
        with self.r.pipeline() as p:
            p.zadd(keys.WORKERS, {self.worker_id: info.heartbeat})
            p.hset(keys.worker(self.worker_id), "info", info.to_json())
            p.expire(keys.worker(self.worker_id), int(self.settings.heartbeat_timeout_s * 4))
            # workers gone for a minute drop out of the set entirely
            p.zremrangebyscore(keys.WORKERS, "-inf", info.heartbeat - 60)
            p.execute()

    # ---- thread bodies ----
    def heartbeat_once(self) -> None:
        self.stopping.wait(self.settings.heartbeat_s)
        self.publish_info()

    def consume_once(self) -> None:
        now = time.monotonic()
        if now - self._specs_checked > self.settings.registry_check_s:
            self._specs_checked = now
            self.refresh_specs()
        # requests waiting for a model are tried after each read: read briefly while there are some
        self.consumer.consume_once(self.models.states(), self.stopping, 20 if self.streamer.waiting else 200)
        self.streamer.retry_waiting()

    def step_once(self) -> None:
        self.streamer.step_once()

    def feedback_once(self) -> None:
        self.streamer.feedback_once()

    def cancels_once(self) -> None:
        self.consumer.listen_cancels(self.stopping)

    def forever(self, body: Callable[[], None]) -> None:
        """Run a thread's body until shutdown; an error is logged and retried, never ends the thread."""
        while not self.stopping.is_set():
            try:
                body()
            except redis.RedisError as exc:
                log.warning("%s: redis error (%s); retrying in 1 s", body.__name__, exc)
                self.consumer.defer_reclaim(self.settings.heartbeat_timeout_s)
                self.stopping.wait(1.0)
            except Exception:
                log.exception("%s failed; retrying in 1 s", body.__name__)
                self.stopping.wait(1.0)

    # ---- start and stop ----
    def wait_for_redis(self) -> None:
        """Block until Redis answers (or the process is stopping), saying so once: an operator who started the
        worker first, or whose Redis is restarting, sees why it has not registered yet."""
        waiting = False
        while not self.stopping.is_set():
            try:
                self.r.ping()
            except redis.RedisError as exc:
                if not waiting:
                    log.warning("worker %s: Redis at %s is unreachable (%s); waiting for it, retrying every 1 s",
                                self.worker_id, self.redis_url, exc)  # fmt: skip
                waiting = True
                self.stopping.wait(1.0)
                continue
            if waiting:
                log.warning("worker %s: Redis is reachable; registering", self.worker_id)
            return

    def start(self) -> None:
        """Register and start the serving threads (not the control-job loop: see `run`)."""
        control.bind(self)
        self.wait_for_redis()
        if self.stopping.is_set():
            return
        self.refresh_specs()
        self.publish_info()
        log.info("worker %s on %s registered (redis %s)", self.worker_id, self.device, self.redis_url)
        self.streamer.publisher = self.publisher = PublisherProcess(self.redis_url, self.settings, self.worker_id)
        self.threads = [
            threading.Thread(target=self.forever, args=(body,), name=body.__name__, daemon=True)
            for body in (self.heartbeat_once, self.consume_once, self.step_once, self.feedback_once, self.cancels_once)
        ]
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        """Stop the threads and leave the cluster: live workers re-deliver what this one had claimed."""
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=5)
        if self.publisher is not None:
            self.publisher.stop()  # after the engine thread: everything it produced is written first
        try:
            self.r.zrem(keys.WORKERS, self.worker_id)
            self.r.delete(keys.worker(self.worker_id))
        except redis.RedisError as exc:  # Redis is down: the entry ages out like a dead worker's
            log.warning("worker %s: could not deregister (%s)", self.worker_id, exc)
        log.info("worker %s stopped", self.worker_id)

    def run(self) -> None:
        """The process: serving threads, then RQ's control-job loop on the main thread until SIGTERM/SIGINT.

        The signal handlers go in before anything registers, so a signal at any moment stops the process: idle, it
        leaves at once; during a control job, after the job (a second signal is RQ's cold shutdown)."""
        current: list[control.ControlWorker] = []  # RQ's worker of the moment, for the signal handler

        def on_signal(signum: int, frame: object) -> None:
            self.stopping.set()
            if current:
                current[0].request_stop(signum, frame)  # raises StopRequested unless a job is running

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            self.start()
            self.control_loop(current)
        except StopRequested:
            pass
        finally:
            self.stop()

    def control_loop(self, current: list[control.ControlWorker]) -> None:
        """RQ's control-job loop until the process stops. RQ cannot create its worker while Redis is down and ends
        its loop (quietly) on a Redis error, so a fresh one takes over each time Redis is back."""
        for attempt in itertools.count():
            self.wait_for_redis()
            if self.stopping.is_set():
                return
            try:
                current[:] = [self.control_worker(attempt)]
                current[0].work(logging_level="WARNING")
            except redis.RedisError as exc:
                log.warning("control jobs: redis error (%s); restarting their loop", exc)
            self.stopping.wait(1.0)

    def control_worker(self, attempt: int) -> control.ControlWorker:
        """RQ's worker for this process's control queue; a fresh name per attempt, since RQ refuses to register a
        name whose previous registration (cut short by an outage) was never cleaned up."""
        queue = Queue(keys.control_queue(self.worker_id), connection=self.r, serializer=keys.CONTROL_SERIALIZER)
        name = f"{self.worker_id}-ctl-{os.getpid()}-{attempt}"
        return control.ControlWorker([queue], connection=self.r, name=name, stopping=self.stopping)
