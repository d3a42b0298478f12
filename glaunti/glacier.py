"""Whole-glacier runs: every balance year of a glacier in one compiled call.

A glacier's years are stored as fixed-length day blocks (``GlacierArrays``): a seasonal year is
its winter period followed by its summer period (the midseason day twice, each half-weighted),
an annual-only year its one period, padded to the block length L with invalid days that leave
the state untouched. Running a block's valid days in order from the year's initial state is the
published "winter, then summer from winter's state". ``run_glacier`` scans ``year_step`` over
the years (spin-up 1990–1994 included, from the cold start); inside a year, one scan over the
days accumulates the SMB of each period. The forcing is gathered from the daily climate per
day inside the scan, so no (Y, L, H, W) copy of it is ever built.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

import constants
from glaunti.gru_model import GRUModel, gru_day_step, gru_inputs
from glaunti.ti_corr_model import GlaUnTI
import contextlib
import os

from glaunti.ti_model import TIModel, apply_corrections, ti_day_step, ti_day_step_vjp

# Trace-time switch: inside ``custom_gradients()`` the TI day step of the corrected/uncorrected
# runs uses its hand-written reverse-mode derivative (training losses); outside it, plain
# autodiff (any order, forward mode too: the analysis code needs jax.jvp).
_CUSTOM_VJP = False


@contextlib.contextmanager
def custom_gradients(enabled: bool = True):
    """Trace the model runs with the hand-written TI VJP (``ti_day_step_vjp``), for reverse-mode
    training losses; forward values are bit-identical either way."""
    global _CUSTOM_VJP
    previous, _CUSTOM_VJP = _CUSTOM_VJP, enabled
    try:
        yield
    finally:
        _CUSTOM_VJP = previous


def _ti_step():
    return ti_day_step_vjp if _CUSTOM_VJP else ti_day_step


class GlacierArrays(eqx.Module):
    """Device arrays of one glacier (see ``docs/architecture.md`` for the fields)."""

    # Daily climate as its distinct cell series (reanalysis resampled by nearest neighbour is
    # constant over blocks of cells): cell (i, j) reads column climate_cell[i, j].
    temperature_2m: Float[Array, "D C"]
    precipitation: Float[Array, "D C"]
    climate_cell: Int[Array, "H W"]
    lapse_offset: Float[Array, "Y H W"]
    outlines: Float[Array, "Y H W"]
    fields: Float[Array, "Y 12 H W"]  # corrector inputs: outlines, z, zstd (normalised), 9 facies bands
    climate_monthly: Float[Array, "Y 2 14"]
    n_months: Int[Array, " Y"]
    day_index: Int[Array, "Y L"]
    day_weight: Float[Array, "Y L"]
    day_valid: Bool[Array, "Y L"]
    day_season: Int[Array, "Y L"]
    day_period_start: Bool[Array, "Y L"]
    seasonal: Bool[Array, " Y"]
    study: Bool[Array, " Y"]
    glacier_wide: Float[Array, "Y 3"]
    stake_year: Int[Array, " N"]
    stake_code: Int[Array, " N"]
    stake_row: Int[Array, " N"]
    stake_col: Int[Array, " N"]
    stake_balance: Float[Array, " N"]
    stake_weight: Float[Array, " N"]

    # Spin-up years come first (1990–1994); a static count so that they get their own scan.
    n_spinup: int = eqx.field(static=True)

    @property
    def n_years(self) -> int:
        return self.day_index.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.climate_cell.shape


# Stakes are padded to a multiple of this (with zero weight) so that glaciers of one grid shape
# share compiled functions whatever their number of stakes.
STAKE_PADDING = 64
INDEX_CODE = 3


def _pad(values, n, fill):
    values = np.asarray(values)
    return np.concatenate([values, np.full(n - len(values), fill, dtype=values.dtype)])


def host_arrays(tensors, facies: bool = False) -> dict:
    """The fields of :class:`GlacierArrays` as numpy arrays (exact shapes), plus ``n_spinup``."""
    n = max(STAKE_PADDING, -(-len(tensors.stake_balance) // STAKE_PADDING) * STAKE_PADDING)
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    i32 = lambda a: np.asarray(a, dtype=np.int32)  # noqa: E731
    facies_bands = np.asarray(tensors.facies, dtype=np.float32)
    if not facies:
        facies_bands = np.full_like(facies_bands, constants.facies_placeholder)
    fields = np.concatenate(
        [
            np.asarray(tensors.outlines, np.float32)[:, None],
            (np.asarray(tensors.elevation, np.float32) / np.float32(constants.elevation_norm))[:, None],
            (np.asarray(tensors.elevation_std, np.float32) / np.float32(constants.elevation_std_norm))[:, None],
            facies_bands,
        ],
        axis=1,
    )
    return dict(
        temperature_2m=f32(tensors.temperature_2m),
        precipitation=f32(tensors.precipitation),
        climate_cell=i32(tensors.climate_cell),
        lapse_offset=f32(tensors.lapse_offset),
        outlines=f32(tensors.outlines),
        fields=f32(fields),
        climate_monthly=f32(tensors.climate_monthly),
        n_months=i32(tensors.n_months),
        day_index=i32(tensors.day_index),
        day_weight=f32(tensors.day_weight),
        day_valid=np.asarray(tensors.day_valid, dtype=bool),
        day_season=i32(tensors.day_season),
        day_period_start=np.asarray(tensors.day_period_start, dtype=bool),
        seasonal=np.asarray(tensors.seasonal, dtype=bool),
        study=np.asarray(tensors.study, dtype=bool),
        glacier_wide=f32(tensors.glacier_wide),
        stake_year=i32(_pad(tensors.stake_year, n, 0)),
        stake_code=i32(_pad(tensors.stake_code, n, INDEX_CODE)),
        stake_row=i32(_pad(tensors.stake_row, n, 0)),
        stake_col=i32(_pad(tensors.stake_col, n, 0)),
        stake_balance=f32(_pad(tensors.stake_balance, n, 0.0)),
        stake_weight=f32(_pad(tensors.stake_weight, n, 0.0)),
        n_spinup=int(np.sum(np.asarray(tensors.years) < constants.study_period_start_year)),
    )


# ----------------------------------------------------------------------------------------------
# Layouts. "exact" keeps the glacier's own shapes (what analysis code and the golden tests use).
# The training layouts only add padding that cannot change a number, so that glaciers share
# compiled functions (docs/performance.md):
#   "padded": the number of years Y, climate days D and climate columns C rounded up to
#             buckets. Padded years are all-invalid blocks (``study`` False, outlines copied
#             from the last real year so that no mean divides by zero); ``run_glacier`` skips
#             them with ``lax.cond``, so they cost nothing. Padded days/columns are never read.
#             One compile per grid shape (H, W). Used for C and D (the corrector needs the grid).
#   "cells":  "padded", and the grid replaced by a (1, N) row of the cells that matter for the
#             loss (glacier in any year, or holding a stake), N rounded up to a cell bucket with
#             inert padding cells. Exact for the cell-independent models A and B only; one
#             compile per cell bucket, and 2-3x less work (most of a grid is off-glacier).
# ----------------------------------------------------------------------------------------------
LAYOUTS = ("exact", "padded", "cells")
YEAR_MULTIPLE = 8
DAY_MULTIPLE = 2048
MIN_COLUMNS = 16
MIN_CELLS = 128
CELL_BUCKETS_PER_OCTAVE = 4


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def column_bucket(c: int) -> int:
    """Climate columns C rounded up to a power of two (at least 16)."""
    return max(MIN_COLUMNS, 1 << int(np.ceil(np.log2(max(c, 1)))))


def cell_bucket(n: int, per_octave: int = CELL_BUCKETS_PER_OCTAVE) -> int:
    """Cells rounded up to one of ``per_octave`` sizes per power of two (≤ 1/per_octave padding):
    128, 160, 192, 224, 256, 320, ... for 4 per octave."""
    if n <= MIN_CELLS:
        return MIN_CELLS
    step = max(1, (1 << (int(np.floor(np.log2(n))))) // per_octave)
    return _round_up(n, step)


def layout_for(model) -> str:
    """The training layout of a model: "cells" for the cell-independent A and B, else "padded"."""
    return "cells" if isinstance(model, (TIModel, GRUModel)) else "padded"


def _pad_axis(a: np.ndarray, axis: int, n: int, fill=0, edge: bool = False) -> np.ndarray:
    extra = n - a.shape[axis]
    if extra <= 0:
        return a
    if edge:
        last = np.take(a, [a.shape[axis] - 1], axis=axis)
        pad = np.repeat(last, extra, axis=axis)
    else:
        shape = list(a.shape)
        shape[axis] = extra
        pad = np.full(shape, fill, dtype=a.dtype)
    return np.concatenate([a, pad], axis=axis)


def pad_host_arrays(h: dict) -> dict:
    """The "padded" layout of :func:`host_arrays` output (Y, D, C to buckets), see above."""
    h = dict(h)
    n_years = h["day_index"].shape[0]
    y = _round_up(n_years, YEAR_MULTIPLE)
    d = _round_up(h["temperature_2m"].shape[0], DAY_MULTIPLE)
    c = column_bucket(h["temperature_2m"].shape[1])
    for name in ("temperature_2m", "precipitation"):
        h[name] = _pad_axis(_pad_axis(h[name], 0, d), 1, c)
    for name in ("lapse_offset", "outlines", "fields", "climate_monthly", "n_months"):
        h[name] = _pad_axis(h[name], 0, y, edge=True)
    for name in ("day_index", "day_weight", "day_valid", "day_season", "day_period_start",
                 "seasonal", "study"):
        h[name] = _pad_axis(h[name], 0, y)
    h["glacier_wide"] = _pad_axis(h["glacier_wide"], 0, y, fill=np.nan)
    return h


def pack_host_cells(h: dict, keep: np.ndarray | None = None) -> dict:
    """The "cells" layout: the grid becomes a (1, N) row of the kept cells (default: glacier in
    any year or holding a stake), N rounded up with :func:`cell_bucket`."""
    h = dict(h)
    height, width = h["climate_cell"].shape
    if keep is None:
        keep = np.any(h["outlines"] > 0, axis=0)
        keep[h["stake_row"], h["stake_col"]] = True  # padded stakes sit on (0, 0): harmless
    flat = np.flatnonzero(np.asarray(keep, bool).ravel())
    n = cell_bucket(len(flat))
    position = np.zeros(height * width, np.int32)
    position[flat] = np.arange(len(flat), dtype=np.int32)

    def pack(a):  # (..., H, W) -> (..., 1, n)
        cells = a.reshape(a.shape[:-2] + (height * width,))[..., flat]
        return _pad_axis(cells, -1, n)[..., None, :]

    for name in ("climate_cell", "lapse_offset", "outlines", "fields"):
        h[name] = pack(h[name])
    h["stake_col"] = position[h["stake_row"] * width + h["stake_col"]]
    h["stake_row"] = np.zeros_like(h["stake_row"])
    return h


def make_arrays(tensors, facies: bool = False, *, layout: str = "exact", device=None,
                keep=None) -> GlacierArrays:
    """``GlacierTensors`` → ``GlacierArrays``. ``facies`` selects model D's inputs (the facies maps
    where they exist); otherwise the nine facies bands hold the −1 placeholder (model C).

    ``layout`` is "exact" (default: the glacier's own shapes), "padded" or "cells" (training
    layouts that share compiled functions between glaciers; see :data:`LAYOUTS`). ``device``
    places the arrays on that device (default: JAX's default device). ``keep`` (H, W) bool
    overrides the cells kept by the "cells" layout (e.g. every cell, for inference).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    h = host_arrays(tensors, facies)
    if layout != "exact":
        h = pad_host_arrays(h)
    if layout == "cells":
        h = pack_host_cells(h, keep)
    n_spinup = h.pop("n_spinup")
    if device is not None:
        h = jax.device_put(h, device)
    else:
        h = {k: jnp.asarray(v) for k, v in h.items()}
    return GlacierArrays(**h, n_spinup=n_spinup)


class GlacierRun(NamedTuple):
    season_smb: Float[Array, "Y 2 H W"]  # per-period sums: [winter or annual, summer (0 if none)]
    corrections: Float[Array, "Y 5 H W"] | None
    state: object


def initial_state(model, arrays: GlacierArrays):
    """The cold-start state: SWE filled with the snow-depletion centre, or the learned GRU state."""
    h, w = arrays.shape
    if isinstance(model, GRUModel):
        return jnp.broadcast_to(model.init_h, (h * w,) + model.init_h.shape)  # cells flattened
    ti = model.ti if isinstance(model, GlaUnTI) else model
    return jnp.full((h, w), ti.constrained().snow_depletion_centre, jnp.float32)


def _scan_block(step, state, arrays: GlacierArrays, k, valid, flag, series: bool, smb_shape=None):
    """Scan ``step(state, T, P, w, flag) -> (state, smb_day)`` over the day block of year k.

    Accumulates each period's SMB separately; invalid days leave the state untouched.
    Returns (state, (2, *smb_shape) per-period sums, (L, *smb_shape) series or None).
    """
    lapse = arrays.lapse_offset[k]
    season = arrays.day_season[k]

    def body(carry, x):
        state, acc = carry
        d, w, ok, s, f = x
        # Gather the day's forcing here rather than slicing a (L, H, W) block up front.
        temperature = arrays.temperature_2m[d][arrays.climate_cell] + lapse
        precipitation = arrays.precipitation[d][arrays.climate_cell]
        new_state, smb = step(state, temperature, precipitation, w, f)
        # Padding must keep the old state: softplus_t(s, S) != S and the GRU always moves.
        state = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new_state, state)
        smb = jnp.where(ok, smb, 0.0)
        acc = acc.at[s].add(smb)
        return (state, acc), (smb if series else None)

    smb_shape = arrays.shape if smb_shape is None else smb_shape
    acc0 = jnp.zeros((2,) + tuple(smb_shape), jnp.float32)
    xs = (arrays.day_index[k], arrays.day_weight[k], valid, season, flag)
    (state, acc), out = jax.lax.scan(jax.checkpoint(body), (state, acc0), xs)
    return state, acc, out


