"""The forecast evaluation: metrics by hand, gap detection, client selection, and a small run on the real trace."""

import json

import numpy as np
import pytest

from warmer import forecast_eval as fe


def test_metrics_by_hand():
    actual = np.array([100.0, 0.0, 5.0, 200.0])  # floor at 600 s is 10 requests: the 0 and 5 windows skip MAPE
    mean = np.array([110.0, 3.0, 5.0, 150.0])
    peak = np.array([120.0, 5.0, 4.0, 190.0])
    previous = np.array([50.0, 100.0, 0.0, 180.0])  # rises: 100 (2x) only; 200 is < 1.2 x 180, 5 under the floor
    m = fe.metrics(actual, mean, peak, previous)
    assert m["mape"] == pytest.approx((0.1 + 0.25) / 2)
    assert m["mape_windows"] == 2
    assert m["wape"] == pytest.approx((10 + 3 + 0 + 50) / 305)
    assert m["bias"] == pytest.approx((10 + 3 + 0 - 50) / 305)
    assert m["peak_under_rate"] == pytest.approx(0.5)  # 5 > 4 and 200 > 190
    assert m["peak_headroom"] == pytest.approx(319 / 305)
    assert m["rise_windows"] == 1 and m["peak_under_rate_rises"] == 0.0  # 120 covers the rise to 100


def test_metrics_silent_series():
    m = fe.metrics(np.zeros(3), np.ones(3), np.ones(3), np.zeros(3))
    assert m["mape"] is None and m["wape"] is None and m["peak_under_rate"] == 0.0
    assert m["rise_windows"] == 0 and m["peak_under_rate_rises"] is None


def test_gap_mask_finds_collapse_not_troughs():
    t = np.arange(1000)
    x = 1000 * (1 + 0.8 * np.sin(2 * np.pi * t / 144))  # deep daily trough: 200 vs median ~1000, not a gap
    x[500:506] = 0.0
    x[700] = 30.0  # a 97 % collapse for one window
    gaps = fe.gap_mask(x)
    assert set(np.flatnonzero(gaps)) == set(range(500, 506)) | {700}


def test_select_clients_ranks_on_history_only_and_is_seeded():
    n, fit = 20, 10
    clients = {
        "a/big_later": np.r_[np.ones(fit), np.full(n - fit, 1e6)],  # huge only in the test part
        "a/big": np.full(n, 100.0),
        "a/mid": np.full(n, 10.0),
        "a/silent_test": np.r_[np.ones(fit), np.zeros(n - fit)],
        "b/x": np.full(n, 5.0),
        "b/y": np.full(n, 3.0),
        "b/z": np.full(n, 2.0),
    }
    gaps = {"a": np.zeros(n, bool), "b": np.zeros(n, bool)}
    picked = fe.select_clients(clients, gaps, fit, top_n=1, random_n=10, seed=3)
    top = {s.name for s in picked if s.group == "client_top"}
    rand = {s.name for s in picked if s.group == "client_random"}
    assert top == {"a/big", "b/x"}
    assert rand == {"a/big_later", "a/mid", "b/y", "b/z"}  # a/silent_test has nothing to forecast
    again = fe.select_clients(clients, gaps, fit, top_n=1, random_n=2, seed=3)
    assert again == fe.select_clients(clients, gaps, fit, top_n=1, random_n=2, seed=3)


def test_traces_in_repo_load():
    models = fe.load_models()
    assert set(models) == {"m-large", "m-mid", "m-small"}
    assert all(len(x) == 2016 for x in models.values())
    clients = fe.load_clients()
    assert len(clients) == 314
    # the per-client counts sum to the published per-model aggregate rate
    small = sum(x for k, x in clients.items() if k.startswith("m-small/"))
    np.testing.assert_allclose(small, models["m-small"], rtol=1e-6)


def test_small_end_to_end_run(tmp_path):
    """Validation split (history days 1-5, score days 6-7) on 2 methods and a few series: a few seconds."""
    out = tmp_path / "f.json"
    fe.main(
        ["--split", "validate", "--methods", "warmserve,last", "--top-n", "1", "--random-n", "1", "--out", str(out)]
    )
    r = json.loads(out.read_text())
    assert r["methods"] == ["warmserve", "last"]
    assert [s["group"] for s in r["series"]].count("model") == 3
    assert len(r["series"]) == 3 + 3 + 1
    small = next(s for s in r["series"] if s["name"] == "m-small")["methods"]
    # m-small's aggregate is smooth enough that any sane one-step forecast is within 25 % on average
    for m in ("warmserve", "last"):
        assert small[m]["mape"] < 0.25
        assert small[m]["peak_under_rate"] < 0.2
    assert set(r["summary"]) == {"model", "client_top", "client_random"}
