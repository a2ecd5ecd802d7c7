"""The worker in-process against a real Redis: consuming, streaming, lifecycle, errors by cause, concurrency.

No gateway and no subprocess: invocations go straight into the function's stream and answers are read from the
answer stream, exactly as the gateway would. Each test gets its own database and its own worker.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis
from conftest import wait_for

from functions.spec import footprint, parse_spec
from gpu_runtime.memory import ModelHost, ModelLoadError
from invoker.registry import Registry
from protocol import keys
from protocol.messages import (
    Done,
    Failed,
    FinishReason,
    Invocation,
    SamplingParams,
    Start,
    Token,
    decode_events,
)
from protocol.settings import Settings
from protocol.states import ControlAction, ModelState
from worker import control
from worker.process import Worker
from worker.publisher import hold_back

FN = "inproc"
FAST = Settings(heartbeat_s=0.2, heartbeat_timeout_s=1.0, registry_check_s=0.1)
MIB = 1 << 20


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/6")
    client.flushdb()
    return client


def new_worker(r, host: ModelHost | None = None, worker_id: str = "wa") -> Worker:
    url = f"redis://{r.connection_pool.connection_kwargs['host']}:{r.connection_pool.connection_kwargs['port']}/6"
    w = Worker(url, "cpu", worker_id, settings=FAST, host=host, gpu_bytes=512 * MIB, host_cache_bytes=512 * MIB)
    w.start()
    return w


@pytest.fixture
def worker(r):
    w = new_worker(r)
    yield w
    w.stop()


def deploy(r, model, name: str = FN, **extra) -> None:
    Registry(r).deploy(parse_spec({"name": name, "model": str(model), "max_model_len": 256, **extra}))


def invoke(r, prompt_ids, name: str = FN, **sampling) -> str:
    rid = f"cmpl-{uuid.uuid4().hex}"
    params = SamplingParams(**{"max_tokens": 8, "temperature": 0.0, "seed": 1, **sampling})
    r.xadd(keys.invocations(name), Invocation(rid, name, tuple(prompt_ids), params).to_fields())
    return rid


def answer(r, rid: str, timeout_s: float = 60.0) -> list:
    """Every event of one answer, up to its Done or Failed."""
    events, last, deadline = [], "0", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for _, entries in r.xread({keys.response(rid): last}, block=200) or []:
            for entry_id, fields in entries:
                last = entry_id
                events.extend(decode_events(fields))
                if isinstance(events[-1], Done | Failed):
                    return events
    raise TimeoutError(f"no complete answer for {rid}; got {events}")


def events_so_far(r, rid: str) -> list:
    return [ev for _, f in r.xrange(keys.response(rid)) for ev in decode_events(f)]


def queue_empty(r, name: str = FN) -> bool:
    return r.xlen(keys.invocations(name)) == 0 and r.xpending(keys.invocations(name), keys.GROUP)["pending"] == 0


# ---- consuming and streaming ----
def test_invocation_is_answered_in_order_then_acknowledged(r, worker, tiny_model):
    deploy(r, tiny_model)
    assert worker.apply_control(ControlAction.PREWARM, FN) == ModelState.WARM
    events = answer(r, invoke(r, [1, 5, 9], max_tokens=6, ignore_eos=True))
    assert isinstance(events[0], Start) and events[0].worker == "wa" and events[0].prompt_tokens == 3
    tokens = [e for e in events if isinstance(e, Token)]
    assert [t.pos for t in tokens] == list(range(6))
    assert events[-1] == Done(FinishReason.LENGTH, 6)
    wait_for(lambda: queue_empty(r), 10, "the invocation to be acknowledged")
    assert worker.models.state(FN) == ModelState.HOT  # the first request activated the WARM model


def test_orphans_of_a_dead_consumer_are_redelivered(r, worker, tiny_model):
    deploy(r, tiny_model)
    worker.apply_control(ControlAction.PREWARM, FN)
    worker.stopping.set()  # pause this worker's threads so the ghost below claims the entry first
    for t in worker.threads:
        t.join(5)
    rid = invoke(r, [1, 2, 3])
    assert r.xreadgroup(keys.GROUP, "ghost", {keys.invocations(FN): ">"}, count=1)  # a worker that then died
    worker.stopping.clear()
    worker.start()
    events = answer(r, rid)
    assert isinstance(events[-1], Done)
    wait_for(lambda: queue_empty(r), 10, "the re-delivered invocation to be acknowledged")
    assert worker.counters.snapshot()["redelivered"] == 1


def test_malformed_entry_is_dropped_and_counted(r, worker, tiny_model):
    deploy(r, tiny_model)
    worker.apply_control(ControlAction.PREWARM, FN)
    r.xadd(keys.invocations(FN), {"inv": b"not json"})
    assert isinstance(answer(r, invoke(r, [4, 5]))[-1], Done)
    wait_for(lambda: queue_empty(r), 10, "both entries to leave the queue")
    assert worker.counters.snapshot()["malformed"] == 1


def test_cancel_stops_generation_and_frees_the_entry(r, worker, slow_model):
    deploy(r, slow_model, max_model_len=1024)
    worker.apply_control(ControlAction.ACTIVATE, FN)
    rid = invoke(r, [1, 2, 3], max_tokens=1000, ignore_eos=True)  # far longer than the cancel takes
    wait_for(lambda: len(events_so_far(r, rid)) >= 3, 30, "the first tokens")
    r.publish(keys.CANCEL_CHANNEL, rid)
    wait_for(lambda: not worker.running.all(), 10, "the cancelled request to leave the worker")
    wait_for(lambda: queue_empty(r), 10, "the cancelled invocation to be acknowledged")
    events = events_so_far(r, rid)
    assert not any(isinstance(e, Done) for e in events) and len(events) < 1000
    assert worker.counters.snapshot()["cancelled"] == 1


def test_stop_string_text_is_held_back_until_it_cannot_match():
    assert hold_back("hello wor", ("world",)) == 3
    assert hold_back("hello", ("xyz",)) == 0
    assert hold_back("ab", ("abc", "b!")) == 2


# ---- lifecycle ----
def test_control_actions_move_the_model_and_are_reported(r, worker, tiny_model):
    deploy(r, tiny_model)
    steps = [
        (ControlAction.LOAD_HOST, ModelState.HOST),
        (ControlAction.PREWARM, ModelState.WARM),
        (ControlAction.ACTIVATE, ModelState.HOT),
        (ControlAction.DEACTIVATE, ModelState.WARM),
        (ControlAction.EVICT, ModelState.HOST),
    ]
    for action, want in steps:
        assert worker.apply_control(action, FN) == want
        assert worker.info().models[FN] == want


def test_a_busy_model_is_not_moved_down(r, worker, slow_model):
    deploy(r, slow_model, max_model_len=1024)
    worker.apply_control(ControlAction.ACTIVATE, FN)
    rid = invoke(r, [1, 2, 3], max_tokens=1000, ignore_eos=True)  # far longer than the drain wait
    wait_for(lambda: len(events_so_far(r, rid)) >= 2, 30, "the request to start")
    with pytest.raises(RuntimeError, match="running requests"):
        worker.apply_control(ControlAction.EVICT, FN)
    assert worker.models.state(FN) == ModelState.HOT
    r.publish(keys.CANCEL_CHANNEL, rid)
    wait_for(lambda: not worker.running.all(), 10, "the request to be cancelled")


def test_redeploy_with_another_model_ends_running_requests(r, worker, slow_model, tiny_model):
    deploy(r, slow_model, max_model_len=1024)
    worker.apply_control(ControlAction.ACTIVATE, FN)
    rid = invoke(r, [1, 2, 3], max_tokens=1000, ignore_eos=True)  # far longer than the redeploy takes
    wait_for(lambda: len(events_so_far(r, rid)) >= 2, 30, "the request to start")
    deploy(r, tiny_model)
    last = answer(r, rid)[-1]
    assert isinstance(last, Failed) and last.status == 410 and "redeployed" in last.message
    wait_for(lambda: FN not in worker.models.states(), 10, "the old model to leave")


def test_unknown_control_action_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="unknown control action 'os.system'.*load_host"):
        control.apply("os.system", FN)


# ---- errors by cause ----
def test_client_mistake_is_a_4xx(r, worker, tiny_model):
    deploy(r, tiny_model)
    worker.apply_control(ControlAction.PREWARM, FN)
    last = answer(r, invoke(r, [1, 10**6]))[-1]
    assert isinstance(last, Failed) and last.status == 400 and "out of range" in last.message


def test_broken_model_files_are_a_5xx_naming_the_function(r, worker, tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    deploy(r, broken)
    for f in broken.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:1000])  # truncated after the deploy checked it
    with pytest.raises(ModelLoadError, match="truncated"):
        worker.apply_control(ControlAction.PREWARM, FN)
    rid = invoke(r, [1, 2])
    # a COLD model's stream is not read by the consumer: hand the entry to the worker as an activating read would
    ((_, [(entry_id, fields)]),) = r.xreadgroup(keys.GROUP, "wa", {keys.invocations(FN): ">"}, count=1)
    worker.streamer.start(keys.invocations(FN), [(entry_id, fields)])
    last = answer(r, rid)[-1]
    assert isinstance(last, Failed) and last.status == 500
    assert f"function '{FN}'" in last.message and "truncated" in last.message


# ---- concurrency ----
def test_a_slow_load_never_stalls_another_models_activation_and_requests(r, tiny_model, slow_model):
    gate = threading.Event()
    from gpu_runtime.memory.model_host import _default_engine_factory

    def factory(model_dir, *args, **kwargs):
        if model_dir == str(slow_model):
            gate.wait(30)  # a load that takes as long as the test lets it
        return _default_engine_factory(model_dir, *args, **kwargs)

    host = ModelHost("cpu", gpu_bytes=512 * MIB, host_cache_bytes=512 * MIB, engine_factory=factory)
    worker = new_worker(r, host)
    try:
        deploy(r, slow_model, name="slow")
        deploy(r, tiny_model, name="fast")
        slow = threading.Thread(target=worker.apply_control, args=(ControlAction.PREWARM, "slow"))
        slow.start()
        wait_for(lambda: worker.info().models.get("slow") == ModelState.LOADING, 10, "the slow load to start")
        t0 = time.monotonic()
        assert worker.apply_control(ControlAction.ACTIVATE, "fast") == ModelState.HOT
        assert isinstance(answer(r, invoke(r, [1, 2, 3], name="fast"), timeout_s=20)[-1], Done)
        assert time.monotonic() - t0 < 15  # well inside the slow load, which is still going on
        assert slow.is_alive() and worker.info().models["slow"] == ModelState.LOADING
        gate.set()
        slow.join(30)
        assert worker.models.state("slow") == ModelState.WARM
    finally:
        gate.set()
        worker.stop()


def test_a_model_held_by_a_long_transition_stalls_nobody_else(r, tiny_model):
    # Seen live: while one model's lock was held for seconds (a load), the engine thread waited for it before
    # stepping any model, and the consumer waited for it before starting any other request.
    worker = new_worker(r)
    held, release = threading.Event(), threading.Event()

    def transition():  # what a control job's load does: hold the model's lock, reported as moving
        with worker.models.lock("busy"):
            with worker.models._lock:
                worker.models._moving.add("busy")
            held.set()
            release.wait(30)
            with worker.models._lock:
                worker.models._moving.discard("busy")

    try:
        deploy(r, tiny_model, name="busy")
        deploy(r, tiny_model, name="free")
        for fn in ("busy", "free"):
            assert worker.apply_control(ControlAction.ACTIVATE, fn) == ModelState.HOT
        running = invoke(r, [5, 6, 7], name="free", max_tokens=64)  # stepping while the lock is taken
        wait_for(lambda: worker.running.of("free"), 10, "the free model's request to start")
        mover = threading.Thread(target=transition)
        mover.start()
        held.wait(10)
        waiting = invoke(r, [1, 2, 3], name="busy")  # read before the transition ends: it must wait, not block
        wait_for(lambda: "busy" in worker.streamer.waiting, 10, "the busy model's request to wait")
        t0 = time.monotonic()
        assert isinstance(answer(r, invoke(r, [4, 5], name="free"), timeout_s=15)[-1], Done)
        assert isinstance(answer(r, running, timeout_s=15)[-1], Done)
        assert time.monotonic() - t0 < 15 and mover.is_alive()  # all inside the transition
        release.set()
        assert isinstance(answer(r, waiting, timeout_s=20)[-1], Done)  # and the waiting request is served after
    finally:
        release.set()
        worker.stop()


def test_a_request_for_a_warm_model_takes_kv_room_from_an_idle_hot_one(r, tiny_model):
    """A pool with room for two models' weights but one KV cache: a request for the WARM one is served (the idle
    HOT one steps down to WARM) instead of failing with 503 because nothing WARM was left to evict."""
    deploy(r, tiny_model, name="a")
    deploy(r, tiny_model, name="b")
    need = footprint(Registry(r).get("a"), FAST.kv_seqs)
    chunks = -(-need.weight_bytes // (2 * MIB)) * 2 + -(-need.kv_bytes // (2 * MIB))  # CPU chunks: 2 MiB
    worker = new_worker(r, ModelHost("cpu", gpu_bytes=chunks * 2 * MIB, host_cache_bytes=512 * MIB))
    try:
        assert worker.apply_control(ControlAction.ACTIVATE, "a") == ModelState.HOT
        assert worker.apply_control(ControlAction.PREWARM, "b") == ModelState.WARM
        assert isinstance(answer(r, invoke(r, [1, 2, 3], name="b"), timeout_s=30)[-1], Done)
        assert worker.models.states() == {"a": ModelState.WARM, "b": ModelState.HOT}
        assert worker.counters.snapshot()["deactivated_for_requests"] == 1
        assert isinstance(answer(r, invoke(r, [4, 5], name="a"), timeout_s=30)[-1], Done)  # and back again
        assert worker.models.states() == {"a": ModelState.HOT, "b": ModelState.WARM}
    finally:
        worker.stop()


def test_a_request_with_no_kv_room_waits_for_a_busy_model_instead_of_failing(r, slow_model, tiny_model):
    deploy(r, slow_model, name="a", max_model_len=1024)
    deploy(r, tiny_model, name="b")
    reg = Registry(r)
    fa, fb = footprint(reg.get("a"), FAST.kv_seqs), footprint(reg.get("b"), FAST.kv_seqs)
    chunks = sum(-(-n // (2 * MIB)) for n in (fa.weight_bytes, fa.kv_bytes, fb.weight_bytes))  # none for b's KV
    worker = new_worker(r, ModelHost("cpu", gpu_bytes=chunks * 2 * MIB, host_cache_bytes=512 * MIB))
    try:
        assert worker.apply_control(ControlAction.ACTIVATE, "a") == ModelState.HOT
        assert worker.apply_control(ControlAction.PREWARM, "b") == ModelState.WARM
        busy = invoke(r, [1, 2, 3], name="a", max_tokens=1000, ignore_eos=True)
        wait_for(lambda: len(events_so_far(r, busy)) >= 3, 30, "a's first tokens")
        rid = invoke(r, [1, 2, 3], name="b")
        wait_for(lambda: worker.counters.snapshot().get("start_deferred", 0) >= 1, 30, "b's request to wait")
        assert not events_so_far(r, rid)  # no 503: it waits, pending on the worker
        r.publish(keys.CANCEL_CHANNEL, busy)  # a goes idle: the next try takes its KV room
        assert isinstance(answer(r, rid, timeout_s=30)[-1], Done)
        assert worker.models.states() == {"a": ModelState.WARM, "b": ModelState.HOT}
    finally:
        worker.stop()


def test_gateway_and_warmer_never_import_torch():
    code = (
        "import sys, gateway.app, warmer.loop, invoker.submit, protocol.messages, functions.spec, modelinfo;"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules), 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_n_sequences_stream_with_logprobs_and_end_with_one_done_each(r, worker, tiny_model):
    deploy(r, tiny_model)
    worker.apply_control(ControlAction.PREWARM, FN)
    prompt = [1, 5, 9, 14]
    sampling = dict(max_tokens=5, temperature=1.0, seed=7, ignore_eos=True)
    rid = invoke(r, prompt, n=2, logprobs=2, prompt_logprobs=1, **sampling)
    alone = invoke(r, prompt, **{**sampling, "seed": 8})  # what sequence 1 (seed + 1) must repeat
    wait_for(lambda: queue_empty(r), 60, "both answers to be acknowledged")  # only once every sequence is done
    events = events_so_far(r, rid)
    start = events[0]
    assert isinstance(start, Start) and len(start.prompt_logprobs) == len(prompt)
    assert start.prompt_logprobs[0] == (None, ())
    assert all(lp <= 0 and len(top) == 1 for lp, top in start.prompt_logprobs[1:])
    dones = {e.index: e for e in events if isinstance(e, Done)}
    assert sorted(dones) == [0, 1]
    tokens = {i: [e for e in events if isinstance(e, Token) and e.index == i] for i in (0, 1)}
    for i, toks in tokens.items():
        assert [t.pos for t in toks] == list(range(5))
        assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in toks)
        assert all(t.top_logprobs[0][1] >= t.logprob - 1e-6 for t in toks)  # best first
        assert (dones[i].finish_reason, dones[i].completion_tokens) == (FinishReason.LENGTH, 5)
        assert dones[i].cumulative_logprob == pytest.approx(sum(t.logprob for t in toks), abs=1e-4)
    repeated = [e for e in events_so_far(r, alone) if isinstance(e, Token)]
    assert [t.id for t in repeated] == [t.id for t in tokens[1]]
    assert all(t.logprob is None and not t.top_logprobs for t in repeated)


def test_a_stop_string_ends_only_its_own_sequence(r, worker, tiny_model):
    deploy(r, tiny_model)
    worker.apply_control(ControlAction.PREWARM, FN)
    prompt = [1, 5, 9, 14]
    sampling = dict(max_tokens=12, temperature=1.0, ignore_eos=True)
    free = invoke(r, prompt, n=2, seed=3, **sampling)
    wait_for(lambda: queue_empty(r), 60, "the free answer")
    texts = {
        i: "".join(e.text for e in events_so_far(r, free) if isinstance(e, Token) and e.index == i) for i in (0, 1)
    }
    stop = next(texts[0][k : k + 2] for k in range(2, len(texts[0]) - 2) if texts[0][k : k + 2] not in texts[1])
    cut = invoke(r, prompt, n=2, seed=3, stop=(stop,), **sampling)
    wait_for(lambda: queue_empty(r), 60, "the stopped answer")
    events = events_so_far(r, cut)
    dones = {e.index: e.finish_reason for e in events if isinstance(e, Done)}
    assert dones == {0: FinishReason.STOP, 1: FinishReason.LENGTH}
    assert "".join(e.text for e in events if isinstance(e, Token) and e.index == 0) == texts[0][: texts[0].find(stop)]
    assert "".join(e.text for e in events if isinstance(e, Token) and e.index == 1) == texts[1]