def computed_channels(ti: TIModel, arrays: GlacierArrays, k, swe) -> Float[Array, "3 H W"]:
    """The corrector's three computed channels for year k from the year's initial SWE: the frozen
    TI balance smb0 / 10 and its changes under +0.5 °C and under +5 % precipitation. The three
    runs share one scan (vmapped over the perturbation); gradients are stopped."""
    params = jax.lax.stop_gradient(ti.constrained())
    swe = jax.lax.stop_gradient(swe)
    d_temperature = jnp.array([0.0, 0.5, 0.0], jnp.float32)
    p_factor = jnp.array([1.0, 1.0, 1.05], jnp.float32)

    def step(swe3, temperature, precipitation, weight, _):
        def one(s, dt, pf):
            return ti_day_step(params, s, temperature + dt, precipitation * pf, weight)
        return jax.vmap(one)(swe3, d_temperature, p_factor)

    swe3 = jnp.broadcast_to(swe, (3,) + swe.shape)
    no_flag = jnp.zeros_like(arrays.day_valid[k])
    _, acc, _ = _scan_block(step, swe3, arrays, k, arrays.day_valid[k], no_flag, False, swe3.shape)
    smb = acc[0] + acc[1]  # winter + summer, as the published code adds the two runs
    smb0 = smb[0]
    return jax.lax.stop_gradient(jnp.stack([smb0 / 10.0, smb[1] - smb0, smb[2] - smb0]))


