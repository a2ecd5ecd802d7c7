"""Prometheus text metrics, kept in-process: each gateway exports its own counters; Redis gauges are read at scrape."""

from __future__ import annotations

import bisect
from collections import defaultdict

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.tokens: dict[str, int] = defaultdict(int)
        self.ttft_counts: dict[str, list[int]] = defaultdict(lambda: [0] * (len(TTFT_BUCKETS) + 1))
        self.ttft_sum: dict[str, float] = defaultdict(float)

    def request(self, function: str, status: int) -> None:
        self.requests[(function, status)] += 1

    def first_token(self, function: str, seconds: float) -> None:
        self.ttft_counts[function][bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
        self.ttft_sum[function] += seconds

    def generated(self, function: str, n: int) -> None:
        self.tokens[function] += n

    def render(
        self, queue_depths: dict[str, int], live_workers: int, worker_counters: dict[str, dict[str, int]] | None = None
    ) -> str:
        """``worker_counters``: each live worker's reported counters (WorkerInfo.counters), by worker id."""
        out = [
            "# HELP warmserve_requests_total Invocations answered, by function and HTTP status.",
            "# TYPE warmserve_requests_total counter",
        ]
        out += [f'warmserve_requests_total{{function="{f}",status="{s}"}} {n}' for (f, s), n in self.requests.items()]
        out += [
            "# HELP warmserve_generated_tokens_total Tokens generated.",
            "# TYPE warmserve_generated_tokens_total counter",
        ]
        out += [f'warmserve_generated_tokens_total{{function="{f}"}} {n}' for f, n in self.tokens.items()]
        out += [
            "# HELP warmserve_ttft_seconds Time to first token.",
            "# TYPE warmserve_ttft_seconds histogram",
        ]
        for f, counts in self.ttft_counts.items():
            running = 0
            for le, c in zip((*map(str, TTFT_BUCKETS), "+Inf"), counts, strict=True):
                running += c
                out.append(f'warmserve_ttft_seconds_bucket{{function="{f}",le="{le}"}} {running}')
            out.append(f'warmserve_ttft_seconds_sum{{function="{f}"}} {self.ttft_sum[f]:.6f}')
            out.append(f'warmserve_ttft_seconds_count{{function="{f}"}} {running}')
        out += [
            "# HELP warmserve_queue_depth Invocations waiting or running.",
            "# TYPE warmserve_queue_depth gauge",
        ]
        out += [f'warmserve_queue_depth{{function="{f}"}} {d}' for f, d in queue_depths.items()]
        out += [
            "# HELP warmserve_live_workers Workers with a fresh heartbeat.",
            "# TYPE warmserve_live_workers gauge",
        ]
        out.append(f"warmserve_live_workers {live_workers}")
        out += prefix_cache_lines(worker_counters or {})
        return "\n".join(out) + "\n"


def prefix_cache_lines(worker_counters: dict[str, dict[str, int]]) -> list[str]:
    """Prompt tokens served from the engines' prefix caches and prompt tokens looked up, as each live worker
    reports them (counters since the worker started): hit rate = hit / query."""
    out = []
    for name, what in (("hit", "Prompt tokens whose KV came from the prefix cache"), ("query", "Prompt tokens")):
        metric = f"warmserve_prefix_cache_{name}_tokens_total"
        out += [f"# HELP {metric} {what}, by worker.", f"# TYPE {metric} counter"]
        out += [
            f'{metric}{{worker="{w}"}} {c.get(f"prefix_cache_{name}_tokens", 0)}'
            for w, c in sorted(worker_counters.items())
        ]
    return out
