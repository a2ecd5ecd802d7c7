"""Discrete-event model of a GPU cluster serving many LLM functions.

What is modelled, and why at this grain (docs/simulator.md has the full list):
- GPUs with a memory capacity: weights of every resident instance (LOADING/WARM/HOT) plus the KV bytes of live
  requests must fit; a request reserves KV for prompt + output on admission (no preemption).
- Instances run continuous batching. No per-token events: between two changes of a batch (admission, prefill end,
  a request finishing) every sequence advances one token per decode step of constant length, so each instance
  keeps a "virtual token clock" V and a heap of the V at which each request finishes; only finishes are events.
  Prefills run as separate steps that pause decoding (vLLM's default order).
- Instances sharing a GPU take turns on it: each step also waits for one step of every busy neighbour (decode is
  memory-bandwidth bound and prefill compute bound, so co-located engines' steps add up rather than overlap).
- Loads: disk -> host cache (per worker, FIFO disk, LRU host cache), host -> GPU over a per-GPU PCIe link (FIFO);
  a disk read and its PCIe copy are pipelined (ServerlessLLM's loader). Then an engine start (policy-dependent).
- KV reservations: an instance whose policy reserves KV (warmserve, like the live worker's memory pool) holds a
  KV pool per GPU from activation to deactivation; its requests use that pool, and it counts as taken memory.
- KV lending: WARM weights may sit in the idle part of a HOT instance's pool, and a new pool may share the part
  the lender's own forecast leaves idle (`Policy.pool_lend`). When the lender's requests need the pages, WARM
  copies on that GPU are evicted (to HOST) on the spot and idle borrowing pools deactivated first; a busy
  borrower keeps its live pages until its requests finish. A reclaim that could not make room evicts nothing.
- A request whose KV cannot fit next to its model's weights on an empty GPU is refused on arrival (the gateway's
  400): it never queues, so it blocks nobody.
Policies (sim/policies.py) act only through the methods marked "policy API" below.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from protocol.states import ARRIVAL_ORDER, ModelState
from sim.engine_model import EngineModel, Profile
from sim.traces import Workload

_ARRIVAL, _STEP, _READY, _TICK, _SAMPLE = range(5)


@dataclass(frozen=True)
class SimFunction:
    name: str
    model: str  # key into sim.models.MODELS
    engine: EngineModel
    slo_ttft_s: float
    capacity_rps: float
    keep_alive_s: float
    target_concurrency: int  # requests per instance before an autoscaler wants another one
    # per GPU (sim/sizing.py): the KV one instance keeps live at `capacity_rps` (an engine owning its memory), and
    # warmserve's KV pool, sized for the function's own traffic, with the capacity that pool gives
    kv_full_bytes: float = 0.0
    kv_pool_bytes: float = 0.0
    pool_capacity_rps: float = 0.0


class Inst:
    """One function's weights on a GPU group, plus its batch state."""

    __slots__ = (
        "iid", "f", "gpus", "node", "state", "since", "last_used", "ready_at", "ver", "heap", "V", "t_upd",
        "waiting", "in_prefill", "batch", "n_active", "kv_tok", "busy", "then", "shard", "kv_bytes", "kv_cap", "step_s",
        "reserve", "borrows",
    )  # fmt: skip

    def __init__(
        self, iid: int, f: int, gpus: tuple[int, ...], node: int, state: ModelState, now: float, shard: int, reserve=0.0
    ):
        self.iid, self.f, self.gpus, self.node, self.state = iid, f, gpus, node, state
        self.since = self.last_used = self.ready_at = self.t_upd = now
        self.ver = 0
        self.heap: list[tuple[float, int]] = []  # (virtual finish, request)
        self.V = 0.0
        self.waiting: deque[int] = deque()  # admitted, waiting for prefill
        self.in_prefill = False
        self.batch: list[int] = []  # requests in the running prefill
        self.n_active = 0
        self.kv_tok = 0.0  # KV tokens the decode step reads (prompt + half the output per request)
        self.busy = False
        self.then: ModelState = ModelState.HOT  # state after LOADING
        self.shard = shard
        self.kv_bytes = 0.0  # per GPU, held by this instance's live requests
        self.step_s = 0.0  # its own current step (decode step or running prefill), before GPU sharing
        # per GPU: KV pool held while HOT (0: none, requests take free memory as they come)
        self.reserve = float(reserve)
        # per GPU: KV quota (MuxServe's quotas set by the static policy; a reserving instance's own pool)
        self.kv_cap = self.reserve or float("inf")
        # HOT with a pool that shares other pools' idle part (lent at activation): its requests take pages only
        # where the lenders' own idle parts stay whole, and it gives way (is deactivated) when a lender needs them
        self.borrows = False

    def load(self) -> int:
        return self.n_active + len(self.waiting) + len(self.batch)


