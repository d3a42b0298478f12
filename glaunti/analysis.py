"""Differentiable analyses of a whole-glacier run: inverse modelling, attribution, forcing uncertainty.

Three questions a glaciologist asks of a calibrated model, each answered by differentiating the
whole-glacier engine (:mod:`glaunti.glacier`) with respect to its daily climate forcing:

1. **Inverse modelling** — :func:`effective_forcing_offset`: which uniform temperature offset,
   applied from a given balance year on, brings the mean glacier-wide annual balance of a window
   of years to zero (the temperature change the glacier is out of balance with)?
2. **Attribution (XAI)** — :func:`integrated_gradients`: which days and months of the climate made
   year k's balance differ from that under a climatological year, and by how much each?
3. **Aleatoric uncertainty** — :func:`forcing_uncertainty_jvp` and :func:`forcing_uncertainty_mc`:
   how uncertain is the cumulative glacier-wide SMB, day by day, given weekly errors of the
   reanalysis temperature (additive) and precipitation (multiplicative)?

Conventions. D climate days, C climate columns, H×W grid, Y balance years indexed by k, L the day-
block length. The daily climate ``arrays.temperature_2m`` / ``arrays.precipitation`` is either
(D, H, W) or (D, C) with ``arrays.climate_cell`` (H, W) mapping grid cells to columns; everything
here perturbs it along the leading day axis only and broadcasts over the trailing axes, so both
layouts work unchanged. Attributions therefore come per (day, climate column) or per (day, cell).

Analyses run a *window* of balance years k0..k1 from the state the unperturbed climate gives at the
start of year k0 (:func:`state_at`), on a copy of the arrays whose climate holds only the days of
that window (:func:`climate_window`): perturbations, gradients and tangents then have the size of
the window, not of the whole record. Every function works for model A and, through
:func:`glaunti.glacier.year_step`, for B, C and D too (for C/D the corrector's inputs are not
recomputed from perturbed climate: its monthly predictors come precomputed with the arrays and its
computed channels stop gradients, as in the model itself).

Units: °C, m w.e. (per day for daily values, per year for annual balances).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from glaunti.glacier import GlacierArrays, initial_state, run_glacier, year_step

# Weekly-block forcing errors of the reanalysis (aleatoric UQ): additive temperature error (°C) and
# multiplicative precipitation error, as the standard deviation of log(P_true / P).
SIGMA_TEMPERATURE = 1.589
SIGMA_LOG_PRECIPITATION = 0.964
BLOCK_DAYS = 7


# --------------------------------------------------------------------------------------------
# Periods, windows and the runs every analysis shares
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Period:
    """Days to analyse and the balance years to run for them.

    ``first_day..last_day`` (climate-day indices, inclusive) are the days that are perturbed and
    reported; the balance years ``first_year..last_year`` (indices k) are run, over the climate
    days ``run_first_day..run_last_day``, from the unperturbed state at the start of ``first_year``.
    """

    first_day: int
    last_day: int
    first_year: int
    last_year: int
    run_first_day: int
    run_last_day: int
    first_date: np.datetime64 | None = None  # date of climate day 0, where known

    @property
    def n_days(self) -> int:
        return self.last_day - self.first_day + 1

    @property
    def n_years(self) -> int:
        return self.last_year - self.first_year + 1

    def days(self) -> np.ndarray:
        """(n_days,) climate-day indices of the reported days."""
        return np.arange(self.first_day, self.last_day + 1)

    def dates(self) -> np.ndarray | None:
        """(n_days,) datetime64[D] of the reported days (None without ``first_date``)."""
        return None if self.first_date is None else self.first_date + self.days().astype("timedelta64[D]")


def year_index(tensors, year: int) -> int:
    """Index k of balance year ``year`` (a label such as 1998)."""
    hits = np.flatnonzero(np.asarray(tensors.years) == int(year))
    if hits.size == 0:
        years = np.asarray(tensors.years)
        raise ValueError(f"{tensors.name}: no balance year {year} (years {years.min()}–{years.max()})")
    return int(hits[0])


def years_period(tensors, first_year: int, last_year: int | None = None, run_from: int | None = None) -> Period:
    """All days of balance years ``first_year..last_year`` (labels). ``run_from`` (a label) starts
    the run earlier, e.g. so that a perturbation applied from that year on shapes the state."""
    last_year = first_year if last_year is None else last_year
    k0, k1 = year_index(tensors, first_year), year_index(tensors, last_year)
    if k1 < k0:
        raise ValueError(f"last year {last_year} is before first year {first_year}")
    kr = k0 if run_from is None else min(k0, year_index(tensors, run_from))
    begin, end = np.asarray(tensors.begin_day), np.asarray(tensors.end_day)
    return Period(int(begin[k0]), int(end[k1]), kr, k1, int(begin[kr]), int(end[k1]), tensors.first_date)


def dates_period(tensors, start, end) -> Period:
    """The days ``start..end`` (dates, inclusive) and the balance years whose blocks cover them."""
    first_date = tensors.first_date
    d0 = int((np.datetime64(start, "D") - first_date).astype(int))
    d1 = int((np.datetime64(end, "D") - first_date).astype(int))
    begin, end_day = np.asarray(tensors.begin_day), np.asarray(tensors.end_day)
    if d1 < d0 or d0 < begin[0] or d1 > end_day[-1]:
        raise ValueError(f"{tensors.name}: period {start}..{end} is empty or outside the modelled days "
                         f"{first_date + int(begin[0])}..{first_date + int(end_day[-1])}")
    k0 = int(np.flatnonzero(end_day >= d0)[0])
    k1 = int(np.flatnonzero(begin <= d1)[-1])
    return Period(d0, d1, k0, k1, int(begin[k0]), int(end_day[k1]), first_date)


def year_span(arrays: GlacierArrays, k: int) -> tuple[int, int]:
    """First and last climate day of balance year k (its begin and end dates)."""
    days = np.asarray(arrays.day_index[k])[np.asarray(arrays.day_valid[k])]
    return int(days.min()), int(days.max())


def along_days(values, like):
    """(n,) per-day values reshaped to broadcast against ``like`` (n, ...): (n, 1) or (n, 1, 1)."""
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def perturb_climate(arrays: GlacierArrays, temperature_offset=None, log_precipitation=None) -> GlacierArrays:
    """Arrays with ``T + offset`` and ``P · exp(log_precipitation)``, both (D,) per-day values
    applied uniformly over the climate's trailing (spatial) axes; None leaves a variable as is."""
    temperature, precipitation = arrays.temperature_2m, arrays.precipitation
    if temperature_offset is not None:
        temperature = temperature + along_days(temperature_offset, temperature).astype(temperature.dtype)
    if log_precipitation is not None:
        factor = jnp.exp(along_days(log_precipitation, precipitation))
        precipitation = precipitation * factor.astype(precipitation.dtype)
    return eqx.tree_at(lambda a: (a.temperature_2m, a.precipitation), arrays, (temperature, precipitation))


