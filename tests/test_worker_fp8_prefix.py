"""Through the platform: a function deployed with ``dtype: fp8`` serves from the worker's pool, and a repeated
prompt prefix is a prefix-cache hit the worker reports in its counters (and the gateway's /metrics renders)."""

from __future__ import annotations

from conftest import wait_for
from test_worker_inprocess import FN, answer, deploy, invoke, r, worker  # noqa: F401 - fixtures

from gateway.metrics import Metrics
from protocol import keys
from protocol.messages import Done, Token, WorkerInfo
from protocol.states import ControlAction, ModelState


def counters(r) -> dict[str, int]:  # noqa: F811 - r is the fixture's value
    return WorkerInfo.from_json(r.hget(keys.worker("wa"), "info")).counters


def test_fp8_function_serves_and_a_repeated_prefix_is_a_cache_hit(r, worker, tiny_model):  # noqa: F811
    deploy(r, tiny_model, dtype="fp8")
    assert worker.apply_control(ControlAction.PREWARM, FN) == ModelState.WARM
    prompt = list(range(3, 43))  # 40 tokens: two full KV blocks of 16 to share
    first = answer(r, invoke(r, prompt, ignore_eos=True))
    second = answer(r, invoke(r, prompt, ignore_eos=True))
    assert first[-1] == Done("length", 8) and second[-1] == first[-1]
    tokens = [[e.id for e in events if isinstance(e, Token)] for events in (first, second)]
    assert tokens[0] == tokens[1]
    wait_for(lambda: counters(r).get("prefix_cache_query_tokens") == 80, 10, "a heartbeat with the hit counts")
    assert counters(r)["prefix_cache_hit_tokens"] == 32
    text = Metrics().render({}, 1, {"wa": counters(r)})
    assert 'warmserve_prefix_cache_hit_tokens_total{worker="wa"} 32' in text.splitlines()


def test_engine_steps_and_admissions_are_counted(r, worker, tiny_model):  # noqa: F811
    deploy(r, tiny_model)
    assert worker.apply_control(ControlAction.PREWARM, FN) == ModelState.WARM  # so the worker reads the stream
    for prompt in ([5, 6, 7], [8, 9, 10, 11]):
        assert answer(r, invoke(r, prompt, ignore_eos=True))[-1] == Done("length", 8)
    # Every token came out of one step's sequence: 2 x 8. A heartbeat may predate the last steps, so await it.
    wait_for(lambda: counters(r).get("engine_step_sequences") == 16, 10, "a heartbeat with every step counted")
    seen = counters(r)
    assert seen["admitted"] == 2 and seen["engine_steps"] >= 8  # each answer took 8 steps at least
    assert seen["engine_step_us"] > 0 and seen["admission_us"] > 0
    lines = Metrics().render({}, 1, {"wa": seen}).splitlines()
    assert 'warmserve_admitted_total{worker="wa"} 2' in lines
    assert f'warmserve_engine_steps_total{{worker="wa"}} {seen["engine_steps"]}' in lines
    assert f'warmserve_admission_seconds_total{{worker="wa"}} {seen["admission_us"] / 1e6:.6f}' in lines