def corrections_for_year(model: GlaUnTI, arrays: GlacierArrays, k, swe) -> Float[Array, "5 H W"]:
    """d1..d5 of year k given the SWE the corrector's computed channels start from."""
    channels = computed_channels(model.ti, arrays, k, swe)
    inputs = jnp.concatenate([channels, arrays.fields[k]], axis=0)
    return model.corrector(inputs, arrays.climate_monthly[k], arrays.n_months[k])


def year_step(model, arrays: GlacierArrays, k, state, series: bool = False, spinup: bool = False):
    """Run balance year k (traced index) from ``state``.

    ``spinup`` (static) marks a spin-up year, in which C/D recompute the summer's corrections
    from the post-winter SWE (MODEL.md §9.1); in an annual-only year this is the same as one run.

    Returns (state, (2, H, W) per-period SMB sums, (5, H, W) corrections or None,
    (L, H, W) daily series or None).
    """
    valid = arrays.day_valid[k]
    if isinstance(model, GRUModel):
        # Continuation rule: the first day of a period continued from a previous state does not
        # update it; only the very first period of the run starts from the learned state.
        skip = arrays.day_period_start[k] & ((k > 0) | (arrays.day_season[k] == 1))

        def step(h, temperature, precipitation, weight, skip_day):
            x = gru_inputs(temperature, precipitation).reshape(-1, 2)
            h, smb = gru_day_step(model, h, x, weight, skip_day)
            return h, smb.reshape(temperature.shape)

        state, acc, out = _scan_block(step, state, arrays, k, valid, skip, series)
        return state, acc, None, out

    no_flag = jnp.zeros_like(valid)
    if isinstance(model, TIModel):
        params = model.constrained()
        day = _ti_step()
        step = lambda s, t, p, w, _: day(params, s, t, p, w, None)  # noqa: E731
        state, acc, out = _scan_block(step, state, arrays, k, valid, no_flag, series)
        return state, acc, None, out

    base = jax.lax.stop_gradient(model.ti).constrained()  # C/D's TI parameters are frozen

    def run(corrections, swe, days):
        params, shift = apply_corrections(base, corrections)
        day = _ti_step()
        step = lambda s, t, p, w, _: day(params, s, t, p, w, shift)  # noqa: E731
        return _scan_block(step, swe, arrays, k, days, no_flag, series)

    if not spinup:
        corrections = corrections_for_year(model, arrays, k, state)
        state, acc, out = run(corrections, state, valid)
        return state, acc, corrections, out
    # Winter then summer, each with corrections from its own initial SWE: one scan over the two
    # halves, so that the corrector appears once in this graph (compile time), not twice.
    season = arrays.day_season[k]

    def half(swe, s):
        def compute(swe):
            corrections = corrections_for_year(model, arrays, k, swe)
            swe, acc, out = run(corrections, swe, valid & (season == s))
            return swe, (acc, corrections, out)

        # An annual-only year has no summer half: skip its (unused) corrections and empty run.
        return jax.lax.cond((s == 0) | arrays.seasonal[k], compute,
                            lambda swe: (swe, _zeros_like_out(compute, swe)), swe)

    swe, (accs, corrections, outs) = jax.lax.scan(half, state, jnp.arange(2))
    out = None if outs is None else outs[0] + outs[1]
    return swe, accs[0] + accs[1], corrections[0], out


