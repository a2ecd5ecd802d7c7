"""The live warmer: every few seconds, read the cluster from Redis, forecast, plan, send control jobs.

The planner (`warmer.placement.plan`) is the same pure function the simulator runs. This loop only translates:
Redis -> `ClusterView`, forecasts from the gateway's arrival history, and `Action`s -> RQ control jobs.
Everything already on its way is part of the view: jobs still waiting in a worker's queue are applied to it, and
a worker reports a model LOADING while it moves it. So planning again (or a restarted warmer) sends nothing twice;
an action that keeps failing is retried once a minute (ws:warmer remembers when each was sent).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import orjson
import redis
from rq import Queue

from functions.spec import FunctionSpec
from invoker import history, keys
from invoker.registry import Registry
from invoker.schemas import WorkerInfo
from invoker.serving import kv_bytes_for
from invoker.states import HOST, HOT, LOADING, WARM
from invoker.submit import live_workers_sync, send_control
from warmer import cluster
from warmer.forecast import DEFAULT_METHOD, Prediction, act_on, make_forecaster, this_and_next
from warmer.placement import plan

log = logging.getLogger(__name__)

WINDOW_S = 300  # forecast window (WarmServe's 5 minutes)
LEAD_S = 60.0  # start acting on the next window's forecast this long before it begins (the simulator's default)
HISTORY_WINDOWS = 8 * 24 * 12  # eight days of 5-minute windows: same time yesterday and a week ago
RESEND_AFTER_S = 60.0  # an action not reflected in the cluster after this long is sent again
CAPACITY_RPS = 4.0  # requests/s one HOT instance absorbs within SLO, until calibrated from the engine profile


def weight_bytes(model_dir: str) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def to_function(spec: FunctionSpec) -> cluster.FunctionSpec:
    return cluster.FunctionSpec(
        name=spec.name,
        weight_bytes=weight_bytes(spec.model),
        kv_bytes=kv_bytes_for(spec),
        min_instances=spec.scaling.min_instances,
        max_instances=spec.scaling.max_instances,
        keep_alive_s=spec.scaling.keep_alive_s,
        slo_ttft_s=spec.slo.ttft_ms / 1000,
        capacity_rps=CAPACITY_RPS,
    )


def to_view(
    workers: list[WorkerInfo], functions: dict[str, cluster.FunctionSpec], loads: dict[str, cluster.Load]
) -> cluster.ClusterView:
    """One live worker process is one device, so each becomes a cluster worker with a single GPU (index 0).
    A model a worker reports LOADING is a copy on its way; a HOT one lends the KV it reserved but does not use."""
    ws, insts = [], []
    for w in workers:
        gpu = cluster.GPU(0, w.total_bytes, w.free_bytes, w.lendable_kv_bytes)
        cached = frozenset(fn for fn, s in w.models.items() if s == HOST)
        ws.append(cluster.Worker(w.worker_id, (gpu,), host_cached=cached))
        for fn, state in w.models.items():
            if state not in (LOADING, WARM, HOT) or fn not in functions:
                continue
            reserved = functions[fn].kv_bytes if state == HOT else 0
            used = w.last_used.get(fn, w.started)
            insts.append(
                cluster.Instance(
                    fn, w.worker_id, (0,), cluster.State(state), w.started, used, w.inflight.get(fn, 0),
                    kv_reserved_bytes=reserved,
                )
            )  # fmt: skip
    return cluster.ClusterView(tuple(ws), functions, tuple(insts), loads)


def queued_actions(r: redis.Redis, workers: list[WorkerInfo]) -> list[cluster.Action]:
    """Control jobs sent but not yet started: part of the cluster's future, so planning must not repeat them."""
    out = []
    for w in workers:
        for job in Queue(keys.control_queue(w.worker_id), connection=r).get_jobs():
            kind, fn = job.args
            out.append(cluster.Action(kind, fn, w.worker_id, () if kind == "load_host" else (0,)))
    return out


