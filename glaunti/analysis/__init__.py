"""Differentiable analyses of a whole-glacier run: inverse modelling, attribution, forcing uncertainty.

Three questions a glaciologist asks of a calibrated model, each answered by differentiating the
whole-glacier engine (:mod:`glaunti.glacier`) with respect to its daily climate forcing, one
module each:

1. **Inverse modelling** (:mod:`.inverse`) — :func:`effective_forcing_offset`: which uniform
   temperature offset, applied from a given balance year on, brings the mean glacier-wide annual
   balance of a window of years to zero (the temperature change the glacier is out of balance with)?
2. **Attribution (XAI)** (:mod:`.attribution`) — :func:`integrated_gradients`: which days and
   months of the climate made year k's balance differ from that under a climatological year, and
   by how much each?
3. **Aleatoric uncertainty** (:mod:`.uncertainty`) — :func:`forcing_uncertainty_jvp` and
   :func:`forcing_uncertainty_mc`: how uncertain is the cumulative glacier-wide SMB, day by day,
   given weekly errors of the reanalysis temperature (additive) and precipitation (multiplicative)?

What they share (:mod:`.common`): periods, climate perturbations and the year walk.

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

from glaunti.analysis.attribution import Attribution, climatological_baseline, integrated_gradients
from glaunti.analysis.common import (
    Period,
    along_days,
    annual_balances,
    climate_window,
    dates_period,
    glacier_mean_climate,
    masked_mean,
    monthly,
    perturb_climate,
    run_years,
    state_at,
    with_climate,
    year_index,
    year_span,
    years_period,
)
from glaunti.analysis.inverse import (
    DailySeries,
    OffsetResult,
    cumulative_smb_maps,
    daily_series,
    effective_forcing_offset,
)
from glaunti.analysis.uncertainty import (
    BLOCK_DAYS,
    SIGMA_LOG_PRECIPITATION,
    SIGMA_TEMPERATURE,
    Uncertainty,
    forcing_uncertainty_jvp,
    forcing_uncertainty_mc,
    propagate_variance,
)

__all__ = [
    "BLOCK_DAYS",
    "SIGMA_LOG_PRECIPITATION",
    "SIGMA_TEMPERATURE",
    "Attribution",
    "DailySeries",
    "OffsetResult",
    "Period",
    "Uncertainty",
    "along_days",
    "annual_balances",
    "climate_window",
    "climatological_baseline",
    "cumulative_smb_maps",
    "daily_series",
    "dates_period",
    "effective_forcing_offset",
    "forcing_uncertainty_jvp",
    "forcing_uncertainty_mc",
    "glacier_mean_climate",
    "integrated_gradients",
    "masked_mean",
    "monthly",
    "perturb_climate",
    "propagate_variance",
    "run_years",
    "state_at",
    "with_climate",
    "year_index",
    "year_span",
    "years_period",
]
