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

import orjson
import redis
from rq import Queue

from functions.spec import FunctionSpec, footprint
from invoker import history
from invoker.registry import Registry
from invoker.submit import live_workers_sync, send_control
from modelinfo import ModelFileError
from protocol import keys
from protocol.messages import WorkerInfo
from protocol.settings import Settings
from protocol.states import ControlAction, ModelState
from warmer import cluster
from warmer.forecast import Prediction, act_on, for_settings, live_rate, this_and_next
from warmer.placement import plan

log = logging.getLogger(__name__)


def to_function(spec: FunctionSpec, settings: Settings) -> cluster.FunctionSpec:
    """The planner's view of a function, sized exactly as a worker's pool reserves it (serving dtype)."""
    size = footprint(spec, settings.kv_seqs)
    return cluster.FunctionSpec(
        name=spec.name,
        weight_bytes=size.weight_bytes,
        kv_bytes=size.kv_bytes,
        min_instances=spec.scaling.min_instances,
        max_instances=spec.scaling.max_instances,
        keep_alive_s=spec.scaling.keep_alive_s,
        slo_ttft_s=spec.slo.ttft_ms / 1000,
        capacity_rps=settings.capacity_rps,
    )


def to_view(
    workers: list[WorkerInfo], functions: dict[str, cluster.FunctionSpec], loads: dict[str, cluster.Load]
) -> cluster.ClusterView:
    """One live worker process is one device, so each becomes a cluster worker with a single GPU (index 0).
    A model a worker reports LOADING is a copy on its way; a HOT one lends the KV it reserved but does not use."""
    ws, insts = [], []
    for w in workers:
        gpu = cluster.GPU(0, w.total_bytes, w.free_bytes, w.lendable_kv_bytes)
        cached = frozenset(fn for fn, s in w.models.items() if s == ModelState.HOST)
        ws.append(cluster.Worker(w.worker_id, (gpu,), host_cached=cached))
        for fn, state in w.models.items():
            if state not in (ModelState.LOADING, ModelState.WARM, ModelState.HOT) or fn not in functions:
                continue
            reserved = functions[fn].kv_bytes if state == ModelState.HOT else 0
            used = w.last_used.get(fn, w.started)
            insts.append(
                cluster.Instance(
                    fn, w.worker_id, (0,), state, w.started, used, w.inflight.get(fn, 0),
                    kv_reserved_bytes=reserved,
                )
            )  # fmt: skip
    return cluster.ClusterView(tuple(ws), functions, tuple(insts), loads)