def with_pending(view: cluster.ClusterView, pending: list[cluster.Action], now: float) -> cluster.ClusterView:
    for a in pending:
        if a.function not in view.functions:
            continue
        try:
            view = cluster.apply_actions(view, [a], now)
        except ValueError:
            continue  # already reflected in what the worker reports (or made moot by a later step)
    return view


class Warmer:
    def __init__(self, r: redis.Redis, method: str = DEFAULT_METHOD) -> None:
        self.r = r
        self.registry = Registry(r)
        self.forecaster = make_forecaster(method, window_s=WINDOW_S)
        self.predictions: dict[str, tuple[Prediction, Prediction]] = {}
        self.predicted_window = -1

    def forecast(self, specs: dict[str, FunctionSpec], now: float) -> dict[str, Prediction]:
        """Forecast this window and the next once per window (history only changes at window boundaries); plan
        with the next one's too in the last LEAD_S of a window, as the simulator does."""
        window = int(now // WINDOW_S)
        if window != self.predicted_window or set(self.predictions) != set(specs):
            self.predictions = {
                fn: this_and_next(self.forecaster, history.read_counts(self.r, fn, now, WINDOW_S, HISTORY_WINDOWS))
                for fn in specs
            }
            self.predicted_window = window
        until_next = (window + 1) * WINDOW_S - now
        return {fn: act_on(cur, nxt, until_next, LEAD_S) for fn, (cur, nxt) in self.predictions.items()}

    def loads(self, names: list[str], workers: list[WorkerInfo], now: float) -> dict[str, cluster.Load]:
        out = {}
        for fn in names:
            inflight = sum(w.inflight.get(fn, 0) for w in workers)
            depth = int(self.r.xlen(keys.invocations(fn)))
            out[fn] = cluster.Load(history.last_bucket_rate(self.r, fn, now), inflight, max(0, depth - inflight))
        return out

    def step(self, now: float | None = None) -> list[cluster.Action]:
        """Plan once and send what is new; returns the actions sent."""
        now = time.time() if now is None else now
        specs = self.registry.all()
        workers = live_workers_sync(self.r)
        if not workers or not specs:
            return []
        # The reference engine has no memory pool to prewarm into: the router loads it on demand.
        specs = {name: spec for name, spec in specs.items() if spec.engine != "transformers"}
        functions = {name: to_function(spec) for name, spec in specs.items()}
        view = to_view(workers, functions, self.loads(list(specs), workers, now))
        view = with_pending(view, queued_actions(self.r, workers), now)
        sent = {k.decode(): float(v) for k, v in self.r.hgetall(keys.WARMER_STATE).items() if k != b"last_plan"}
        stale = [tag for tag, at in sent.items() if now - at > 10 * RESEND_AFTER_S]
        if stale:
            self.r.hdel(keys.WARMER_STATE, *stale)
        out = []
        for a in plan(view, self.forecast(specs, now), now):
            tag = f"{a.kind}:{a.function}:{a.worker}"
            if now - sent.get(tag, 0.0) < RESEND_AFTER_S:
                continue  # sent a moment ago and failed already: retry once a minute, not every round
            send_control(self.r, a.worker, a.kind, a.function)
            self.r.hset(keys.WARMER_STATE, tag, now)
            log.info("warmer: %s %s on %s", a.kind, a.function, a.worker)
            out.append(a)
        self.r.hset(keys.WARMER_STATE, "last_plan", orjson.dumps({"at": now, "sent": len(out)}))
        return out


def run_warmer(redis_url: str, interval_s: float = 5.0, method: str = DEFAULT_METHOD) -> None:
    warmer = Warmer(redis.Redis.from_url(redis_url), method)
    log.info("warmer planning every %.1f s with the %s forecaster", interval_s, method)
    while True:
        t0 = time.monotonic()
        try:
            warmer.step()
        except redis.RedisError as exc:
            log.warning("warmer: redis error %s; retrying", exc)
        except Exception:  # a bad plan must not stop prewarming for good
            log.exception("warmer: planning failed")
        time.sleep(max(0.0, interval_s - (time.monotonic() - t0)))
