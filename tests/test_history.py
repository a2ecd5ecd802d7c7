"""Arrival history in Redis: the gateway's bucket counts read back as per-window series, with bounded retention."""

from __future__ import annotations

from invoker import history, keys


def test_counts_per_window(r):
    now = 1_000_000_000.0
    with r.pipeline() as p:
        for ts in (now - 10, now - 70, now - 70, now - 400, now - 3600):
            history.record_arrival(p, "f", ts)
        p.execute()
    counts = history.read_counts(r, "f", now=now + 1, window_s=300, windows=4)
    # windows end at the last 300 s boundary before now+1: [-1200,-900) [-900,-600) [-600,-300) [-300,0)
    end = (int(now + 1) // 300) * 300
    expected = [0, 0, 0, 0]
    for ts in (now - 10, now - 70, now - 70, now - 400):
        idx = int((ts - (end - 1200)) // 300)
        if 0 <= idx < 4:
            expected[idx] += 1
    assert counts.tolist() == expected
    assert counts.sum() >= 1


def test_old_buckets_are_trimmed(r):
    now = 2_000_000_000.0
    ancient = now - (keys.HISTORY_RETENTION_BUCKETS + 10) * keys.HISTORY_BUCKET_S
    with r.pipeline() as p:
        history.record_arrival(p, "g", ancient)
        history.record_arrival(p, "g", now - 5)
        p.execute()
    assert r.hlen(keys.history("g")) == 2
    history.read_counts(r, "g", now=now, window_s=60, windows=10)
    assert r.hlen(keys.history("g")) == 1
