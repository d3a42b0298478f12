"""The engine: one day scan and one year walk that every model, loss, inference and analysis use.

A glacier's years are stored as fixed-length day blocks (``GlacierArrays``, built in
:mod:`glaunti.layouts`): a seasonal year is its winter period followed by its summer period (the
midseason day twice, each half-weighted), an annual-only year its one period, padded to the
block length L with invalid days that leave the state untouched. Running a block's valid days
in order from the year's initial state is the published "winter, then summer from winter's
state" (``docs/architecture.md``).

Nothing here knows a particular model. A model (``glaunti.ti_model.TIModel``,
``glaunti.gru_model.GRUModel``, ``glaunti.ti_corr_model.GlaUnTI``) provides

- ``initial_state(shape)``: the cold-start state of an (H, W) grid;
- ``year_step(arrays, k, state, *, series, spinup, custom_vjp)``: balance year k, built on
  :func:`scan_block` → (state, (2, H, W) per-period sums, (5, H, W) corrections or None,
  (L, H, W) daily series or None);
- ``cell_independent`` and ``state_cell_axis``: whether (and along which state axis) a run may
  be split into chunks of cells;
- ``TERMS``: the names of the day terms its ``year_step(..., terms=True)`` returns beside the
  daily SMB (the TI models: ``glaunti.ti_model.TERMS``; none for the GRU);

and, for calibration and parameter files, ``trainable_filter()``, ``regularisers(run, arrays)``,
``authors_tree()`` / ``from_authors_tree(tree)`` (:mod:`glaunti.params`).

Every entry point traces under float32 matmul precision (:data:`MATMUL_PRECISION`,
:func:`at_published_precision`), whoever calls it: GPUs would otherwise use TF32 and leave the
published numbers.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import constants
from glaunti.layouts import GRID_FIELDS, GlacierArrays

# The published numbers are float32 matmuls (the GRU cell, the corrector's convolutions).
MATMUL_PRECISION = "float32"
# Order of the seasons everywhere (losses, evaluation, outputs): annual, winter, summer.
SEASONS = constants.balance_codes
# Memory guard: a cell-independent model on a "cells" glacier with more cells than this is run
# in chunks of cells (``lax.map``, each chunk rematerialised), so that device memory is bounded
# by the chunk, not by the grid. Exact: such models treat every cell alone.
MAX_CHUNK_CELLS = 32768
_DEFAULT = object()  # "MAX_CHUNK_CELLS as it is when the run is traced"


def published_precision():
    """Context in which model code is traced: float32 matmuls (read by JAX at trace time)."""
    return jax.default_matmul_precision(MATMUL_PRECISION)


def at_published_precision(fn):
    """Decorator of every entry point that traces model code (the engine's :func:`year_step`,
    the models' field-based ``run``/``corrections``): its body traces under
    :func:`published_precision`, whoever calls it."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with published_precision():
            return fn(*args, **kwargs)

    return traced


class GlacierRun(NamedTuple):
    season_smb: Float[Array, "Y 2 H W"]  # per-period sums: [winter or annual, summer (0 if none)]
    corrections: Float[Array, "Y 5 H W"] | None
    state: object


def masked_mean(field, mask):
    """Outline-weighted mean over the last two axes: field (..., H, W), mask (..., H, W) → (...)."""
    return jnp.sum(field * mask, axis=(-2, -1)) / jnp.sum(mask, axis=(-2, -1))


def season_fields(season_smb):
    """(Y, 2, H, W) per-period sums → (Y, 3, H, W) in :data:`SEASONS` order."""
    winter, summer = season_smb[:, 0], season_smb[:, 1]
    return jnp.stack([winter + summer, winter, summer], axis=1)


# ----------------------------------------------------------------------------------------------
# The day scan
# ----------------------------------------------------------------------------------------------
def scan_days(step, state, days, forcing: Callable, smb_shape, series: bool = False):
    """Scan ``step(state, T, P, weight, flag) -> (state, smb_day)`` over days.

    Args:
        step: one day of a model; ``flag`` is a per-day bool the model may use (the GRU's
            continuation rule). A step may return ``(state, (smb_day, terms))`` instead, with
            ``terms`` the day's diagnostics (the TI model's snowfall, rainfall and melt): they
            are zeroed on invalid days like the SMB and, with ``series``, stacked beside it.
        state: the state before the first day.
        days: ``(x, weight, valid, period, flag)``, each with a leading day axis L; ``x`` is
            what ``forcing`` turns into the day's (T, P), ``period`` 0 or 1 selects the sum a
            day's SMB is added to (winter or annual / summer).
        forcing: ``x -> (temperature, precipitation)`` of one day, each ``smb_shape``.
        smb_shape: shape of one day's SMB.
        series: also return the daily SMB.

    Invalid days leave the state untouched (the softplus of the TI model is not the identity,
    and the GRU always moves) and add 0. Each day is rematerialised in the backward pass.

    Returns:
        (state, (2, *smb_shape) per-period sums, (L, *smb_shape) daily SMB (or, for a step
        with terms, (daily SMB, (L, ...) terms)) or None).
    """

    def body(carry, day):
        state, acc = carry
        x, weight, ok, period, flag = day
        temperature, precipitation = forcing(x)
        new_state, out = step(state, temperature, precipitation, weight, flag)
        state = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new_state, state)
        out = jax.tree_util.tree_map(lambda v: jnp.where(ok, v, 0.0), out)
        acc = acc.at[period].add(out[0] if isinstance(out, tuple) else out)
        return (state, acc), (out if series else None)

    acc0 = jnp.zeros((2,) + tuple(smb_shape), jnp.float32)
    (state, acc), out = jax.lax.scan(jax.checkpoint(body), (state, acc0), days)
    return state, acc, out


