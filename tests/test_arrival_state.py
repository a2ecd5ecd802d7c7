"""The state a request finds its model in (x-warmserve-state) and TTFT by that state in /metrics."""

from __future__ import annotations

from gateway.metrics import Metrics
from invoker.submit import state_on_arrival
from protocol.messages import WorkerInfo
from protocol.states import ModelState


def worker(models: dict[str, str]) -> WorkerInfo:
    return WorkerInfo("w", "h", "cpu", 1, 1, 0, {f: ModelState(s) for f, s in models.items()}, {}, {}, 0.0, 0.0)


def test_the_best_state_across_workers_counts_and_nowhere_is_cold():
    workers = [worker({"a": "HOST", "b": "LOADING"}), worker({"a": "WARM", "b": "HOST"})]
    assert state_on_arrival(workers, "a") == ModelState.WARM
    assert state_on_arrival(workers, "b") == ModelState.LOADING  # on its way beats a host copy
    assert state_on_arrival(workers, "c") == ModelState.COLD
    assert state_on_arrival([], "a") == ModelState.COLD


def test_metrics_have_a_ttft_histogram_per_arrival_state():
    m = Metrics()
    m.first_token("a", 0.02, "HOT")
    m.first_token("a", 3.0, "COLD")
    text = m.render({}, 1)
    assert 'warmserve_ttft_by_state_seconds_bucket{state="HOT",le="0.025"} 1' in text
    assert 'warmserve_ttft_by_state_seconds_bucket{state="COLD",le="2.5"} 0' in text
    assert 'warmserve_ttft_by_state_seconds_count{state="COLD"} 1' in text
    assert 'warmserve_ttft_seconds_count{function="a"} 2' in text  # per function as before