def with_climate(arrays: GlacierArrays, temperature, precipitation) -> GlacierArrays:
    """Arrays with the daily climate replaced (same shapes as the originals)."""
    return eqx.tree_at(lambda a: (a.temperature_2m, a.precipitation), arrays, (temperature, precipitation))


def climate_window(arrays: GlacierArrays, first_day: int, last_day: int) -> GlacierArrays:
    """Arrays whose climate holds only days ``first_day..last_day``, with ``day_index`` shifted to
    match. Only the balance years lying inside those days may be run on the result."""
    n = last_day - first_day + 1
    day_index = jnp.clip(arrays.day_index - first_day, 0, n - 1)  # other years' indices are unused
    return eqx.tree_at(
        lambda a: (a.temperature_2m, a.precipitation, a.day_index),
        arrays,
        (arrays.temperature_2m[first_day:last_day + 1], arrays.precipitation[first_day:last_day + 1], day_index),
    )


def masked_mean(field, mask):
    """Outline-weighted mean over the last two axes: field (..., H, W), mask (H, W) → (...)."""
    return jnp.sum(field * mask, axis=(-2, -1)) / jnp.sum(mask, axis=(-2, -1))


def run_years(model, arrays: GlacierArrays, k0: int, k1: int, state, series: bool = False):
    """Balance years k0..k1 from ``state``.

    Returns (state, season sums (n, 2, H, W), glacier-wide daily SMB (n, L) or None), n = k1 − k0 + 1.
    """
    def scan(state, first, last, spinup):
        def body(state, k):
            state, acc, _, out = year_step(model, arrays, k, state, series=series, spinup=spinup)
            # Reduce the (L, H, W) series to the glacier mean at once, so only (n, L) is stacked.
            daily = None if out is None else masked_mean(out, arrays.outlines[k])
            return state, (acc, daily)

        # Rematerialise per year as run_glacier does: reverse mode keeps one state per year.
        return jax.lax.scan(jax.checkpoint(body), state, jnp.arange(first, last + 1))

    # Spin-up years (the first n_spinup) and study years differ for C/D (MODEL.md §9.1), so they
    # get separate scans, as in run_glacier.
    n_spinup = getattr(arrays, "n_spinup", 0)
    parts = []
    for first, last, spinup in ((k0, min(k1, n_spinup - 1), True), (max(k0, n_spinup), k1, False)):
        if first <= last:
            state, part = scan(state, first, last, spinup)
            parts.append(part)
    acc = jnp.concatenate([p[0] for p in parts])
    daily = None if parts[0][1] is None else jnp.concatenate([p[1] for p in parts])
    return state, acc, daily