def scan_block(step, state, arrays: GlacierArrays, k, valid, flag, series: bool = False,
               smb_shape=None):
    """:func:`scan_days` over the day block of year k (traced index) of a glacier.

    ``valid`` and ``flag`` are (L,) bool. The forcing is gathered from the daily climate
    columns inside the scan, so no (L, H, W) copy of it is ever built.
    """
    lapse = arrays.lapse_offset[k]

    def forcing(d):
        return arrays.temperature_2m[d][arrays.climate_cell] + lapse, arrays.precipitation[d][arrays.climate_cell]

    days = (arrays.day_index[k], arrays.day_weight[k], valid, arrays.day_season[k], flag)
    shape = arrays.shape if smb_shape is None else smb_shape
    return scan_days(step, state, days, forcing, shape, series)


def grid_row(arrays: GlacierArrays) -> GlacierArrays:
    """``arrays`` whose day forcing (climate columns, lapse offsets) covers its H×W grid as one
    (1, H·W) row of cells, for a day loop whose step treats every cell alone (the TI model):
    the same values, bit for bit, for less time. XLA's CPU loops vectorise along the last axis
    and finish every row of a grid with scalar code (on a 49×70 grid 6 of every 70 cells: the
    channel runs of model C take ~30 % longer than on a 1×3430 row). A "cells" row is returned
    as it is. Move states and outputs between the two with :func:`to_row` and :func:`to_grid`."""
    if arrays.shape[0] == 1:
        return arrays
    return eqx.tree_at(lambda a: (a.climate_cell, a.lapse_offset), arrays,
                       (to_row(arrays.climate_cell), to_row(arrays.lapse_offset)))


def to_row(x):
    """(..., H, W) → (..., 1, H·W), the cells in row-major order (free: a reshape)."""
    return None if x is None else x.reshape(x.shape[:-2] + (1, x.shape[-2] * x.shape[-1]))


def to_grid(x, shape):
    """Inverse of :func:`to_row` for a grid of ``shape`` (H, W)."""
    return None if x is None else x.reshape(x.shape[:-2] + tuple(shape))


