"""The twin's truth: a daily temperature-index process per grid cell.

The equations are those of the TI model (docs/synthetic_twin.md, docs/model.md §2) with every day
weighted 1, driven by the glacier's true local climate (smooth in space, true lapse rate) rather
than by the blocky reanalysis of the files. The parameters vary from cell to cell with things a
corrector can see (elevation, roughness, debris, shading, region) around the published
calibrated values. A global TI model therefore fits on average while a spatially adaptive one
can do better.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataloader.synthetic.climate import BlockClimate
from dataloader.synthetic.geometry import Geometry, smooth_noise
from dataloader.synthetic.regions import TRUE_LAPSE_RATE, Region

# Published calibrated values of the TI model (docs/synthetic_twin.md, "The truth"); the truth is
# centred near them.
PREC_SCALE = 1.38
DDF_SNOW = 0.00496
DDF_RELATIVE_ICE = 1.51
SNOW_RAIN_STEEPNESS = 1.52
SNOW_DEPLETION_STEEPNESS = 2.96
SNOW_DEPLETION_CENTRE = 0.030
T_SHARPNESS = 10.0
SWE_SHARPNESS = 20.0
SWE_FLOOR = np.float32(1e-6)    # see run_truth: keeps the loop free of subnormal floats
EXP_FLOOR = np.float32(-20.0)   # see _softplus

# Spatial sensitivities of the truth parameters.
PREC_PER_METRE = 0.0010        # precipitation factor grows by ~10 % per 100 m of height
AVALANCHE_GAIN = 0.6           # up to 60 % more snow where avalanches from rock walls land
DDF_SNOW_ELEVATION = 0.35      # ddf_snow ~ exp(0.35 * (0.5 - relative elevation))
DDF_SNOW_ROUGHNESS = 0.06
DDF_ICE_ROUGHNESS = 0.10
DEBRIS_MELT_REDUCTION = 0.6    # full debris cover removes 60 % of the ice melt
SHADE_COOLING = 1.2            # degC less melt-effective temperature in full shade


@dataclass(frozen=True)
class TruthParameters:
    """Per-year (Y, H, W) parameter fields plus the regional snow/rain centre."""

    prec_scale: np.ndarray
    ddf_snow: np.ndarray
    ddf_relative_ice: np.ndarray
    temperature_shift: np.ndarray
    snow_rain_centre: float


def truth_parameters(geometry: Geometry, region: Region, rng: np.random.Generator) -> TruthParameters:
    """Per-cell truth parameters of every geometry year (see the module docstring)."""
    glacier = geometry.mask[0]
    mean_elevation = geometry.z[0][glacier].mean()
    # More precipitation higher up the glacier (orographic enhancement the coarse reanalysis
    # misses), relative to the glacier's own mean elevation so that the glacier-wide factor does
    # not hinge on the invisible reanalysis orography; a smooth wind-drift pattern (more
    # snow in hollows and lee sides); and avalanche snow below steep rock walls.
    drift = np.exp(0.08 * smooth_noise(rng, glacier.shape, 2.0))
    prec_scale = (PREC_SCALE * region.prec_factor * drift
                  * np.exp(PREC_PER_METRE * (geometry.z - mean_elevation))
                  * (1 + AVALANCHE_GAIN * geometry.avalanche))
    ddf_snow = DDF_SNOW * np.exp(DDF_SNOW_ELEVATION * (0.5 - geometry.relative_elevation)
                                 + DDF_SNOW_ROUGHNESS * geometry.roughness)
    ddf_relative_ice = (DDF_RELATIVE_ICE * np.exp(DDF_ICE_ROUGHNESS * geometry.roughness)
                        * (1 - DEBRIS_MELT_REDUCTION * geometry.debris))
    # Shaded cells receive less energy: a lower melt-effective temperature.
    temperature_shift = -SHADE_COOLING * geometry.shade
    shape = geometry.z.shape
    as32 = lambda a: np.broadcast_to(a, shape).astype(np.float32)  # noqa: E731
    return TruthParameters(prec_scale=as32(prec_scale), ddf_snow=as32(ddf_snow),
                           ddf_relative_ice=as32(ddf_relative_ice),
                           temperature_shift=as32(temperature_shift),
                           snow_rain_centre=region.snow_rain_centre)


def _softplus(sharpness: float, x: np.ndarray) -> np.ndarray:
    """softplus(s * x) / s in the overflow-free form max(y, 0) + log1p(exp(-|y|)), y = s * x,
    several times faster than np.logaddexp. exp's argument is kept above -20, so that no
    quantity of the truth decays into subnormal floats (~20x slower arithmetic); this changes
    the result by at most exp(-20) / s = 2e-9 / s."""
    y = np.float32(sharpness) * x
    tail = np.log1p(np.exp(np.maximum(-np.abs(y), EXP_FLOOR)))
    return (np.maximum(y, 0) + tail) / np.float32(sharpness)


@dataclass(frozen=True)
class Truth:
    fields: np.ndarray        # (Y, 3, H, W) float32 annual, winter, summer SMB of each balance year
    swe_late_summer: np.ndarray  # (Y, H, W) float32 least SWE from 1 August to the end date
    stake_daily: np.ndarray   # (D, N) float32 daily SMB at the stake cells (internal days)


def run_truth(climate: BlockClimate, z_ref: float, geometry: Geometry, params: TruthParameters,
              windows: np.ndarray, late_summer: np.ndarray, stake_cells: np.ndarray) -> Truth:
    """Run the truth over all internal days, driven by the true local climate: temperature
    ``climate.true_temperature`` at ``z_ref`` brought to each cell with the true lapse rate,
    precipitation ``climate.true_precipitation`` times the cell's precipitation factor.

    ``windows``: (Y, 3) internal day indices of begin, midseason and end of each balance year
    (every year has a midseason day internally, also those published as annual-only);
    ``late_summer``: (Y,) internal day index from which the end-of-summer surface is composited
    (least SWE of each cell until the end date: the surface a late-summer satellite map shows,
    without the early autumn snowfalls that often precede the end date);
    ``stake_cells``: flat cell indices whose daily SMB is kept.

    Only the cells glacierised in the first year are simulated (later outlines are subsets);
    fields are 0 elsewhere. The geometry of balance year k applies from the day after the end of
    year k-1 to the end of year k (the first year's geometry also to the days before it, the last
    one's to the days after it). SWE starts from zero on the first internal day, years before
    the first balance year, so that the firn exists before the models' own spin-up starts.
    """
    n_years = windows.shape[0]
    n_days = climate.true_temperature.size
    height, width = geometry.block_id.shape
    active = np.flatnonzero(geometry.mask[0])
    n_active = active.size
    position = np.full(height * width, -1)
    position[active] = np.arange(n_active)
    stake_position = position[stake_cells]
    if np.any(stake_position < 0):
        raise ValueError("stake cells must lie on the glacier")

    def on_active(field: np.ndarray) -> np.ndarray:
        return field.reshape(field.shape[0], -1)[:, active]

    lapse_offset = on_active(TRUE_LAPSE_RATE * (geometry.z - z_ref))
    prec_scale, ddf_snow = on_active(params.prec_scale), on_active(params.ddf_snow)
    ddf_relative_ice = on_active(params.ddf_relative_ice)
    temperature_shift = on_active(params.temperature_shift)

    ends = windows[:, 2]
    geometry_year = np.minimum(np.searchsorted(ends, np.arange(n_days), side="left"), n_years - 1)
    late_year = np.full(n_days, -1)
    for k in range(n_years):
        late_year[late_summer[k]:ends[k] + 1] = k

    fields = np.zeros((n_years, 3, n_active), dtype=np.float32)
    swe_late_summer = np.full((n_years, n_active), np.inf, dtype=np.float32)
    stake_daily = np.zeros((n_days, stake_cells.size), dtype=np.float32)
    swe = np.zeros(n_active, dtype=np.float32)
    power, cover, snow_melt, scratch = (np.empty(n_active, dtype=np.float32) for _ in range(4))
    steepness = np.float32(SNOW_DEPLETION_STEEPNESS)
    centre_power = np.float32(SNOW_DEPLETION_CENTRE**SNOW_DEPLETION_STEEPNESS)
    swe_sharpness = np.float32(SWE_SHARPNESS)

    # One piece per geometry year; the long stretch before the first year's end is split into
    # pieces of about a year to bound memory.
    first_end = int(np.flatnonzero(geometry_year > 0)[0]) if n_years > 1 else n_days
    changes = set(np.flatnonzero(np.diff(geometry_year)) + 1)
    cuts = sorted(changes | set(range(0, first_end, 366)) | {n_days})
    for d0, d1 in zip(cuts[:-1], cuts[1:]):
        k = geometry_year[d0]
        # (days, cells) arrays, C-ordered: each day's row is contiguous in the loop.
        t = (climate.true_temperature[d0:d1, None] + lapse_offset[k]).astype(np.float32)
        p = climate.true_precipitation[d0:d1, None].astype(np.float32)
        smb = np.empty_like(t)
        with np.errstate(divide="ignore", over="ignore", under="ignore"):
            # solid = P * sigmoid(steepness * (centre - T))
            centre = np.float32(params.snow_rain_centre)
            rain_weight = np.exp(np.float32(SNOW_RAIN_STEEPNESS) * (t - centre))
            accumulation = prec_scale[k] * p / (1 + rain_weight)
            t_plus = _softplus(T_SHARPNESS, t + temperature_shift[k])
            melt_snow = ddf_snow[k] * t_plus
            melt_ice = melt_snow * ddf_relative_ice[k]
            for i in range(d1 - d0):
                # Snow-covered fraction hill(S) = S^s / (S^s + c^s); in-place for speed.
                np.power(swe, steepness, out=power)
                np.divide(power, power + centre_power, out=cover)
                np.multiply(cover, melt_snow[i], out=snow_melt)
                # smb = accumulation - cover * melt_snow - (1 - cover) * melt_ice
                np.multiply(cover, melt_ice[i], out=smb[i])
                smb[i] += accumulation[i] - snow_melt - melt_ice[i]
                # S <- softplus_20(S + accumulation - cover * melt_snow), as in _softplus
                swe += accumulation[i]
                swe -= snow_melt
                swe *= swe_sharpness
                np.abs(swe, out=scratch)
                np.negative(scratch, out=scratch)
                np.maximum(scratch, EXP_FLOOR, out=scratch)
                np.exp(scratch, out=scratch)
                np.log1p(scratch, out=scratch)
                np.maximum(swe, 0, out=swe)
                swe += scratch
                swe /= swe_sharpness
                # Snow-free cells would decay into subnormal floats, which are ~100x slower;
                # a 1e-6 m floor changes the snow cover there by < 1e-13.
                np.maximum(swe, SWE_FLOOR, out=swe)
                composite = late_year[d0 + i]
                if composite >= 0:
                    np.minimum(swe_late_summer[composite], swe, out=swe_late_summer[composite])
        stake_daily[d0:d1] = smb[:, stake_position]
        days = np.arange(d0, d1)
        for j in np.flatnonzero((windows[:, 0] < d1) & (windows[:, 2] >= d0)):
            begin, mid, end = windows[j]
            for w, (a, b) in enumerate(((begin, end), (begin, mid), (mid, end))):
                weight = period_weights(days, a, b)
                if weight.any():
                    fields[j, w] += weight @ smb

    def on_grid(values: np.ndarray) -> np.ndarray:
        grid = np.zeros(values.shape[:-1] + (height * width,), dtype=np.float32)
        grid[..., active] = values
        return grid.reshape(values.shape[:-1] + (height, width))

    return Truth(fields=on_grid(fields), swe_late_summer=on_grid(swe_late_summer),
                 stake_daily=stake_daily)


def period_weights(days: np.ndarray, begin: int, end: int) -> np.ndarray:
    """Weights of ``days`` in the inclusive period [begin, end]: 1 inside, 1/2 on the first and
    last day (a reading taken during the boundary day), 0 outside."""
    weight = ((days >= begin) & (days <= end)).astype(np.float32)
    weight[(days == begin) | (days == end)] *= 0.5
    return weight