def state_at(model, arrays: GlacierArrays, k: int):
    """The state (SWE or GRU hidden state) at the start of year k, from the cold start."""
    state = initial_state(model, arrays)
    if k > 0:
        state, _, _ = run_years(model, arrays, 0, k - 1, state)
    return jax.lax.stop_gradient(state)


def _annual_fields(model, window: GlacierArrays, period: Period, state):
    """Annual SMB fields (n_years, H, W) of the period's years on the (perturbed) window."""
    _, acc, _ = run_years(model, window, period.first_year, period.last_year, state)
    return acc[:, 0] + acc[:, 1]


def _daily_smb(model, window: GlacierArrays, period: Period, state):
    """Glacier-wide daily SMB (n_days,) of the period's reported days, on the (perturbed) window.

    A day that two periods share (the midseason day, a shared year boundary) holds the sum of its
    two half-weighted values, as in the published evaluation (MODEL.md §9.3).
    """
    k0, k1 = period.first_year, period.last_year
    _, _, daily = run_years(model, window, k0, k1, state, series=True)
    valid = window.day_valid[k0:k1 + 1]
    n_run = period.run_last_day - period.run_first_day + 1
    series = jnp.zeros(n_run, daily.dtype).at[window.day_index[k0:k1 + 1]].add(jnp.where(valid, daily, 0.0))
    start = period.first_day - period.run_first_day
    return series[start:start + period.n_days]


def _window_of(arrays: GlacierArrays, period: Period) -> GlacierArrays:
    return climate_window(arrays, period.run_first_day, period.run_last_day)


def _run_days(period: Period) -> np.ndarray:
    return np.arange(period.run_first_day, period.run_last_day + 1)


@eqx.filter_jit
def annual_balances(model, arrays: GlacierArrays):
    """Glacier-wide annual balance of every balance year (Y,), m w.e. a⁻¹ (spin-up included)."""
    run = run_glacier(model, arrays)
    return masked_mean(run.season_smb[:, 0] + run.season_smb[:, 1], arrays.outlines)


def glacier_mean_climate(arrays: GlacierArrays, period: Period):
    """Glacier-mean surface temperature (°C) and precipitation (m w.e. day⁻¹) of the period's days.

    Each day uses the outline (and lapse offset) of the balance year it belongs to. With the
    column layout, a column counts as many times as glacier cells map to it. Returns numpy (n_days,).
    """
    temperature = np.full(period.n_days, np.nan, np.float32)
    precipitation = np.full(period.n_days, np.nan, np.float32)
    cell = getattr(arrays, "climate_cell", None)
    for k in range(period.first_year, period.last_year + 1):  # later years win a shared boundary day
        begin, end = year_span(arrays, k)
        d0, d1 = max(begin, period.first_day), min(end, period.last_day)
        if d1 < d0:
            continue
        outline = arrays.outlines[k]
        if arrays.temperature_2m.ndim == 2:  # (D, C): weight each column by its glacier cells
            weights = jnp.zeros(arrays.temperature_2m.shape[1], outline.dtype)
            weights = weights.at[cell.reshape(-1)].add(outline.reshape(-1))
        else:
            weights = outline
        axes = weights.ndim

        def mean(x):
            return np.asarray(jnp.tensordot(x[d0:d1 + 1], weights, axes=axes) / jnp.sum(weights))

        lapse = float(masked_mean(arrays.lapse_offset[k], outline))
        temperature[d0 - period.first_day:d1 - period.first_day + 1] = mean(arrays.temperature_2m) + lapse
        precipitation[d0 - period.first_day:d1 - period.first_day + 1] = mean(arrays.precipitation)
    return temperature, precipitation


