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
        # the same, by the state the function's model was in when the request arrived (HOT/WARM/LOADING/HOST/COLD)
        self.state_counts: dict[str, list[int]] = defaultdict(lambda: [0] * (len(TTFT_BUCKETS) + 1))
        self.state_sum: dict[str, float] = defaultdict(float)
        # a request's turnaround in this gateway, by part: seconds summed and how many
        self.part_sum: dict[str, float] = defaultdict(float)
        self.part_count: dict[str, int] = defaultdict(int)

    def request(self, function: str, status: int) -> None:
        self.requests[(function, status)] += 1

    def first_token(self, function: str, seconds: float, state: str = "") -> None:
        bucket = bisect.bisect_left(TTFT_BUCKETS, seconds)
        self.ttft_counts[function][bucket] += 1
        self.ttft_sum[function] += seconds
        if state:
            self.state_counts[state][bucket] += 1
            self.state_sum[state] += seconds

    def part(self, name: str, seconds: float) -> None:
        """One request's time in a part of the gateway's path (see `render`)."""
        self.part_sum[name] += max(0.0, seconds)
        self.part_count[name] += 1

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
        out += histogram("warmserve_ttft_seconds", "Time to first token.", "function", self.ttft_counts, self.ttft_sum)
        out += histogram(
            "warmserve_ttft_by_state_seconds",
            "Time to first token, by the state the function's model was in when the request arrived.",
            "state",
            self.state_counts,
            self.state_sum,
        )
        out += [
            "# HELP warmserve_gateway_part_seconds_total Time requests spent in a part of this gateway's path: accept "
            "(request received to every invocation in its stream), answer_end (a worker wrote the answer's last "
            "entry to the response closed).",
            "# TYPE warmserve_gateway_part_seconds_total counter",
        ]
        out += [f'warmserve_gateway_part_seconds_total{{part="{p}"}} {s:.6f}' for p, s in self.part_sum.items()]
        out += [
            "# HELP warmserve_gateway_part_total Requests counted in warmserve_gateway_part_seconds_total.",
            "# TYPE warmserve_gateway_part_total counter",
        ]
        out += [f'warmserve_gateway_part_total{{part="{p}"}} {n}' for p, n in self.part_count.items()]
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
        out += worker_counter_lines(worker_counters or {})
        return "\n".join(out) + "\n"


def histogram(metric: str, what: str, label: str, counts: dict[str, list[int]], sums: dict[str, float]) -> list[str]:
    """A Prometheus histogram per label value, from per-bucket counts over TTFT_BUCKETS (+Inf last)."""
    out = [f"# HELP {metric} {what}", f"# TYPE {metric} histogram"]
    for v, per_bucket in counts.items():
        running = 0
        for le, c in zip((*map(str, TTFT_BUCKETS), "+Inf"), per_bucket, strict=True):
            running += c
            out.append(f'{metric}_bucket{{{label}="{v}",le="{le}"}} {running}')
        out.append(f'{metric}_sum{{{label}="{v}"}} {sums[v]:.6f}')
        out.append(f'{metric}_count{{{label}="{v}"}} {running}')
    return out


# Counters each worker reports (WorkerInfo.counters, since it started), exported by worker: (its key, the metric,
# what it counts, divisor). Prefix cache hit rate = hit / query; mean sequences per engine step = sequences /
# steps; engine busy fraction = rate(step seconds); mean admission delay = admission seconds / admitted.
WORKER_COUNTERS = (
    ("prefix_cache_hit_tokens", "warmserve_prefix_cache_hit_tokens_total",
     "Prompt tokens whose KV came from the prefix cache", 1),
    ("prefix_cache_query_tokens", "warmserve_prefix_cache_query_tokens_total", "Prompt tokens", 1),
    ("engine_steps", "warmserve_engine_steps_total", "Engine steps (batches run)", 1),
    ("engine_step_sequences", "warmserve_engine_step_sequences_total",
     "Sequences that produced tokens, summed over engine steps", 1),
    ("engine_step_us", "warmserve_engine_step_seconds_total", "Time inside engine steps", 1e6),
    ("admitted", "warmserve_admitted_total", "Invocations started on an engine", 1),
    ("admission_us", "warmserve_admission_seconds_total",
     "From submission at a gateway to a start on an engine, summed over admitted invocations", 1e6),
    # admission's parts, each summed over admitted invocations
    ("submit_us", "warmserve_admission_submit_seconds_total",
     "Admission's first part: from submission at a gateway to the invocation's XADD", 1e6),
    ("queued_us", "warmserve_admission_queued_seconds_total",
     "Admission's second part: from the XADD to a worker's read of the invocation", 1e6),
    ("start_us", "warmserve_admission_start_seconds_total",
     "Admission's last part: from a worker's read of the invocation to its start on the engine", 1e6),
    # the ends of an answer in the worker, each summed over answers with tokens
    ("answered", "warmserve_answered_total", "Answers with tokens written and acknowledged", 1),
    ("first_token_us", "warmserve_first_token_step_seconds_total",
     "From a start on the engine to the end of the step with the answer's first token", 1e6),
    ("written_us", "warmserve_answer_written_seconds_total",
     "From the end of the step with an answer's last token to the whole answer written and acknowledged", 1e6),
)  # fmt: skip


def worker_counter_lines(worker_counters: dict[str, dict[str, int]]) -> list[str]:
    """``WORKER_COUNTERS`` as Prometheus counters, one sample per live worker."""
    out = []
    for key, metric, what, scale in WORKER_COUNTERS:
        out += [f"# HELP {metric} {what}, by worker.", f"# TYPE {metric} counter"]
        for w, c in sorted(worker_counters.items()):
            value = c.get(key, 0)
            out.append(f'{metric}{{worker="{w}"}} {value if scale == 1 else f"{value / scale:.6f}"}')
    return out
