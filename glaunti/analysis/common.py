"""What the three analyses share: periods of days and years, climate perturbations, and running a
window of balance years on (perturbed) arrays with the engine's year walk.

Conventions (see :mod:`glaunti.analysis`): D climate days, C climate columns, H×W grid, Y balance
years indexed by k, L the day-block length. Units: °C, m w.e.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from glaunti.glacier import initial_state, masked_mean, run_glacier, walk_years
from glaunti.layouts import GlacierArrays


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

    def run_days(self) -> np.ndarray:
        """(n_run,) climate-day indices of the run days."""
        return np.arange(self.run_first_day, self.run_last_day + 1)

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


# --------------------------------------------------------------------------------------------
# The daily climate, perturbed along the day axis
# --------------------------------------------------------------------------------------------


def along_days(values, like):
    """(n,) per-day values reshaped to broadcast against ``like`` (n, ...): (n, 1) or (n, 1, 1)."""
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def with_climate(arrays: GlacierArrays, temperature, precipitation) -> GlacierArrays:
    """Arrays with the daily climate replaced (same shapes as the originals)."""
    return eqx.tree_at(lambda a: (a.temperature_2m, a.precipitation), arrays, (temperature, precipitation))


def perturb_climate(arrays: GlacierArrays, temperature_offset=None, log_precipitation=None) -> GlacierArrays:
    """Arrays with ``T + offset`` and ``P · exp(log_precipitation)``, both (D,) per-day values
    applied uniformly over the climate's trailing (spatial) axes; None leaves a variable as is."""
    temperature, precipitation = arrays.temperature_2m, arrays.precipitation
    if temperature_offset is not None:
        temperature = temperature + along_days(temperature_offset, temperature).astype(temperature.dtype)
    if log_precipitation is not None:
        factor = jnp.exp(along_days(log_precipitation, precipitation))
        precipitation = precipitation * factor.astype(precipitation.dtype)
    return with_climate(arrays, temperature, precipitation)


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


def period_window(arrays: GlacierArrays, period: Period) -> GlacierArrays:
    """The arrays cut to the period's run days (:func:`climate_window`)."""
    return climate_window(arrays, period.run_first_day, period.run_last_day)


# --------------------------------------------------------------------------------------------
# The year walk
# --------------------------------------------------------------------------------------------


def run_years(model, arrays: GlacierArrays, k0: int, k1: int, state, series: bool = False):
    """Balance years k0..k1 from ``state``, by the engine's year walk
    (:func:`glaunti.glacier.walk_years`), with the daily series reduced to the glacier mean as
    each year produces it, so that only (n, L) values are kept.

    Returns (state, season sums (n, 2, H, W), glacier-wide daily SMB (n, L) or None), n = k1 − k0 + 1.
    """
    def glacier_mean(k, daily):
        return masked_mean(daily, arrays.outlines[k])

    state, acc, _, daily = walk_years(model, arrays, state, k0, k1, series=series,
                                      reduce=glacier_mean if series else None)
    return state, acc, daily


def state_at(model, arrays: GlacierArrays, k: int):
    """The state (SWE or GRU hidden state) at the start of year k, from the cold start."""
    state = initial_state(model, arrays)
    if k > 0:
        state, _, _ = run_years(model, arrays, 0, k - 1, state)
    return jax.lax.stop_gradient(state)


def annual_fields(model, window: GlacierArrays, period: Period, state):
    """Annual SMB fields (n_years, H, W) of the period's years on the (perturbed) window."""
    _, acc, _ = run_years(model, window, period.first_year, period.last_year, state)
    return acc[:, 0] + acc[:, 1]


def daily_smb(model, window: GlacierArrays, period: Period, state):
    """Glacier-wide daily SMB (n_days,) of the period's reported days, on the (perturbed) window.

    A day that two periods share (the midseason day, a shared year boundary) holds the sum of its
    two half-weighted values, as in the published evaluation (docs/architecture.md, day blocks).
    """
    k0, k1 = period.first_year, period.last_year
    _, _, daily = run_years(model, window, k0, k1, state, series=True)
    valid = window.day_valid[k0:k1 + 1]
    n_run = period.run_last_day - period.run_first_day + 1
    series = jnp.zeros(n_run, daily.dtype).at[window.day_index[k0:k1 + 1]].add(jnp.where(valid, daily, 0.0))
    start = period.first_day - period.run_first_day
    return series[start:start + period.n_days]


@eqx.filter_jit
def annual_balances(model, arrays: GlacierArrays):
    """Glacier-wide annual balance of every balance year (Y,), m w.e. a⁻¹ (spin-up included)."""
    run = run_glacier(model, arrays)
    return masked_mean(run.season_smb[:, 0] + run.season_smb[:, 1], arrays.outlines)


# --------------------------------------------------------------------------------------------
# Glacier means and calendar aggregation (plots)
# --------------------------------------------------------------------------------------------


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
        lapse = float(masked_mean(arrays.lapse_offset[k], outline))
        days = slice(d0 - period.first_day, d1 - period.first_day + 1)
        temperature[days] = _weighted_mean(arrays.temperature_2m[d0:d1 + 1], weights) + lapse
        precipitation[days] = _weighted_mean(arrays.precipitation[d0:d1 + 1], weights)
    return temperature, precipitation


def _weighted_mean(daily, weights) -> np.ndarray:
    """(n, *S) daily values averaged over their trailing axes S with weights (*S) → numpy (n,)."""
    return np.asarray(jnp.tensordot(daily, weights, axes=weights.ndim) / jnp.sum(weights))


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
