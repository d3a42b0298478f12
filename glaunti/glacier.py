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
from glaunti.gru_model import GRUModel, gru_cells_step, gru_inputs
from glaunti.ti_corr_model import GlaUnTI
from glaunti.ti_model import TIModel, apply_corrections, ti_day_step


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


def make_arrays(tensors, facies: bool = False) -> GlacierArrays:
    """``GlacierTensors`` → ``GlacierArrays``. ``facies`` selects model D's inputs (the facies maps
    where they exist); otherwise the nine facies bands hold the −1 placeholder (model C)."""
    n = max(STAKE_PADDING, -(-len(tensors.stake_balance) // STAKE_PADDING) * STAKE_PADDING)
    f32 = lambda a: jnp.asarray(np.asarray(a, dtype=np.float32))  # noqa: E731
    i32 = lambda a: jnp.asarray(np.asarray(a, dtype=np.int32))  # noqa: E731
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
    return GlacierArrays(
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
        day_valid=jnp.asarray(np.asarray(tensors.day_valid, dtype=bool)),
        day_season=i32(tensors.day_season),
        day_period_start=jnp.asarray(np.asarray(tensors.day_period_start, dtype=bool)),
        seasonal=jnp.asarray(np.asarray(tensors.seasonal, dtype=bool)),
        study=jnp.asarray(np.asarray(tensors.study, dtype=bool)),
        glacier_wide=f32(tensors.glacier_wide),
        stake_year=i32(_pad(tensors.stake_year, n, 0)),
        stake_code=i32(_pad(tensors.stake_code, n, INDEX_CODE)),
        stake_row=i32(_pad(tensors.stake_row, n, 0)),
        stake_col=i32(_pad(tensors.stake_col, n, 0)),
        stake_balance=f32(_pad(tensors.stake_balance, n, 0.0)),
        stake_weight=f32(_pad(tensors.stake_weight, n, 0.0)),
        n_spinup=int(np.sum(np.asarray(tensors.years) < constants.study_period_start_year)),
    )


def gru_day_step(model: GRUModel, h, x, weight, skip):
    """One GRU day for all cells: h (N, 16), x (N, 2) → (h, smb (N,))."""
    h = jnp.where(skip, h, gru_cells_step(model.rnn, x, h))
    return h, weight * (h @ model.out.weight.T + model.out.bias)[:, 0]


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
        step = lambda s, t, p, w, _: ti_day_step(params, s, t, p, w)  # noqa: E731
        state, acc, out = _scan_block(step, state, arrays, k, valid, no_flag, series)
        return state, acc, None, out

    base = jax.lax.stop_gradient(model.ti).constrained()  # C/D's TI parameters are frozen

    def run(corrections, swe, days):
        params, shift = apply_corrections(base, corrections)
        step = lambda s, t, p, w, _: ti_day_step(params, s, t, p, w, shift)  # noqa: E731
        return _scan_block(step, swe, arrays, k, days, no_flag, series)

    corrections = corrections_for_year(model, arrays, k, state)
    if not spinup:
        state, acc, out = run(corrections, state, valid)
        return state, acc, corrections, out
    season = arrays.day_season[k]
    swe, acc_w, out_w = run(corrections, state, valid & (season == 0))
    summer = corrections_for_year(model, arrays, k, swe)
    swe, acc_s, out_s = run(summer, swe, valid & (season == 1))
    out = None if out_w is None else out_w + out_s
    return swe, acc_w + acc_s, corrections, out


def run_glacier(model, arrays: GlacierArrays, state=None) -> GlacierRun:
    """Every balance year of the glacier, spin-up then study years, from the cold start (or
    ``state``): one scan over the spin-up years and one over the study years."""
    if state is None:
        state = initial_state(model, arrays)

    def scan_years(state, years, spinup):
        # Remat per year: the backward pass keeps one state per year and recomputes its days.
        @jax.checkpoint
        def body(state, k):
            state, acc, corrections, _ = year_step(model, arrays, k, state, spinup=spinup)
            return state, (acc, corrections)

        return jax.lax.scan(body, state, years)

    years = jnp.arange(arrays.n_years)
    state, (spin_smb, spin_corr) = scan_years(state, years[: arrays.n_spinup], True)
    state, (study_smb, study_corr) = scan_years(state, years[arrays.n_spinup:], False)
    season_smb = jnp.concatenate([spin_smb, study_smb])
    corrections = None if study_corr is None else jnp.concatenate([spin_corr, study_corr])
    return GlacierRun(season_smb, corrections, state)