def period_days(temperature, precipitation, weights, valid, flag=None):
    """``scan_days`` inputs of one period given as (T, H, W) fields (``Module.run``-style
    calls): every day in sum 0; ``valid`` None = all days; ``flag`` None = False."""
    n_days = temperature.shape[0]
    valid = jnp.ones((n_days,), bool) if valid is None else jnp.asarray(valid, bool)
    flag = jnp.zeros((n_days,), bool) if flag is None else jnp.asarray(flag, bool)
    return ((temperature, precipitation), jnp.asarray(weights, jnp.float32), valid,
            jnp.zeros((n_days,), jnp.int32), flag)


def fields_forcing(x):
    """``forcing`` of :func:`period_days`: the day's fields themselves."""
    return x


# ----------------------------------------------------------------------------------------------
# The year walk
# ----------------------------------------------------------------------------------------------
def initial_state(model, arrays: GlacierArrays):
    """The model's cold-start state on the glacier's grid."""
    return model.initial_state(arrays.shape)


@at_published_precision
def year_step(model, arrays: GlacierArrays, k, state, series: bool = False, spinup: bool = False,
              custom_vjp: bool = False, terms: bool = False):
    """Balance year k (traced index) from ``state``.

    ``spinup`` (static) marks a spin-up year (C/D then recompute the summer's corrections from
    the post-winter SWE, ``docs/model.md`` §9.1). ``custom_vjp`` (static) selects the TI day step
    with the hand-written reverse-mode derivative (training losses; forward values identical;
    no forward-mode derivative). ``terms`` (static, with ``series``; models with ``TERMS``)
    also returns the day step's terms (``glaunti.ti_model.TERMS``).

    Returns (state, (2, H, W) per-period SMB sums, (5, H, W) corrections or None,
    (L, H, W) daily series (with ``terms``: (series, (L, 3, H, W) terms)) or None).
    """
    if terms:
        if not series:
            raise ValueError("the day terms come with the daily series (series=True)")
        if not model.TERMS:
            raise ValueError(f"model {model.kind} has no day terms (it has no TI step)")
        return model.year_step(arrays, k, state, series=True, spinup=spinup, custom_vjp=custom_vjp,
                               terms=True)
    return model.year_step(arrays, k, state, series=series, spinup=spinup, custom_vjp=custom_vjp)


def walk_years(model, arrays: GlacierArrays, state, first: int = 0, last: int | None = None, *,
               series: bool = False, reduce: Callable | None = None, custom_vjp: bool = False,
               active_years=None):
    """Balance years ``first``..``last`` (static, inclusive; default all) from ``state``.

    Spin-up years (``k < arrays.n_spinup``) and study years get separate scans (C/D treat them
    differently); each year is rematerialised in the backward pass (with the model's
    ``year_remat_policy`` if it has one), which then keeps one state per year. Years without a
    valid day (padding of the training layouts) are skipped by ``lax.cond``: state unchanged,
    zero SMB and corrections. ``active_years`` (Y,) bool overrides which years run (default:
    those with a valid day). Under ``jax.vmap`` over a batch of glaciers it must be the batch's
    (any glacier of the batch has days), not batched: a batched predicate turns the ``cond``
    into a ``select`` that runs every year; a year run without valid days changes nothing.

    ``reduce(k, daily)`` (with ``series``) maps a year's (L, H, W) daily SMB before it is
    stacked, e.g. to its glacier-wide mean, so that only the reduced values are kept.

    Returns (state, (n, 2, H, W) per-period sums, (n, 5, H, W) corrections or None,
    stacked daily series (or their reductions) or None), n = last − first + 1.
    """
    last = arrays.n_years - 1 if last is None else last
    if not 0 <= first <= last < arrays.n_years:
        raise ValueError(f"years {first}..{last} are not a range of the glacier's {arrays.n_years} years")
    has_days = jnp.any(arrays.day_valid, axis=1) if active_years is None else active_years
    policy = getattr(model, "year_remat_policy", None)

    def scan(state, years, spinup):
        @functools.partial(jax.checkpoint, policy=policy)
        def body(state, k):
            def run(state):
                state, acc, corrections, out = year_step(model, arrays, k, state, series=series,
                                                         spinup=spinup, custom_vjp=custom_vjp)
                if out is not None and reduce is not None:
                    out = reduce(k, out)
                return state, (acc, corrections, out)

            def skip(state):
                return state, _zeros_like_out(run, state)

            return jax.lax.cond(has_days[k], run, skip, state)

        return jax.lax.scan(body, state, years)

    parts = []
    for lo, hi, spinup in ((first, min(last, arrays.n_spinup - 1), True),
                           (max(first, arrays.n_spinup), last, False)):
        if lo <= hi:
            state, part = scan(state, jnp.arange(lo, hi + 1), spinup)
            parts.append(part)
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *parts)
    acc, corrections, out = stacked
    return state, acc, corrections, out