def monthly(values, dates, reduce: str = "sum"):
    """Aggregate per-day values (n, ...) by calendar month: returns (months datetime64[M] (m,),
    (m, ...) sums or means)."""
    values = np.asarray(values)
    months = np.asarray(dates).astype("datetime64[M]")
    labels, inverse = np.unique(months, return_inverse=True)
    out = np.zeros((labels.size,) + values.shape[1:], np.float64)
    np.add.at(out, inverse, values)
    if reduce == "mean":
        out /= np.bincount(inverse).reshape((-1,) + (1,) * (values.ndim - 1))
    elif reduce != "sum":
        raise ValueError(f"reduce must be 'sum' or 'mean', not {reduce!r}")
    return labels, out


# --------------------------------------------------------------------------------------------
# 1. Inverse modelling: the effective forcing offset
# --------------------------------------------------------------------------------------------


class OffsetResult(NamedTuple):
    offset: float  # °C, the optimised offset
    offsets: np.ndarray  # (steps + 1,) °C, offset before each step, then the final one
    balances: np.ndarray  # (steps + 1,) m w.e. a⁻¹, mean annual balance over the window at those offsets
    balance_without: float  # m w.e. a⁻¹, mean annual balance without offset
    balance_with: float  # m w.e. a⁻¹, mean annual balance with the final offset
    sensitivity: float  # m w.e. a⁻¹ °C⁻¹, d(mean balance)/d(offset) without offset
    from_year: int
    window: tuple[int, int]


def _offset_days(period: Period, from_day: int, offset):
    """(n_run,) per-day temperature offset: ``offset`` on days ≥ from_day, 0 before."""
    return offset * jnp.asarray(_run_days(period) >= from_day, jnp.float32)


def _window_balance(model, arrays, period, from_day, offset, state, first_scored: int):
    window = perturb_climate(_window_of(arrays, period), _offset_days(period, from_day, offset))
    annual = masked_mean(_annual_fields(model, window, period, state),
                         arrays.outlines[period.first_year:period.last_year + 1])
    return jnp.mean(annual[first_scored:])


@eqx.filter_jit
def _optimise_offset(model, arrays, period: Period, from_day: int, first_scored: int, steps: int,
                     learning_rate: float):
    state = state_at(model, arrays, period.first_year)

    def balance(offset):
        return _window_balance(model, arrays, period, from_day, offset, state, first_scored)

    # Measure the balance in °C-equivalent, i.e. divided by the initial sensitivity dB/dT: the
    # minimiser is the same, but the curvature of the loss is then ~2 on every glacier, so one
    # learning rate suits all (1/2 would be a Newton step) without per-glacier tuning.
    sensitivity = jax.grad(balance)(jnp.float32(0.0))
    scale = jnp.maximum(jnp.abs(sensitivity), 1e-3)
    optimiser = optax.sgd(learning_rate)

    def loss(offset):
        b = balance(offset)
        return (b / scale) ** 2, b

    def step(carry, _):
        offset, opt_state = carry
        (_, b), grad = jax.value_and_grad(loss, has_aux=True)(offset)
        updates, opt_state = optimiser.update(grad, opt_state)
        return (optax.apply_updates(offset, updates), opt_state), (offset, b)

    offset0 = jnp.float32(0.0)
    (offset, _), (offsets, balances) = jax.lax.scan(step, (offset0, optimiser.init(offset0)), None, length=steps)
    return jnp.append(offsets, offset), jnp.append(balances, balance(offset)), sensitivity


