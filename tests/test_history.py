"""Arrival history in Redis: the gateway's bucket counts read back as per-window series, with bounded retention."""

from __future__ import annotations

from invoker import history
from protocol import keys
from protocol.settings import DEFAULTS


def test_counts_per_window(r):
    now = 999_999_900.0  # a multiple of the 300 s window and the 60 s bucket
    with r.pipeline() as p:
        for ts in (now - 10, now - 70, now - 70, now - 400, now - 3600):
            history.record_arrival(p, "f", ts)
        p.execute()
    counts = history.read_counts(r, "f", now=now + 1, window_s=300, windows=4)
    # windows [now-1200, now-900) ... [now-300, now): now-10 and twice now-70 fall in the last, now-400 in the
    # third, now-3600 before the first
    assert counts.tolist() == [0, 0, 1, 3]
    assert history.last_bucket_rate(r, "f", now + 1) == 1 / DEFAULTS.history_bucket_s  # bucket [now-60, now): now-10


def test_old_buckets_are_trimmed(r):
    now = 2_000_000_000.0
    ancient = now - (DEFAULTS.history_retention_buckets + 10) * DEFAULTS.history_bucket_s
    with r.pipeline() as p:
        history.record_arrival(p, "g", ancient)
        history.record_arrival(p, "g", now - 5)
        p.execute()
    assert r.hlen(keys.history("g")) == 2
    history.read_counts(r, "g", now=now, window_s=60, windows=10)
    assert r.hlen(keys.history("g")) == 1
