"""Next-window demand forecasts per function: mean rate and a peak (upper) rate.

Every method works on per-window arrival counts (oldest first) and is a pure function of that history, so the
simulator, the live warmer and the evaluation all call the same code. A method only defines its one-step point
forecast, vectorised over many target windows at once (`_point(x, t)` = forecast of x[t] from x[:t]); the peak is
then the same for every method: the point forecast scaled by an upper quantile of that method's own recent
one-step errors (a split-conformal bound in log space). So a method earns a tight peak only by being accurate,
and the peak's miss rate tracks 1 - peak_quantile on stationary data whatever the method.

Periods are in windows: `day = 86400 / window_s` (144 at ServeGen's 10-min windows, 288 at 5-min windows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from protocol.settings import DEFAULTS, Settings

DAY_S = 86_400
# Add-one in log space: counts of 0 stay finite, and a window of 1 vs 3 requests is a small error, not 200 %.
_PSEUDO = 1.0
# Below this many past errors the empirical quantile is noise; fall back to a Poisson-style bound.
_MIN_ERRORS = 12


@dataclass(frozen=True)
class Prediction:
    """Requests per second over the next window: expected mean rate and a peak (upper-bound) rate."""

    mean: float
    peak: float


class Forecaster(Protocol):
    window_s: int

    def predict(self, history: np.ndarray) -> Prediction: ...


def this_and_next(forecaster: Forecaster, history: np.ndarray) -> tuple[Prediction, Prediction]:
    """Forecasts for the current window and the one after (the current forecast fed back as if observed)."""
    cur = forecaster.predict(history)
    return cur, forecaster.predict(np.append(history, cur.mean * forecaster.window_s))


def act_on(cur: Prediction, nxt: Prediction, until_next_s: float, lead_s: float) -> Prediction:
    """The prediction to plan with: the current window's, and within `lead_s` of the next window the larger of
    both, so weights are resident before a forecast burst starts rather than when it starts. The live warmer and
    the simulator both plan with this."""
    if until_next_s > lead_s:
        return cur
    return Prediction(max(cur.mean, nxt.mean), max(cur.peak, nxt.peak))


def _ewma_weights(alpha: float, lags: int) -> np.ndarray:
    """Weights of an EWMA truncated to `lags` terms, most recent first (unnormalised)."""
    return alpha * (1.0 - alpha) ** np.arange(lags)


def _weighted_lags(v: np.ndarray, t: np.ndarray, w: np.ndarray) -> np.ndarray:
    """For each target t: sum_k w[k] * v[t-1-k] over lags that exist, renormalised; NaN where none exist.

    Entries of v may be NaN (no value at that index) and are skipped too."""
    idx = t[:, None] - 1 - np.arange(len(w))[None, :]
    ok = idx >= 0
    vals = v[np.where(ok, idx, 0)]
    ok &= ~np.isnan(vals)
    ww = np.where(ok, w[None, :], 0.0)
    tot = ww.sum(axis=1)
    s = (np.where(ok, vals, 0.0) * ww).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, s / tot, np.nan)


def _seasonal_lags(x: np.ndarray, t: np.ndarray, period: int, count: int, spread: int, how: str) -> np.ndarray:
    """Median or mean ("median"/"mean") of x at t - k*period + j (k = 1..count, |j| <= spread, indices that exist).

    NaN where no such index exists. `spread` > 0 smooths the profile over neighbouring windows of the same time
    of day, which cuts the noise of a single past window for little bias at 5-10 min windows."""
    ks = np.arange(1, count + 1)
    js = np.arange(-spread, spread + 1)
    offs = (ks[:, None] * period - js[None, :]).ravel()
    # keep past lags only (a spread wider than the period would reach the future) and lags some target can reach,
    # so the fast path below applies as soon as history is long enough
    offs = offs[(offs > 0) & (offs <= t.max())]
    out = np.full(len(t), np.nan)
    if len(offs) == 0:
        return out
    idx = t[:, None] - offs[None, :]
    ok = idx >= 0
    vals = np.where(ok, x[np.where(ok, idx, 0)], np.nan)
    if ok.all():  # the common case once history is long enough; nan-aware reductions are 10x slower
        return np.median(vals, axis=1) if how == "median" else vals.mean(axis=1)
    have = ok.any(axis=1)
    if have.any():
        out[have] = (np.nanmedian if how == "median" else np.nanmean)(vals[have], axis=1)
    return out


@dataclass(frozen=True)
class _Base:
    """Shared machinery: validation, units, the conformal peak. Subclasses define `_point`."""

    window_s: int = DEFAULTS.window_s
    peak_quantile: float = 0.95
    peak_lookback_days: float = 1.0  # errors from this many past windows set the peak's width
    max_history_days: int = 15  # older history is ignored: bounds cost per call
    cold_headroom: float = 1.5  # peak/mean until _MIN_ERRORS past windows exist to measure the spread

    def __post_init__(self):
        if not 0.0 < self.peak_quantile < 1.0:
            raise ValueError(f"peak_quantile must be in (0, 1), got {self.peak_quantile}")

    @property
    def day(self) -> int:
        return max(1, round(DAY_S / self.window_s))

    def _point(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, history: np.ndarray) -> Prediction:
        x = _validate(history)
        x = x[-(self.max_history_days * self.day + 1) :]
        n = len(x)
        if n == 0:
            return Prediction(0.0, 0.0)
        look = min(n - 1, max(_MIN_ERRORS, round(self.peak_lookback_days * self.day)))
        t = np.arange(n - look, n + 1)
        f = np.maximum(_fill_level(x, t, self._point(x, t)), 0.0)
        mean = f[-1]
        err = np.log((x[t[:-1]] + _PSEUDO) / (f[:-1] + _PSEUDO))
        if len(err) >= _MIN_ERRORS:
            q = max(0.0, float(np.quantile(err, self.peak_quantile)))
            peak = (mean + _PSEUDO) * np.exp(q) - _PSEUDO
        else:  # too little history to know the spread: a fixed headroom, at least a 2-sigma Poisson bound
            peak = max(self.cold_headroom * mean, mean + 2.0 * np.sqrt(mean))
        return Prediction(mean=float(mean) / self.window_s, peak=float(max(peak, mean)) / self.window_s)


def _fill_level(x: np.ndarray, t: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Where a seasonal method has no past period to look at (history < 1 day), use the recent level (EWMA)."""
    bad = np.isnan(f)
    if bad.any():
        f = f.copy()
        f[bad] = _weighted_lags(x, t[bad], _ewma_weights(0.3, 24))
    return np.nan_to_num(f, nan=0.0)


