"""Attribution (XAI): integrated gradients against a climatological year.

Which days and months of the climate made year k's glacier-wide balance differ from that under a
climatological year, and by how much each? Attributions come per (day, climate column) with the
(D, C) climate, per (day, cell) with the (D, H, W) climate.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from glaunti.analysis.common import (
    Period,
    along_days,
    annual_fields,
    masked_mean,
    period_window,
    state_at,
    with_climate,
    year_span,
)
from glaunti.layouts import GlacierArrays


def _calendar_day(dates: np.ndarray) -> np.ndarray:
    """Day of a 365-day year (0..364); 29 February shares 28 February's slot."""
    months = dates.astype("datetime64[M]")
    month = months.astype(int) % 12
    day = (dates - months.astype("datetime64[D]")).astype(int)
    start = np.cumsum([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30])
    return start[month] + np.where((month == 1) & (day == 28), 27, day)


def climatological_baseline(arrays: GlacierArrays, tensors):
    """The mean climate of each calendar day over the whole climate series, as daily series of the
    same shape as the climate: (baseline temperature, baseline precipitation)."""
    n_days = arrays.temperature_2m.shape[0]
    slot = jnp.asarray(_calendar_day(tensors.first_date + np.arange(n_days).astype("timedelta64[D]")))
    count = jax.ops.segment_sum(jnp.ones(n_days, jnp.float32), slot, num_segments=365)

    def baseline(x):
        mean = jax.ops.segment_sum(x, slot, num_segments=365) / along_days(jnp.maximum(count, 1.0), x)
        return mean[slot].astype(x.dtype)

    return baseline(arrays.temperature_2m), baseline(arrays.precipitation)


class Attribution(NamedTuple):
    temperature: np.ndarray  # (n, ...) m w.e., per day and climate column/cell
    precipitation: np.ndarray  # (n, ...) m w.e.
    days: np.ndarray  # (n,) climate-day indices of the attributed days (dates: first_date + days)
    value: float  # f(x): glacier-wide annual balance of year k, m w.e.
    baseline_value: float  # f(x′): the same under the baseline climate in the attributed days
    gap: float  # Σ attributions − (f(x) − f(x′)), m w.e.

    @property
    def relative_gap(self) -> float:
        """|gap| / |f(x) − f(x′)| (completeness error of the path integral)."""
        return abs(self.gap) / max(abs(self.value - self.baseline_value), 1e-12)

    def per_day(self):
        """(temperature (n,), precipitation (n,)): attributions summed over columns/cells. They add
        up: a column's gradient already counts every glacier cell that reads it."""
        axes = tuple(range(1, self.temperature.ndim))
        return self.temperature.sum(axis=axes), self.precipitation.sum(axis=axes)


def _path_points(steps: int, rule: str):
    if steps < 2:
        raise ValueError("integrated gradients needs at least 2 steps")
    if rule == "trapezoid":
        alphas = np.linspace(0.0, 1.0, steps)
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[[0, -1]] *= 0.5
    elif rule == "midpoint":
        alphas = (np.arange(steps) + 0.5) / steps
        weights = np.full(steps, 1.0 / steps)
    else:
        raise ValueError(f"rule must be 'trapezoid' or 'midpoint', not {rule!r}")
    return alphas.astype(np.float32), weights.astype(np.float32)


@eqx.filter_jit
def _integrated_gradients(model, arrays, baseline_t, baseline_p, period: Period, alphas, weights):
    k = period.last_year
    state = state_at(model, arrays, period.first_year)
    window = period_window(arrays, period)
    lo, hi = period.run_first_day, period.run_last_day + 1
    x_t, x_p = window.temperature_2m, window.precipitation
    b_t, b_p = baseline_t[lo:hi], baseline_p[lo:hi]
    d_t, d_p = x_t - b_t, x_p - b_p

    def balance(temperature, precipitation):
        fields = annual_fields(model, with_climate(window, temperature, precipitation), period, state)
        return masked_mean(fields[-1], arrays.outlines[k])

    gradient = jax.grad(balance, argnums=(0, 1))

    def chunk(total, points):
        a, w = points  # (chunk,) positions on the straight path and quadrature weights
        g_t, g_p = jax.vmap(lambda s: gradient(b_t + s * d_t, b_p + s * d_p))(a)
        return (total[0] + jnp.tensordot(w, g_t, axes=1), total[1] + jnp.tensordot(w, g_p, axes=1)), None

    (mean_t, mean_p), _ = jax.lax.scan(chunk, (jnp.zeros_like(x_t), jnp.zeros_like(x_p)), (alphas, weights))
    return d_t * mean_t, d_p * mean_p, balance(x_t, x_p), balance(b_t, b_p)


def integrated_gradients(model, arrays: GlacierArrays, k: int, baseline, steps: int = 64, chunk: int = 8,
                         history: int | None = 1, rule: str = "trapezoid") -> Attribution:
    """Integrated gradients of year k's glacier-wide annual balance with respect to the daily
    temperature and precipitation, along the straight path from ``baseline`` (a (T, P) pair shaped
    like the climate, e.g. :func:`climatological_baseline`) to the actual climate.

    The attributed days are those of year k and of the ``history`` balance years before it (None:
    every year from the cold start), which carry snow into year k; the state at their start comes
    from the actual climate. The path integral uses ``steps`` points (``rule`` 'trapezoid' or
    'midpoint'), with the gradients of ``chunk`` points computed at once (vmap) and summed as they
    come (scan), so memory holds ``chunk`` gradients whatever ``steps`` is.
    """
    first = 0 if history is None else max(0, k - history)
    begin, end = year_span(arrays, first)[0], year_span(arrays, k)[1]
    period = Period(begin, end, first, k, begin, end)
    alphas, weights = _path_points(steps, rule)
    pad = (-steps) % chunk  # padded points get weight 0
    alphas = np.pad(alphas, (0, pad)).reshape(-1, chunk)
    weights = np.pad(weights, (0, pad)).reshape(-1, chunk)
    attr_t, attr_p, value, base = _integrated_gradients(model, arrays, baseline[0], baseline[1], period,
                                                        jnp.asarray(alphas), jnp.asarray(weights))
    attr_t, attr_p = np.asarray(attr_t), np.asarray(attr_p)
    value, base = float(value), float(base)
    gap = float(attr_t.sum(dtype=np.float64) + attr_p.sum(dtype=np.float64)) - (value - base)
    return Attribution(attr_t, attr_p, period.days(), value, base, gap)