def queued_actions(r: redis.Redis, workers: list[WorkerInfo]) -> list[cluster.Action]:
    """Control jobs sent but not yet started: part of the cluster's future, so planning must not repeat them."""
    out = []
    for w in workers:
        for job in Queue(keys.control_queue(w.worker_id), connection=r, serializer=keys.CONTROL_SERIALIZER).get_jobs():
            kind, fn = ControlAction.parse(job.args[0]), job.args[1]
            out.append(cluster.Action(kind, fn, w.worker_id, () if kind == ControlAction.LOAD_HOST else (0,)))
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
    def __init__(self, r: redis.Redis, settings: Settings | None = None) -> None:
        self.r = r
        self.settings = settings or Settings.from_env()
        self.registry = Registry(r)
        self.forecaster = for_settings(self.settings)
        self.predictions: dict[str, tuple[Prediction, Prediction]] = {}
        self.predicted_window = -1

    def forecast(self, specs: dict[str, FunctionSpec], now: float) -> dict[str, Prediction]:
        """Forecast this window and the next once per window (history only changes at window boundaries); plan
        with the next one's too in the last `lead_s` of a window, as the simulator does."""
        s = self.settings
        window = int(now // s.window_s)
        if window != self.predicted_window or set(self.predictions) != set(specs):
            self.predictions = {
                fn: this_and_next(
                    self.forecaster,
                    history.read_counts(self.r, fn, now, s.window_s, s.history_windows, s.history_bucket_s),
                )
                for fn in specs
            }
            self.predicted_window = window
        until_next = (window + 1) * s.window_s - now
        return {
            fn: act_on(live_rate(cur, s), live_rate(nxt, s), until_next, s.lead_s)
            for fn, (cur, nxt) in self.predictions.items()
        }

    def loads(self, names: list[str], workers: list[WorkerInfo], now: float) -> dict[str, cluster.Load]:
        out = {}
        for fn in names:
            inflight = sum(w.inflight.get(fn, 0) for w in workers)
            depth = int(self.r.xlen(keys.invocations(fn)))
            rate = history.last_bucket_rate(self.r, fn, now, self.settings.history_bucket_s)
            out[fn] = cluster.Load(rate, inflight, max(0, depth - inflight))
        return out

    def step(self, now: float | None = None) -> list[cluster.Action]:
        """Plan once and send what is new; returns the actions sent."""
        now = time.time() if now is None else now
        specs = self.registry.all()
        workers = live_workers_sync(self.r, self.settings)
        if not workers or not specs:
            return []
        # The reference engine has no memory pool to prewarm into: the router loads it on demand.
        specs = {name: spec for name, spec in specs.items() if spec.engine != "transformers"}
        functions = {}
        for name, spec in specs.items():
            try:
                functions[name] = to_function(spec, self.settings)
            except ModelFileError as exc:  # its files went bad after the deploy: plan the others
                log.warning("warmer: cannot size function %s: %s", name, exc)
        specs = {name: specs[name] for name in functions}
        view = to_view(workers, functions, self.loads(list(specs), workers, now))
        view = with_pending(view, queued_actions(self.r, workers), now)
        sent = {k.decode(): float(v) for k, v in self.r.hgetall(keys.WARMER_STATE).items() if k != b"last_plan"}
        stale = [tag for tag, at in sent.items() if now - at > 10 * self.settings.resend_after_s]
        if stale:
            self.r.hdel(keys.WARMER_STATE, *stale)
        out = []
        for a in plan(view, self.forecast(specs, now), now):
            tag = f"{a.kind}:{a.function}:{a.worker}"
            if now - sent.get(tag, 0.0) < self.settings.resend_after_s:
                continue  # sent a moment ago and failed already: retry once a minute, not every round
            send_control(self.r, a.worker, a.kind, a.function, self.settings)
            self.r.hset(keys.WARMER_STATE, tag, now)
            log.info("warmer: %s %s on %s", a.kind, a.function, a.worker)
            out.append(a)
        self.r.hset(keys.WARMER_STATE, "last_plan", orjson.dumps({"at": now, "sent": len(out)}))
        return out


def run_warmer(redis_url: str, settings: Settings | None = None, policy: str = "warmserve") -> None:
    """Plan forever with `policy`: warmserve (this loop), or one of the simulator's baselines
    (warmer/baselines.py), which then also decide the cold path: the gateway's router leaves it to them."""
    r = redis.Redis.from_url(redis_url)
    if policy != "warmserve":
        from warmer.baselines import run_baseline  # it builds on this module

        return run_baseline(r, policy, settings or Settings.from_env())
    warmer = Warmer(r, settings)
    interval_s = warmer.settings.warmer_interval_s
    log.info("warmer planning every %.1f s with the %s forecaster", interval_s, warmer.settings.forecast_method)
    while True:
        t0 = time.monotonic()
        try:
            warmer.step()
        except redis.RedisError as exc:  # Redis down or restarting: wait for it, never exit
            log.warning("warmer: Redis unreachable (%s); retrying in %.1f s", exc, interval_s)
        except Exception:  # a bad plan must not stop prewarming for good
            log.exception("warmer: planning failed")
        time.sleep(max(0.0, interval_s - (time.monotonic() - t0)))
