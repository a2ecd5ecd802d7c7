"""The whole WarmServe stack as bench/replay.py runs it: Redis, one worker, the gateway and the warmer, each its own
process as in production, plus what a run needs of them: deploy, warm-up, reset between runs, seeded history and a
memory/state timeline sampled from the workers' heartbeats."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import redis
from rq.job import Job

from functions.spec import FunctionSpec
from invoker.registry import Registry
from invoker.submit import live_workers_sync, send_control
from protocol import keys
from protocol.messages import WorkerInfo
from protocol.settings import Settings
from protocol.states import ControlAction, ModelState

RESIDENT = (ModelState.LOADING, ModelState.WARM, ModelState.HOT)


def wait_until(check: Callable[[], object], timeout_s: float, what: str, every_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"replay: no {what} after {timeout_s:.0f} s")
        time.sleep(every_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    redis_url: str
    settings: Settings
    env: dict[str, str]  # WARMSERVE_* of every process
    logs: Path
    device: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    worker_args: list[str] = field(default_factory=list)  # e.g. --gpu-bytes for the dry run
    worker_env: dict[str, str] = field(default_factory=dict)
    url: str = ""
    server: object = None  # the embedded valkey server, when we started one

    @property
    def r(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def spawn(self, role: str, args: list[str], extra: dict[str, str] | None = None) -> None:
        log = open(self.logs / f"{role}.log", "a")  # noqa: SIM115 - closed with the process
        env = os.environ | self.env | (extra or {})
        cmd = [sys.executable, "-m", "warmserve.cli", *args, "--redis", self.redis_url]
        self.procs[role] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    def stop(self, role: str) -> None:
        proc = self.procs.pop(role, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        for role in list(self.procs):
            self.stop(role)
        if self.server is not None:
            self.server.stop()

    # -- roles
    def start_gateway(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.spawn("gateway", ["gateway", "--port", str(port), "--request-timeout", "600"])
        wait_until(lambda: _ok(f"{self.url}/healthz"), 120, "gateway /healthz", 0.2)

    def start_worker(self, extra: dict[str, str]) -> bool:
        """(Re)start the worker when its settings differ from the running one's; True when it did."""
        if "worker" in self.procs and extra == self.worker_env:
            return False
        self.stop("worker")
        self.r.delete(keys.WORKERS)
        self.worker_env = extra
        self.spawn("worker", ["worker", "--device", self.device, "--worker-id", "replay-0", *self.worker_args], extra)
        wait_until(lambda: self.workers(), 300, "worker heartbeat", 0.2)
        return True

    def warm_up(self, names: list[str]) -> None:
        """Load each function once and put it back: a model's first load on a fresh worker also builds its engine
        and compiles kernels, a cost the first policy to run would otherwise pay alone."""
        for fn in names:
            self.control(ControlAction.ACTIVATE, fn, 300)
            self.control(ControlAction.EVICT, fn)

    def start_warmer(self, policy: str) -> None:
        self.spawn("warmer", ["warmer", "--policy", policy])

    # -- state
    def workers(self) -> list[WorkerInfo]:
        return live_workers_sync(self.r, self.settings)

    def deploy(self, specs: list[FunctionSpec]) -> None:
        reg = Registry(self.r)
        for spec in specs:
            reg.deploy(spec)

    def control(self, action: ControlAction, function: str, timeout_s: float = 120.0) -> float:
        """Run one control job on the worker and wait for it; returns how long the worker took."""
        w = self.workers()[0]
        job = Job.fetch(send_control(self.r, w.worker_id, action, function, self.settings), connection=self.r,
                        serializer=keys.CONTROL_SERIALIZER)  # fmt: skip
        wait_until(lambda: job.get_status(refresh=True) in ("finished", "failed"), timeout_s, f"{action} {function}")
        job.refresh()
        if job.started_at is None or job.ended_at is None:
            return float("nan")
        return (job.ended_at - job.started_at).total_seconds()

    def evict_all(self) -> None:
        """Every model off the GPU (to host memory), so each run starts from the same place. Requests of the last
        run still generating past its drain time finish first: a model with running requests is not moved down."""
        wait_until(lambda: not any(n for w in self.workers() for n in w.inflight.values()), 300, "idle worker")
        for w in self.workers():
            for fn, state in w.models.items():
                if state in RESIDENT:
                    self.control(ControlAction.EVICT, fn)
        wait_until(lambda: not any(s in RESIDENT for w in self.workers() for s in w.models.values()), 60, "empty GPU")

    def preload_host(self, names: list[str]) -> None:
        """Load `names` (sim.cluster.preload_order's choice) into the worker's host cache, in that order."""
        for fn in names:
            self.control(ControlAction.LOAD_HOST, fn, 300)

    def clear(self, names: list[str]) -> None:
        """Forget the last run: queued invocations, arrival history, the warmer's memory and routing locks."""
        r = self.r
        for fn in names:
            r.xtrim(keys.invocations(fn), maxlen=0)
            r.delete(keys.history(fn), keys.routing_lock(fn))
        r.delete(keys.WARMER_STATE, keys.WARMER_POLICY)

    def seed_history(self, names: list[str], history: np.ndarray, t0: float) -> None:
        """The generator's earlier windows as arrival history ending at live time t0 (a window boundary): the
        warmer forecasts from them as from days of real traffic."""
        w = self.settings.window_s
        n = history.shape[1]
        with self.r.pipeline(transaction=False) as p:
            for f, fn in enumerate(names):
                counts = {int(t0 - (n - j) * w): int(c) for j, c in enumerate(history[f]) if c}
                if counts:
                    p.hset(keys.history(fn), mapping=counts)
            p.execute()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class Sampler:
    """Memory and model states every `every_s`, from the workers' reports; GPU-seconds = time any model was on
    the GPU (LOADING, WARM or HOT), as the simulator counts them."""

    def __init__(self, stack: Stack, names: list[str], t0: float, t_end: float, every_s: float = 0.5) -> None:
        self.stack, self.names, self.t0, self.t_end, self.every_s = stack, names, t0, t_end, every_s
        self.rows: list[tuple] = []  # (t, GB used, 0, #LOADING, #WARM, #HOT, queued): sim.report's timeline rows
        self.gpu_seconds = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        r = self.stack.r
        last = time.time()
        while not self.stop.wait(self.every_s):
            now = time.time()
            ws = self.stack.workers()
            states = [s for w in ws for s in w.models.values()]
            used = sum(w.total_bytes - w.free_bytes for w in ws) / 1e9
            queued = sum(int(r.xlen(keys.invocations(fn))) for fn in self.names)
            counts = [states.count(s) for s in RESIDENT]
            self.rows.append((round(now - self.t0, 2), round(used, 2), 0.0, *counts, queued))
            if any(counts):  # over the run's arrivals only, as the simulator counts
                self.gpu_seconds += max(0.0, min(now, self.t_end) - max(last, self.t0))
            last = now

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