def effective_forcing_offset(model, arrays: GlacierArrays, tensors, from_year: int, window: tuple[int, int],
                             steps: int = 30, learning_rate: float = 0.3) -> OffsetResult:
    """The uniform temperature offset (°C) that, applied to every day of the balance years from
    ``from_year`` on, brings the mean glacier-wide annual balance of the ``window`` years
    (labels, inclusive) to zero: gradient descent on (mean balance)², with the balance expressed
    in °C-equivalent (divided by its initial sensitivity to the offset) so that ``learning_rate``
    is a fraction of a Newton step: with 0.3 the error roughly halves at every step.

    A day that year ``from_year`` shares with the year before keeps its real value in that
    earlier year. Negative offsets mean the glacier needs a cooler climate to be in balance.
    """
    y0, y1 = window
    if y1 < from_year:
        raise ValueError(f"window {window} ends before the offset starts ({from_year})")
    period = years_period(tensors, y0, y1, run_from=from_year)
    from_day = int(np.asarray(tensors.begin_day)[year_index(tensors, from_year)])
    first_scored = year_index(tensors, y0) - period.first_year
    offsets, balances, sensitivity = _optimise_offset(model, arrays, period, from_day, first_scored, int(steps),
                                                      float(learning_rate))
    offsets, balances = np.asarray(offsets), np.asarray(balances)
    return OffsetResult(float(offsets[-1]), offsets, balances, float(balances[0]), float(balances[-1]),
                        float(sensitivity), int(from_year), (int(y0), int(y1)))


@eqx.filter_jit
def _fields_with_offset(model, arrays, period: Period, from_day: int, offset):
    state = state_at(model, arrays, period.first_year)
    window = perturb_climate(_window_of(arrays, period), _offset_days(period, from_day, offset))
    return _annual_fields(model, window, period, state)


def cumulative_smb_maps(model, arrays: GlacierArrays, tensors, result: OffsetResult):
    """Cumulative SMB (m w.e.) of the window years at every cell, without and with the offset:
    two (H, W) numpy maps, NaN off the glacier (cells outside every outline of the window)."""
    y0, y1 = result.window
    period = years_period(tensors, y0, y1, run_from=result.from_year)
    from_day = int(np.asarray(tensors.begin_day)[year_index(tensors, result.from_year)])
    first = year_index(tensors, y0) - period.first_year
    maps = []
    for offset in (0.0, result.offset):
        fields = _fields_with_offset(model, arrays, period, from_day, jnp.float32(offset))
        maps.append(np.asarray(jnp.sum(fields[first:], axis=0)))
    k0, k1 = year_index(tensors, y0), year_index(tensors, y1)
    glacier = np.asarray(arrays.outlines[k0:k1 + 1]).max(axis=0) > 0
    return tuple(np.where(glacier, m, np.nan) for m in maps)


class DailySeries(NamedTuple):
    dates: np.ndarray  # (n,) datetime64[D]
    precipitation: np.ndarray  # (n,) glacier-mean precipitation, m w.e. day⁻¹
    temperature: np.ndarray  # (n,) glacier-mean surface temperature, °C (offset included)
    smb: np.ndarray  # (n,) glacier-wide SMB, m w.e. day⁻¹
    cumulative_smb: np.ndarray  # (n,) glacier-wide SMB cumulated from the first day, m w.e.


@eqx.filter_jit
def _daily_with_offset(model, arrays, period: Period, from_day: int, offset):
    state = state_at(model, arrays, period.first_year)
    window = perturb_climate(_window_of(arrays, period), _offset_days(period, from_day, offset))
    return _daily_smb(model, window, period, state)


