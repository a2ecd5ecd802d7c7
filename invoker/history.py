"""Arrival history per function: counts in fixed time buckets, the warmer's forecasting input.

One HINCRBY per request keeps the gateway's hot path to a single round trip (pipelined with the XADD); old
buckets are trimmed by the reader, so retention is bounded without a background job.
"""

from __future__ import annotations

import numpy as np
import redis

from protocol import keys
from protocol.settings import DEFAULTS


def bucket_of(ts: float, bucket_s: int = DEFAULTS.history_bucket_s) -> int:
    return int(ts // bucket_s) * bucket_s


def record_arrival(
    pipe: redis.client.Pipeline, function: str, ts: float, bucket_s: int = DEFAULTS.history_bucket_s
) -> None:
    """Queue the count increment on a pipeline the caller executes (sync or async)."""
    pipe.hincrby(keys.history(function), bucket_of(ts, bucket_s), 1)


def read_counts(
    r: redis.Redis,
    function: str,
    now: float,
    window_s: int,
    windows: int,
    bucket_s: int = DEFAULTS.history_bucket_s,
) -> np.ndarray:
    """Arrivals per window for the `windows` complete windows before `now`, oldest first; trims expired buckets."""
    raw = r.hgetall(keys.history(function))
    end = (int(now) // window_s) * window_s
    start = end - windows * window_s
    counts = np.zeros(windows, dtype=np.float64)
    expired = []
    horizon = end - DEFAULTS.history_retention_buckets * bucket_s
    for k, v in raw.items():
        t = int(k)
        if t < horizon:
            expired.append(k)
        elif start <= t < end:
            counts[(t - start) // window_s] += int(v)
    if expired:
        r.hdel(keys.history(function), *expired)
    return counts


def last_bucket_rate(r: redis.Redis, function: str, now: float, bucket_s: int = DEFAULTS.history_bucket_s) -> float:
    """Arrivals per second in the last complete bucket (one HGET: cheap enough for every planning round)."""
    count = r.hget(keys.history(function), bucket_of(now, bucket_s) - bucket_s)
    return int(count or 0) / bucket_s
