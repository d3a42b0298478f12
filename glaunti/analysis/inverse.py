"""Inverse modelling: the effective forcing offset.

Which uniform temperature offset (°C), applied from a given balance year on, brings the mean
glacier-wide annual balance of a window of years to zero, i.e. what temperature change is the
glacier out of balance with? Found by gradient descent through the whole run.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from glaunti.analysis.common import (
    Period,
    annual_fields,
    daily_smb,
    glacier_mean_climate,
    masked_mean,
    period_window,
    perturb_climate,
    state_at,
    year_index,
    years_period,
)
from glaunti.layouts import GlacierArrays


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
    return offset * jnp.asarray(period.run_days() >= from_day, jnp.float32)


def _offset_window(arrays, period: Period, from_day: int, offset) -> GlacierArrays:
    """The period's window with the offset added from ``from_day`` on."""
    return perturb_climate(period_window(arrays, period), _offset_days(period, from_day, offset))


def _window_balance(model, arrays, period, from_day, offset, state, first_scored: int):
    window = _offset_window(arrays, period, from_day, offset)
    annual = masked_mean(annual_fields(model, window, period, state),
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


def _offset_start(tensors, from_year: int) -> int:
    """Climate-day index where an offset applied from balance year ``from_year`` starts."""
    return int(np.asarray(tensors.begin_day)[year_index(tensors, from_year)])


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
    first_scored = year_index(tensors, y0) - period.first_year
    offsets, balances, sensitivity = _optimise_offset(model, arrays, period, _offset_start(tensors, from_year),
                                                      first_scored, int(steps), float(learning_rate))
    offsets, balances = np.asarray(offsets), np.asarray(balances)
    return OffsetResult(float(offsets[-1]), offsets, balances, float(balances[0]), float(balances[-1]),
                        float(sensitivity), int(from_year), (int(y0), int(y1)))


@eqx.filter_jit
def _fields_with_offset(model, arrays, period: Period, from_day: int, offset):
    state = state_at(model, arrays, period.first_year)
    return annual_fields(model, _offset_window(arrays, period, from_day, offset), period, state)


def cumulative_smb_maps(model, arrays: GlacierArrays, tensors, result: OffsetResult):
    """Cumulative SMB (m w.e.) of the window years at every cell, without and with the offset:
    two (H, W) numpy maps, NaN off the glacier (cells outside every outline of the window)."""
    y0, y1 = result.window
    period = years_period(tensors, y0, y1, run_from=result.from_year)
    from_day = _offset_start(tensors, result.from_year)
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
    return daily_smb(model, _offset_window(arrays, period, from_day, offset), period, state)


def daily_series(model, arrays: GlacierArrays, tensors, first_year: int, last_year: int,
                 temperature_offset: float = 0.0, offset_from_year: int | None = None) -> DailySeries:
    """Daily glacier-mean forcing and glacier-wide SMB of balance years ``first_year..last_year``,
    optionally with ``temperature_offset`` applied from ``offset_from_year`` (default: first_year) on."""
    from_year = first_year if offset_from_year is None else offset_from_year
    period = years_period(tensors, first_year, last_year, run_from=from_year)
    from_day = _offset_start(tensors, from_year)
    smb = np.asarray(_daily_with_offset(model, arrays, period, from_day, jnp.float32(temperature_offset)))
    temperature, precipitation = glacier_mean_climate(arrays, period)
    temperature = temperature + np.where(period.days() >= from_day, np.float32(temperature_offset),
                                         np.float32(0.0))
    return DailySeries(period.dates(), precipitation, temperature, smb, np.cumsum(smb))