def daily_series(model, arrays: GlacierArrays, tensors, first_year: int, last_year: int,
                 temperature_offset: float = 0.0, offset_from_year: int | None = None) -> DailySeries:
    """Daily glacier-mean forcing and glacier-wide SMB of balance years ``first_year..last_year``,
    optionally with ``temperature_offset`` applied from ``offset_from_year`` (default: first_year) on."""
    from_year = first_year if offset_from_year is None else offset_from_year
    period = years_period(tensors, first_year, last_year, run_from=from_year)
    from_day = int(np.asarray(tensors.begin_day)[year_index(tensors, from_year)])
    smb = np.asarray(_daily_with_offset(model, arrays, period, from_day, jnp.float32(temperature_offset)))
    temperature, precipitation = glacier_mean_climate(arrays, period)
    dates = period.dates()
    temperature = temperature + np.where(np.arange(period.first_day, period.last_day + 1) >= from_day,
                                         np.float32(temperature_offset), np.float32(0.0))
    return DailySeries(dates, precipitation, temperature, smb, np.cumsum(smb))


# --------------------------------------------------------------------------------------------
# 2. Attribution: integrated gradients against a climatological year
# --------------------------------------------------------------------------------------------


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
    window = _window_of(arrays, period)
    lo, hi = period.run_first_day, period.run_last_day + 1
    x_t, x_p = window.temperature_2m, window.precipitation
    b_t, b_p = baseline_t[lo:hi], baseline_p[lo:hi]
    d_t, d_p = x_t - b_t, x_p - b_p

    def balance(temperature, precipitation):
        fields = _annual_fields(model, with_climate(window, temperature, precipitation), period, state)
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


# --------------------------------------------------------------------------------------------
# 3. Aleatoric uncertainty: weekly forcing errors through the cumulative glacier-wide SMB
# --------------------------------------------------------------------------------------------


def propagate_variance(fn, n_blocks: int, sigma_t: float, sigma_p: float, chunk: int = 16):
    """First-order variance of ``fn(eps_t (B,), eps_p (B,)) -> (n,)`` for independent errors
    ``eps_t ~ N(0, sigma_t²)``, ``eps_p ~ N(0, sigma_p²)`` per block:

        Var ≈ Σ_b (σ_t ∂fn/∂eps_t,b)² + Σ_b (σ_p ∂fn/∂eps_p,b)²,

    one forward-mode JVP per (variable, block) with a σ-scaled one-hot tangent, ``chunk`` JVPs at
    a time (vmap) and their squares summed as they come (scan). Exact for linear ``fn``.

    Returns (fn(0, 0) (n,), temperature part of the variance (n,), precipitation part (n,)).
    """
    zeros = jnp.zeros(n_blocks, jnp.float32)
    n_tangents = 2 * n_blocks
    # Tangent i < B perturbs temperature block i, B ≤ i < 2B precipitation block i − B; the padding
    # indices ≥ 2B give zero tangents (one_hot of an out-of-range index is all zeros).
    ids = jnp.arange(n_tangents + (-n_tangents) % chunk).reshape(-1, chunk)

    def response(i):
        tangent_t = sigma_t * jax.nn.one_hot(i, n_blocks, dtype=jnp.float32)
        tangent_p = sigma_p * jax.nn.one_hot(i - n_blocks, n_blocks, dtype=jnp.float32)
        return jax.jvp(fn, (zeros, zeros), (tangent_t, tangent_p))[1]

    def body(variance, i):
        squared = jax.vmap(response)(i) ** 2  # (chunk, n)
        is_t = (i < n_blocks)[:, None]
        return (variance[0] + jnp.sum(jnp.where(is_t, squared, 0.0), axis=0),
                variance[1] + jnp.sum(jnp.where(is_t, 0.0, squared), axis=0)), None

    mean = fn(zeros, zeros)
    (var_t, var_p), _ = jax.lax.scan(body, (jnp.zeros_like(mean), jnp.zeros_like(mean)), ids)
    return mean, var_t, var_p