def run_glacier(model, arrays: GlacierArrays, state=None, *, custom_vjp: bool = False,
                max_chunk_cells=_DEFAULT, active_years=None) -> GlacierRun:
    """Every balance year of the glacier, spin-up then study years, from the cold start (or
    ``state``), in one traced computation (:func:`walk_years`, which ``active_years`` is
    passed to).

    A cell-independent model on a "cells" glacier larger than ``max_chunk_cells`` (default
    :data:`MAX_CHUNK_CELLS`; None: never) is run in chunks of cells to bound memory."""
    limit = MAX_CHUNK_CELLS if max_chunk_cells is _DEFAULT else max_chunk_cells
    if limit and model.cell_independent and arrays.shape[0] == 1 and arrays.shape[1] > limit:
        return _chunked_run(model, arrays, state, limit, custom_vjp, active_years)
    if state is None:
        state = initial_state(model, arrays)
    state, season_smb, corrections, _ = walk_years(model, arrays, state, custom_vjp=custom_vjp,
                                                   active_years=active_years)
    return GlacierRun(season_smb, corrections, state)


def _chunked_run(model, arrays: GlacierArrays, state, max_cells: int, custom_vjp: bool,
                 active_years=None) -> GlacierRun:
    """:func:`run_glacier` of a (1, N) "cells" glacier, ``max_cells`` cells at a time."""
    n = arrays.shape[1]
    n_chunks = -(-n // max_cells)
    size = -(-n // n_chunks)
    total = n_chunks * size

    def split(a, axis):  # (..., N, ...) with N on ``axis`` -> (n_chunks, ..., size, ...)
        pad = [(0, 0)] * a.ndim
        pad[axis] = (0, total - n)
        a = jnp.pad(a, pad)
        a = a.reshape(a.shape[:axis] + (n_chunks, size) + a.shape[axis + 1:])
        return jnp.moveaxis(a, axis, 0)

    def merge(a, axis):  # inverse of ``split`` (after a leading chunk axis), padding dropped
        a = jnp.moveaxis(a, 0, axis)
        a = a.reshape(a.shape[:axis] + (total,) + a.shape[axis + 2:])
        return jax.lax.slice_in_dim(a, 0, n, axis=axis)

    cells = {name: split(getattr(arrays, name), getattr(arrays, name).ndim - 1) for name in GRID_FIELDS}
    axis = model.state_cell_axis
    states = None if state is None else split(state, axis)

    @jax.checkpoint
    def one(x):
        part_cells, part_state = x
        part = eqx.tree_at(lambda a: [getattr(a, f) for f in GRID_FIELDS], arrays,
                           [part_cells[f] for f in GRID_FIELDS])
        run = run_glacier(model, part, part_state, custom_vjp=custom_vjp, max_chunk_cells=None,
                          active_years=active_years)
        return run.season_smb, run.state

    smb, final = jax.lax.map(one, (cells, states))  # (n_chunks, Y, 2, 1, size), states
    return GlacierRun(merge(smb, smb.ndim - 2), None, merge(final, axis))


def _zeros_like_out(run, state):
    out = jax.eval_shape(run, state)[1]
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), out)