@dataclass(frozen=True)
class Last(_Base):
    """Naive: the next window repeats the last one."""

    def _point(self, x, t):
        return np.where(t >= 1, x[np.maximum(t - 1, 0)], np.nan)


@dataclass(frozen=True)
class Ewma(_Base):
    """Exponentially weighted mean of recent windows (no notion of time of day)."""

    alpha: float = 0.8  # chosen on days 6-7 (history 1-5) over {0.3, 0.6, 0.8}
    lags: int = 12

    def _point(self, x, t):
        return _weighted_lags(x, t, _ewma_weights(self.alpha, self.lags))


@dataclass(frozen=True)
class WarmServe(_Base):
    """WarmServe's method: the same window on previous days (mean of up to `days`), plus an EWMA of the recent
    residuals actual - that base. The correction is additive, in requests per window."""

    days: int = 3
    alpha: float = 0.8  # chosen on days 6-7 (history 1-5) over {0.5, 0.8, 1.0} x days {1, 3, 7}
    lags: int = 12

    def _point(self, x, t):
        # The base is needed at every target and every index a target's EWMA reaches (t-lags .. t-1).
        lo = max(0, int(t.min()) - self.lags)
        r = np.arange(lo, int(t.max()) + 1)
        base = np.full(len(x) + 1, np.nan)
        base[r] = _seasonal_lags(x, r, self.day, self.days, 0, "mean")
        resid = x - base[:-1]
        corr = _weighted_lags(resid, t, _ewma_weights(self.alpha, self.lags))
        return base[t] + np.nan_to_num(corr, nan=0.0)


@dataclass(frozen=True)
class Seasonal(_Base):
    """Robust seasonal profile with a multiplicative level correction.

    - profile: median of the same time of day (+-`spread` windows) over the last `days` days, blended with the
      same time last week (median over +-`spread` windows) once a week of history exists — weekly
      captures weekday/weekend shape that a daily median averages away;
    - level: EWMA of log((actual+1)/(profile+1)) over recent windows. Multiplicative, because ServeGen's daily
      volume swings up to 2x while the daily *shape* holds: an additive correction learned at night is wrong by
      the same absolute amount at the daytime peak; a ratio scales with it. Medians keep one odd day (an
      outage, a batch job) from bending the profile.
    """

    days: int = 7
    spread: int = 2
    weekly_weight: float = 0.3  # not tunable on days 1-7 (needs a week of history): set a priori
    alpha: float = 0.8  # chosen on days 6-7 (history 1-5) over {0.6, 0.8, 1.0} x spread {1, 2}
    lags: int = 12

    def _profile(self, x, t):
        daily = _seasonal_lags(x, t, self.day, self.days, self.spread, "median")
        weekly = _seasonal_lags(x, t, 7 * self.day, 1, self.spread, "median")
        have_week = ~np.isnan(weekly)
        out = daily.copy()
        out[have_week] = (1 - self.weekly_weight) * daily[have_week] + self.weekly_weight * weekly[have_week]
        return out

    def _point(self, x, t):
        lo = max(0, int(t.min()) - self.lags)
        r = np.arange(lo, int(t.max()) + 1)
        prof = np.full(len(x) + 1, np.nan)
        prof[r] = self._profile(x, r)
        logr = np.log((x + _PSEUDO) / (prof[:-1] + _PSEUDO))
        corr = _weighted_lags(logr, t, _ewma_weights(self.alpha, self.lags))
        return (prof[t] + _PSEUDO) * np.exp(np.nan_to_num(corr, nan=0.0)) - _PSEUDO