def _blocks(period: Period, block_days: int):
    """(n_run,) weekly block of each run day (−1 outside the reported days) and the block count."""
    offset = _run_days(period) - period.first_day
    block = np.where((offset >= 0) & (offset < period.n_days), offset // block_days, -1)
    return jnp.asarray(block, jnp.int32), -(-period.n_days // block_days)


def _cumulative_smb(model, arrays, period: Period, state, block, eps_t, eps_p):
    """Cumulative glacier-wide SMB (n_days,) with block errors eps_t, eps_p (B,) on the period's days."""
    inside = block >= 0
    per_day_t = jnp.where(inside, eps_t[jnp.maximum(block, 0)], 0.0)
    per_day_p = jnp.where(inside, eps_p[jnp.maximum(block, 0)], 0.0)
    window = perturb_climate(_window_of(arrays, period), per_day_t, per_day_p)
    return jnp.cumsum(_daily_smb(model, window, period, state))


class Uncertainty(NamedTuple):
    dates: np.ndarray  # (n,) datetime64[D]
    mean: np.ndarray  # (n,) cumulative glacier-wide SMB, m w.e. (JVP: the unperturbed run)
    std: np.ndarray  # (n,) its standard deviation, m w.e.
    std_temperature: np.ndarray | None  # (n,) JVP: the part due to temperature errors alone
    std_precipitation: np.ndarray | None  # (n,) JVP: the part due to precipitation errors alone
    members: np.ndarray | None  # (n_members, n) Monte Carlo members


@eqx.filter_jit
def _jvp_uncertainty(model, arrays, period: Period, block_days: int, sigma_t: float, sigma_p: float, chunk: int):
    state = state_at(model, arrays, period.first_year)
    block, n_blocks = _blocks(period, block_days)

    def fn(eps_t, eps_p):
        return _cumulative_smb(model, arrays, period, state, block, eps_t, eps_p)

    return propagate_variance(fn, n_blocks, sigma_t, sigma_p, chunk)


def forcing_uncertainty_jvp(model, arrays: GlacierArrays, period: Period, sigma_t: float = SIGMA_TEMPERATURE,
                            sigma_p: float = SIGMA_LOG_PRECIPITATION, block_days: int = BLOCK_DAYS,
                            chunk: int = 16) -> Uncertainty:
    """First-order (linearised) spread of the cumulative glacier-wide SMB over ``period`` under
    weekly-block forcing errors: ``T + eps_t`` and ``P · exp(eps_p)``, independent between blocks
    and uniform over the glacier. See :func:`propagate_variance`."""
    mean, var_t, var_p = _jvp_uncertainty(model, arrays, period, int(block_days), float(sigma_t),
                                          float(sigma_p), int(chunk))
    var_t, var_p = np.asarray(var_t, np.float64), np.asarray(var_p, np.float64)
    return Uncertainty(period.dates(), np.asarray(mean), np.sqrt(var_t + var_p), np.sqrt(var_t), np.sqrt(var_p), None)


@eqx.filter_jit
def _monte_carlo(model, arrays, period: Period, block_days: int, sigma_t: float, sigma_p: float, keys):
    state = state_at(model, arrays, period.first_year)
    block, n_blocks = _blocks(period, block_days)

    def member(key):
        key_t, key_p = jax.random.split(key)
        eps_t = sigma_t * jax.random.normal(key_t, (n_blocks,), jnp.float32)
        eps_p = sigma_p * jax.random.normal(key_p, (n_blocks,), jnp.float32)
        return _cumulative_smb(model, arrays, period, state, block, eps_t, eps_p)

    _, members = jax.lax.scan(lambda _, k: (None, jax.vmap(member)(k)), None, keys)
    return members.reshape(-1, members.shape[-1])


def forcing_uncertainty_mc(model, arrays: GlacierArrays, period: Period, n_members: int = 100, seed: int = 0,
                           sigma_t: float = SIGMA_TEMPERATURE, sigma_p: float = SIGMA_LOG_PRECIPITATION,
                           block_days: int = BLOCK_DAYS, chunk: int = 16) -> Uncertainty:
    """Monte-Carlo ensemble of ``n_members`` runs with the same weekly-block errors as
    :func:`forcing_uncertainty_jvp`, ``chunk`` members at a time; the reference the first-order
    spread is checked against. Mean and standard deviation (ddof 1) over the members."""
    n_chunks = -(-n_members // chunk)
    keys = jax.random.split(jax.random.PRNGKey(seed), n_chunks * chunk).reshape(n_chunks, chunk, -1)
    members = np.asarray(_monte_carlo(model, arrays, period, int(block_days), float(sigma_t),
                                      float(sigma_p), keys))[:n_members]
    return Uncertainty(period.dates(), members.mean(axis=0), members.std(axis=0, ddof=1), None, None, members)