def preload_order(by_popularity: list[int], nbytes: list[int], capacity: int) -> list[int]:
    """Host-cache preload: the most popular functions that fit (a less popular one never pushes out a more popular
    one), inserted least popular first so the LRU cache keeps the most popular longest. bench/replay.py loads a
    live worker's cache the same way."""
    chosen, used = [], 0
    for f in by_popularity:
        if used + nbytes[f] <= capacity:
            chosen.append(f)
            used += nbytes[f]
    return chosen[::-1]


class Sim:
    def __init__(
        self,
        profile: Profile,
        functions: list[SimFunction],
        workload: Workload,
        n_nodes: int,
        gpus_per_node: int,
        policy,
        sample_s: float = 10.0,
        max_drain_s: float = 1800.0,
        host_preload: list[int] | None = None,
    ):
        self.p, self.fns, self.w, self.policy = profile, functions, workload, policy
        self.n_nodes, self.gpn = n_nodes, gpus_per_node
        n = n_nodes * gpus_per_node
        self.n_gpus = n
        self.cap = float(profile.usable_bytes)
        self.weights = [0.0] * n
        self.kv = [0.0] * n
        self.n_busy = [0] * n
        self.on_gpu: list[list[Inst]] = [[] for _ in range(n)]
        self.pcie_free = [0.0] * n
        self.occ_since = [None] * n
        self.gpu_seconds = 0.0
        self.disk_free = [0.0] * n_nodes
        self.host: list[OrderedDict[int, float]] = [OrderedDict() for _ in range(n_nodes)]  # fn -> ready time
        self.host_used = [0.0] * n_nodes
        self.insts: dict[int, Inst] = {}
        self.by_fn: list[list[Inst]] = [[] for _ in functions]
        self.queue: list[deque[int]] = [deque() for _ in functions]
        self._iid = 0
        self._events: list = []
        self._seq = 0
        self.now = workload.start_s
        self.end = workload.start_s + workload.duration_s
        self.kv_per_tok = [f.engine.m.kv_bytes_per_token / f.engine.m.tp for f in functions]
        nreq = len(workload)
        self.first_token = np.full(nreq, np.nan)
        self.refused = np.zeros(nreq, dtype=bool)  # could never fit: answered 400 on arrival, not measured
        self.finish = np.full(nreq, np.nan)
        self.arrived = np.zeros(len(functions), dtype=np.int64)
        # per request: the state its function's model was in on arrival, as an index into ARRIVAL_ORDER (the
        # live gateway's x-warmserve-state)
        self.arrival_state = np.full(nreq, len(ARRIVAL_ORDER) - 1, dtype=np.int8)
        self.sample_s = sample_s
        self.max_drain_s = max_drain_s
        self.timeline: list[tuple] = []  # (t, weights GB, kv GB, #LOADING, #WARM, #HOT, queued)
        self.max_mem_frac = 0.0
        self.events = 0
        self.completed = 0
        self.counters = {"loads": 0, "disk_loads": 0, "activations": 0, "reclaims": 0, "evictions": 0,
                         "refused": 0, "dropped": 0, "kv_short": 0, "demotions": 0, "borrowed_pools": 0}  # fmt: skip
        self.target = [policy.target_concurrency or f.target_concurrency for f in functions]
        self.max_batch = policy.max_batch or profile.max_batch
        for node in range(n_nodes):
            for f in preload_order(host_preload or [], [fn.engine.m.weight_bytes for fn in functions],
                                   profile.host_memory_bytes):  # fmt: skip
                self._host_insert(node, f, workload.start_s)

    # ---------------------------------------------------------------- run loop
    def run(self) -> Sim:
        w = self.w
        t_arr, fn_arr = w.t, w.fn
        end = w.start_s + w.duration_s
        self.policy.setup(self)
        if self.policy.tick_s:
            self._push(w.start_s, _TICK, None, 0)
        self._push(w.start_s, _SAMPLE, None, 0)
        i, n = 0, len(t_arr)
        ev = self._events
        while True:
            t_next = ev[0][0] if ev else np.inf
            if i < n and t_arr[i] <= t_next:
                self.now = float(t_arr[i])
                self._arrive(i, int(fn_arr[i]))
                i += 1
                self.events += 1
                continue
            if not ev:
                break
            t, _, kind, obj, ver = heapq.heappop(ev)
            if kind in (_TICK, _SAMPLE) and t > end and (not self._busy_any() or t > end + self.max_drain_s):
                continue  # stop the clocks once the run is over and drained (or given up on)
            self.now = t
            self.events += 1
            if kind == _STEP:
                if obj.ver == ver and obj.iid in self.insts:
                    self._step(obj)
            elif kind == _READY:
                if obj.iid in self.insts and obj.ver == ver:
                    self._ready(obj)
            elif kind == _TICK:
                self.policy.on_tick(self, t)
                self._push(t + self.policy.tick_s, _TICK, None, 0)
            elif kind == _SAMPLE:
                self._sample()
                self._push(t + self.sample_s, _SAMPLE, None, 0)
        for g in range(self.n_gpus):
            if self.occ_since[g] is not None:
                self.gpu_seconds += max(0.0, min(self.now, end) - self.occ_since[g])
                self.occ_since[g] = None
        return self

    def _busy_any(self) -> bool:
        return any(q for q in self.queue) or any(x.load() for x in self.insts.values())

    def _push(self, t: float, kind: int, obj, ver: int) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, obj, ver))

    # ---------------------------------------------------------------- requests
    def _arrive(self, r: int, f: int) -> None:
        self.arrived[f] += 1
        self.arrival_state[r] = self._state_of(f)
        if self._kv_need(f, r) > self.cap - self.fns[f].engine.m.shard_bytes:
            self.refused[r] = True  # the gateway answers 400 (invoker/admission.py): it never queues
            self.counters["refused"] += 1
            return
        if self.policy.max_queue is not None and sum(len(q) for q in self.queue) >= self.policy.max_queue:
            self.counters["dropped"] += 1  # the server's queue is full: 503, a miss like any unserved request
            return
        if self.queue[f]:  # first come, first served
            self.queue[f].append(r)
            self._drain(f)
            if self.queue[f]:
                self.policy.on_pressure(self, f, self.now)
            return
        inst = self._pick(f, r)
        if inst is None:
            self.queue[f].append(r)
            self.policy.on_pressure(self, f, self.now)
            return
        if inst.load() >= self.target[f]:
            self.policy.on_pressure(self, f, self.now)
        self._admit(inst, r)

    def _state_of(self, f: int) -> int:
        """Best state of f's model anywhere (invoker.submit.state_on_arrival's order)."""
        best = min((ARRIVAL_ORDER.index(x.state) for x in self.by_fn[f]), default=len(ARRIVAL_ORDER) - 1)
        host = ARRIVAL_ORDER.index(ModelState.HOST)
        if best > host and any(f in h and h[f] <= self.now for h in self.host):
            return host
        return best

    def _kv_need(self, f: int, r: int) -> float:
        return (int(self.w.prompt[r]) + int(self.w.output[r])) * self.kv_per_tok[f]

    def _pick(self, f: int, r: int) -> Inst | None:
        """Least-loaded HOT instance of f with batch room and KV memory for r (reclaiming lent memory)."""
        need = self._kv_need(f, r)
        best = None
        for x in self.by_fn[f]:
            if x.state is ModelState.HOT and x.load() < self.max_batch and (best is None or x.load() < best.load()):
                if self._kv_fits(x, need):
                    best = x
        return best

    def _kv_fits(self, x: Inst, need: float) -> bool:
        if x.kv_bytes + need > x.kv_cap and x.load():  # over quota (one request may always run)
            return False
        for g in x.gpus:
            if (
                self.physical_free(g) < need
                and not self._reclaim(g, need)
                and not (not x.borrows and self._demote_borrowers(g, need))
            ):
                self.counters["kv_short"] += 1
                return False
        return True

    def _demote_borrowers(self, g: int, need: float) -> bool:
        """A lender needs pages a borrowing pool shares: deactivate idle borrowers on g (HOT -> WARM, their pool
        returns) and reclaim WARM copies until `need` fits. A busy borrower keeps its live pages until its
        requests finish (no engine can take pages in use back)."""
        for y in [y for y in self.on_gpu[g] if y.borrows and y.state is ModelState.HOT and not y.load()]:
            self.counters["demotions"] += 1
            self.deactivate(y)
        return self._reclaim(g, need)

    def _reclaim(self, g: int, need: float, exclude: Inst | None = None, dry: bool = False) -> bool:
        """Evict WARM copies on GPU g until `need` bytes fit: of live KV (physical room), or with `exclude` (an
        instance being activated) of a new pool (room no pool holds, plus what the policy lends of other pools'
        idle part, `Policy.pool_lend`). True if they fit. Evicts nothing if evicting every WARM copy would not
        make them fit (a reclaim that fails anyway would throw copies away for nothing); `dry`: only say."""
        lend = 0.0 if exclude is None else self.policy.pool_lend(self, g, exclude)

        def room() -> float:
            return self.physical_free(g) if exclude is None else min(self.free_bytes(g) + lend, self.physical_free(g))

        warm = [x for x in self.on_gpu[g] if x.state is ModelState.WARM and x is not exclude]
        if room() + sum(x.shard for x in warm) < need:
            return False
        if dry:
            return True
        for x in sorted(warm, key=lambda x: (x.last_used, x.iid)):
            if room() >= need:
                break
            self.counters["reclaims"] += 1
            self.unload(x)
        return room() >= need

    def _admit(self, x: Inst, r: int) -> None:
        need = self._kv_need(x.f, r)
        for g in x.gpus:
            self.kv[g] += need
            self._check_mem(g)
        x.kv_bytes += need
        x.waiting.append(r)
        x.last_used = self.now
        self._kick(x)

    def _drain(self, f: int) -> None:
        """Admit queued requests of f to instances with room, oldest first."""
        q = self.queue[f]
        while q:
            inst = self._pick(f, q[0])
            if inst is None:
                return
            self._admit(inst, q.popleft())

    # ---------------------------------------------------------------- batch engine
    def _shared(self, x: Inst, own: float) -> float:
        """A step of x when it shares GPUs with busy engines: they take turns (time slicing), so each of x's
        steps also waits for one step of every busy neighbour on its most crowded GPU. Neighbours' step lengths
        are the ones they last scheduled with (a neighbour's batch change does not re-time x: a small lag)."""
        extra = 0.0
        for g in x.gpus:
            if self.n_busy[g] > (1 if x.busy else 0):
                extra = max(extra, sum(y.step_s for y in self.on_gpu[g] if y is not x and y.busy))
        return own + extra

    def _advance(self, x: Inst) -> None:
        if not x.in_prefill and x.n_active and self.now > x.t_upd:
            step = self._shared(x, self.fns[x.f].engine.decode_step_s(x.n_active, x.kv_tok))
            x.V += (self.now - x.t_upd) / step
        x.t_upd = self.now

    def _set_busy(self, x: Inst) -> None:
        busy = x.load() > 0
        if busy == x.busy:
            return
        x.busy = busy
        # a dict, not a set: iteration order must not depend on object addresses (runs must replay exactly)
        others = {y.iid: y for g in x.gpus for y in self.on_gpu[g] if y is not x and y.busy}
        for y in others.values():  # their step time is about to change: bank their progress at the old one
            self._advance(y)
        for g in x.gpus:
            self.n_busy[g] += 1 if busy else -1
        for y in others.values():
            self._schedule(y)

    def _kick(self, x: Inst) -> None:
        """Re-plan an instance's next event after its batch changed."""
        self._advance(x)
        self._set_busy(x)
        self._schedule(x)

    def _schedule(self, x: Inst) -> None:
        if x.in_prefill or x.state is not ModelState.HOT:
            return
        x.ver += 1
        if x.waiting:
            if self.now < x.ready_at:
                self._push(x.ready_at, _STEP, x, x.ver)
                return
            budget, batch, tokens = self.p.prefill_token_budget, [], 0
            while x.waiting and (not batch or tokens + self.w.prompt[x.waiting[0]] <= budget):
                r = x.waiting.popleft()
                tokens += int(self.w.prompt[r])
                batch.append(r)
            x.batch, x.in_prefill = batch, True
            x.step_s = self.fns[x.f].engine.prefill_s(tokens)
            dur = self._shared(x, x.step_s)
            self._push(self.now + dur, _STEP, x, x.ver)
        elif x.n_active:
            x.step_s = self.fns[x.f].engine.decode_step_s(x.n_active, x.kv_tok)
            step = self._shared(x, x.step_s)
            self._push(self.now + max(0.0, x.heap[0][0] - x.V) * step, _STEP, x, x.ver)

    def _step(self, x: Inst) -> None:
        now, w = self.now, self.w
        if x.in_prefill:
            x.in_prefill = False
            x.t_upd = now
            for r in x.batch:
                self.first_token[r] = now
                rest = int(w.output[r]) - 1
                if rest <= 0:
                    self._done(x, r, now)
                else:
                    heapq.heappush(x.heap, (x.V + rest, r))
                    x.n_active += 1
                    x.kv_tok += int(w.prompt[r]) + rest / 2
            x.batch = []
        else:
            self._advance(x)
            while x.heap and x.heap[0][0] <= x.V + 1e-6:
                _, r = heapq.heappop(x.heap)
                x.n_active -= 1
                x.kv_tok -= int(w.prompt[r]) + (int(w.output[r]) - 1) / 2
                self._done(x, r, now)
            if not x.n_active:
                x.kv_tok = 0.0
        x.last_used = now
        self._drain(x.f)
        self._kick(x)
        for f in {y.f for g in x.gpus for y in self.on_gpu[g]} - {x.f}:  # KV freed here may unblock neighbours
            if self.queue[f]:
                self._drain(f)

    def _done(self, x: Inst, r: int, now: float) -> None:
        if not np.isnan(self.finish[r]):
            raise RuntimeError(f"request {r} finished twice")
        self.finish[r] = now
        self.completed += 1
        need = self._kv_need(x.f, r)
        for g in x.gpus:
            self.kv[g] -= need
        x.kv_bytes -= need

    # ---------------------------------------------------------------- policy API
    def instances(self, f: int) -> list[Inst]:
        return self.by_fn[f]

    def free_bytes(self, g: int) -> float:
        """Memory of GPU g holding no weights, no live KV and no KV pool of a HOT instance (negative when WARM
        weights are lent the idle part of a pool)."""
        return self.cap - self.weights[g] - self.kv[g] - self.idle_reserved(g)

    def physical_free(self, g: int) -> float:
        """Memory of GPU g holding no weights and no live KV: what lending may use."""
        return self.cap - self.weights[g] - self.kv[g]

    def idle_reserved(self, g: int) -> float:
        """The idle part of the KV pools of HOT instances on GPU g."""
        return sum(max(0.0, x.reserve - x.kv_bytes) for x in self.on_gpu[g] if x.reserve and x.state is ModelState.HOT)

    def node_gpus(self, node: int) -> range:
        return range(node * self.gpn, (node + 1) * self.gpn)

    def place(self, f: int, gpus: tuple[int, ...], state: ModelState) -> Inst:
        """Make an instance resident at once (a policy's starting state, carried over from before the run)."""
        x = self._new(f, gpus, state)
        self._drain(f)
        return x

    def load(self, f: int, gpus: tuple[int, ...], then: ModelState, engine_start_s: float) -> Inst:
        """Copy f's weights to `gpus` (from host cache, or disk via the host), then start an engine / bind them.
        The instance is LOADING until then, and becomes `then` (HOT or WARM)."""
        x = self._new(f, gpus, ModelState.LOADING)
        x.then = then
        node = gpus[0] // self.gpn
        shard = x.shard
        src = self._host_ready(node, f)
        if src is None:  # not in host memory: disk read pipelined with the PCIe copy
            src = self.load_host(node, f)
            self.counters["disk_loads"] += 1
            start = self.now
        else:
            start = src = max(src, self.now)
        done = src
        for g in gpus:
            s = max(start, self.pcie_free[g])
            self.pcie_free[g] = s + shard / self.p.pcie_bytes_per_s
            done = max(done, self.pcie_free[g])
        self.counters["loads"] += 1
        x.ready_at = done + engine_start_s
        self._push(x.ready_at, _READY, x, x.ver)
        return x

    def load_host(self, node: int, f: int) -> float:
        """Start (or find) a disk -> host copy of f on `node`; returns when it is in host memory."""
        ready = self._host_ready(node, f)
        if ready is not None:
            return ready
        nbytes = self.fns[f].engine.m.weight_bytes
        t = max(self.now, self.disk_free[node]) + nbytes / self.p.disk_bytes_per_s
        self.disk_free[node] = t
        self._host_insert(node, f, t)
        return t

    def _host_ready(self, node: int, f: int) -> float | None:
        cache = self.host[node]
        if f in cache:
            cache.move_to_end(f)
            return cache[f]
        return None

    def _host_insert(self, node: int, f: int, ready: float) -> None:
        nbytes = self.fns[f].engine.m.weight_bytes
        cache = self.host[node]
        for old in list(cache):  # LRU, but never drop a copy still arriving
            if self.host_used[node] + nbytes <= self.p.host_memory_bytes:
                break
            if cache[old] <= self.now:
                self.host_used[node] -= self.fns[old].engine.m.weight_bytes
                del cache[old]
        if self.host_used[node] + nbytes <= self.p.host_memory_bytes:
            cache[f] = ready
            self.host_used[node] += nbytes

    def activate(self, x: Inst) -> bool:
        """WARM -> HOT: map KV pages (milliseconds). A pool must fit in memory no weights or live KV hold and, unless
        the policy lends idle pool memory, no other pool holds: WARM copies on its GPUs are evicted for it; if it
        still does not fit, nothing happens and False is returned."""
        assert x.state is ModelState.WARM, x.state
        if x.reserve:  # the pool the policy sizes for the function's traffic now (warmserve resizes them)
            x.reserve = float(self.policy.kv_reserve(x.f)) or x.reserve
            x.kv_cap = x.reserve
        if x.reserve and not all(self._reclaim(g, x.reserve, exclude=x, dry=True) for g in x.gpus):
            return False
        if x.reserve and not all(self._reclaim(g, x.reserve, exclude=x) for g in x.gpus):
            return False
        self.counters["activations"] += 1
        x.borrows = any(self.free_bytes(g) < x.reserve for g in x.gpus)
        self.counters["borrowed_pools"] += x.borrows
        x.state, x.since = ModelState.HOT, self.now
        x.ready_at = self.now + self.p.activate_s
        self._drain(x.f)
        self._kick(x)
        return True

    def deactivate(self, x: Inst) -> None:
        """HOT -> WARM; only an idle instance (its requests would be lost otherwise)."""
        assert x.state is ModelState.HOT and not x.load(), (x.state, x.load())
        x.state, x.since, x.borrows = ModelState.WARM, self.now, False
        x.ver += 1

    def unload(self, x: Inst) -> None:
        """Drop an idle instance's weights from its GPUs (the host copy stays, if any)."""
        assert not x.load() and x.state is not ModelState.LOADING, (x.state, x.load())
        self.counters["evictions"] += 1
        del self.insts[x.iid]
        self.by_fn[x.f].remove(x)
        for g in x.gpus:
            self.weights[g] -= x.shard
            self.on_gpu[g].remove(x)
            if not self.on_gpu[g]:  # GPU time is counted over the run, not the drain after it
                self.gpu_seconds += max(0.0, min(self.now, self.end) - self.occ_since[g])
                self.occ_since[g] = None
        x.ver += 1

    # ---------------------------------------------------------------- internals
    def _new(self, f: int, gpus: tuple[int, ...], state: ModelState) -> Inst:
        shard = self.fns[f].engine.m.shard_bytes
        for g in gpus:
            if self.physical_free(g) < shard:
                raise RuntimeError(f"GPU {g}: no room for {self.fns[f].name} ({shard / 1e9:.1f} GB)")
        self._iid += 1
        x = Inst(self._iid, f, gpus, gpus[0] // self.gpn, state, self.now, shard, self.policy.kv_reserve(f))
        self.insts[x.iid] = x
        self.by_fn[f].append(x)
        for g in gpus:
            self.weights[g] += shard
            if not self.on_gpu[g]:
                self.occ_since[g] = self.now
            self.on_gpu[g].append(x)
            self._check_mem(g)
        return x

    def _check_mem(self, g: int) -> None:
        self.max_mem_frac = max(self.max_mem_frac, (self.weights[g] + self.kv[g]) / self.cap)

    def _ready(self, x: Inst) -> None:
        if x.state is not ModelState.LOADING:
            return
        x.state, x.since, x.last_used = x.then, self.now, self.now
        self.policy.on_ready(self, x, self.now)
        if x.state is ModelState.HOT:
            self._drain(x.f)
            self._kick(x)

    def _sample(self) -> None:
        states = [0, 0, 0]
        for x in self.insts.values():
            states[(ModelState.LOADING, ModelState.WARM, ModelState.HOT).index(x.state)] += 1
        self.timeline.append(
            (self.now, sum(self.weights) / 1e9, sum(self.kv) / 1e9, *states, sum(len(q) for q in self.queue))
        )