# Memory guard: a glacier in the "cells" layout with more cells than this is run in chunks of
# cells (``lax.map``, each chunk rematerialised), so that device memory is bounded by the chunk,
# not by the grid. Exact: A and B are cell-independent. GLAUNTI_MAX_CHUNK_CELLS overrides it.
MAX_CHUNK_CELLS = int(os.environ.get("GLAUNTI_MAX_CHUNK_CELLS", 32768))
_CELL_FIELDS = ("climate_cell", "lapse_offset", "outlines", "fields")


def _chunked_run(model, arrays: GlacierArrays, state, max_cells: int) -> GlacierRun:
    """:func:`run_glacier` of a (1, N) "cells" glacier of A or B, ``max_cells`` cells at a time."""
    n = arrays.shape[1]
    n_chunks = -(-n // max_cells)
    size = -(-n // n_chunks)
    total = n_chunks * size

    def split(a, axis, fill=0):  # (..., N) along ``axis`` -> (n_chunks, ..., size)
        pad = [(0, 0)] * a.ndim
        pad[axis] = (0, total - n)
        a = jnp.pad(a, pad, constant_values=fill)
        a = a.reshape(a.shape[:axis] + (n_chunks, size) + a.shape[axis + 1:])
        return jnp.moveaxis(a, axis, 0)

    cells = {name: split(getattr(arrays, name), getattr(arrays, name).ndim - 1) for name in _CELL_FIELDS}
    gru = isinstance(model, GRUModel)
    if state is None:
        states = None
    else:
        states = split(state, 0) if gru else split(state, 1)

    @jax.checkpoint
    def one(x):
        part_cells, part_state = x
        part = eqx.tree_at(lambda a: [getattr(a, f) for f in _CELL_FIELDS], arrays,
                           [part_cells[f] for f in _CELL_FIELDS])
        run = run_glacier(model, part, part_state, max_chunk_cells=None)
        return run.season_smb, run.state

    smb, final = jax.lax.map(one, (cells, states))  # (n_chunks, Y, 2, 1, size), states
    smb = jnp.moveaxis(smb, 0, -2)
    smb = smb.reshape(smb.shape[:-2] + (total,))[..., :n]
    if gru:
        final = final.reshape((total,) + final.shape[2:])[:n]
    else:
        final = jnp.moveaxis(final, 0, -2)
        final = final.reshape(final.shape[:-2] + (total,))[..., :n]
    return GlacierRun(smb, None, final)


def run_glacier(model, arrays: GlacierArrays, state=None, max_chunk_cells: int | None = -1) -> GlacierRun:
    """Every balance year of the glacier, spin-up then study years, from the cold start (or
    ``state``): one scan over the spin-up years and one over the study years. Years without a
    valid day (padding of the training layouts) are skipped by ``lax.cond``: state unchanged,
    zero SMB and corrections.

    A/B glaciers in the "cells" layout larger than ``max_chunk_cells`` (default
    :data:`MAX_CHUNK_CELLS`; None: never) are run in chunks of cells to bound memory."""
    limit = MAX_CHUNK_CELLS if max_chunk_cells == -1 else max_chunk_cells
    if (limit and isinstance(model, (TIModel, GRUModel)) and arrays.shape[0] == 1
            and arrays.shape[1] > limit):
        return _chunked_run(model, arrays, state, limit)
    if state is None:
        state = initial_state(model, arrays)
    has_days = jnp.any(arrays.day_valid, axis=1)

    def scan_years(state, years, spinup):
        # Remat per year: the backward pass keeps one state per year and recomputes its days.
        @jax.checkpoint
        def body(state, k):
            def run(state):
                state, acc, corrections, _ = year_step(model, arrays, k, state, spinup=spinup)
                return state, (acc, corrections)

            def skip(state):
                return state, _zeros_like_out(run, state)

            return jax.lax.cond(has_days[k], run, skip, state)

        return jax.lax.scan(body, state, years)

    years = jnp.arange(arrays.n_years)
    state, (spin_smb, spin_corr) = scan_years(state, years[: arrays.n_spinup], True)
    state, (study_smb, study_corr) = scan_years(state, years[arrays.n_spinup:], False)
    season_smb = jnp.concatenate([spin_smb, study_smb])
    corrections = None if study_corr is None else jnp.concatenate([spin_corr, study_corr])
    return GlacierRun(season_smb, corrections, state)


def _zeros_like_out(run, state):
    out = jax.eval_shape(run, state)[1]
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), out)