@dataclass(frozen=True)
class Blend(_Base):
    """Per-series adaptive combination of persistence and seasonal forecasts (Bates-Granger weights).

    Which signal predicts the next window differs by series and over time: ServeGen's m-small has a stable daily
    shape, m-large hardly any at 10-min resolution, and a bursty client is best predicted by its last window. So
    each component's one-step log errors over the last `weight_days` are measured, and components are weighted
    by the inverse of their mean squared error — a series picks the signal that has been working for it."""

    weight_days: float = 0.25  # chosen on days 6-7 over {0.125, 0.25, 1}

    def _components(self) -> list[_Base]:
        w = self.window_s
        return [Last(w), Ewma(w), Seasonal(w), WarmServe(w)]

    def _point(self, x, t):
        span = max(1, round(self.weight_days * self.day))
        lo = max(0, int(t.min()) - span)
        r = np.arange(lo, int(t.max()) + 1)
        preds = np.stack([_fill_level(x, r, c._point(x, r)) for c in self._components()])  # (components, len r)
        have = r < len(x)
        err2 = np.zeros_like(preds)
        err2[:, have] = np.log((x[r[have]] + _PSEUDO) / (np.maximum(preds[:, have], 0) + _PSEUDO)) ** 2
        # mse over the `span` windows before each target (cumulative sums: O(len r) per component)
        cs = np.concatenate([np.zeros((len(preds), 1)), np.cumsum(err2, axis=1)], axis=1)
        i = t - lo
        j = np.maximum(i - span, 0)
        n = np.maximum(i - j, 1)
        mse = (cs[:, i] - cs[:, j]) / n
        w = 1.0 / (mse + 1e-4)  # the floor keeps a perfect recent record from dividing by zero
        return (w * preds[:, i]).sum(axis=0) / w.sum(axis=0)


_METHODS = {"warmserve": WarmServe, "seasonal": Seasonal, "blend": Blend, "ewma": Ewma, "last": Last}
METHODS: tuple[str, ...] = tuple(_METHODS)
# The live warmer's and the simulator's forecaster is `Settings.forecast_method` (`blend`): on the ServeGen
# evaluation (docs/forecasting.md) it has the lowest error of the seasonal methods and the tightest peak at the
# same miss rate.


def make_forecaster(method: str, window_s: int = DEFAULTS.window_s, **kw) -> Forecaster:
    """Build a forecaster by name (see METHODS); `kw` overrides the method's dataclass fields."""
    if method not in _METHODS:
        raise ValueError(f"unknown forecast method {method!r}; choose one of {', '.join(METHODS)}")
    if window_s <= 0 or DAY_S % window_s:
        raise ValueError(f"window_s must be a positive divisor of {DAY_S} s (one day), got {window_s}")
    try:
        return _METHODS[method](window_s=window_s, **kw)
    except TypeError as e:
        raise ValueError(f"bad option for forecast method {method!r}: {e}") from None


def for_settings(settings: Settings) -> Forecaster:
    """The forecaster a warmer with `settings` runs. Under a time scale k (bench/replay.py: a day lasts 86400/k s)
    it is built for windows of window_s * k, so its daily and weekly periods still span a day of windows; its
    predictions are then per uncompressed second, and `live_rate` converts them."""
    return make_forecaster(settings.forecast_method, window_s=round(settings.window_s * settings.time_scale))


def live_rate(p: Prediction, settings: Settings) -> Prediction:
    """A prediction of `for_settings`'s forecaster in requests per second of the (possibly compressed) clock."""
    k = settings.time_scale
    return p if k == 1 else Prediction(p.mean * k, p.peak * k)


def _validate(history) -> np.ndarray:
    x = np.asarray(history, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"history must be a 1-D array of per-window counts, got shape {x.shape}")
    bad = ~np.isfinite(x)
    if bad.any():
        raise ValueError(f"history has {int(bad.sum())} NaN/inf value(s), first at index {int(np.argmax(bad))}")
    if (x < 0).any():
        raise ValueError(f"history has negative counts, first at index {int(np.argmax(x < 0))}")
    return x
