"""GlaUnTI's SMB fields reduced to SMB–elevation relations, and the OGGM mass-balance model
that answers from them (docs/evolution.md).

Reduction, per balance year and per month of it: the glacier's cells (weight = outline
fraction, the evaluation's glacier-wide weights) are grouped in elevation bands of
``band_m`` (50 m); each band gives its weighted mean SMB at its weighted mean elevation, and
the relation is linear between those points. Below the lowest and above the highest band
centre it continues with the weighted least-squares gradient of the cells within ``fit_m``
(200 m) of the glacier's lowest or highest cell. Every step is linear in the SMB, so the
annual relation is exactly the sum of the twelve monthly ones.

OGGM's float years: OGGM year ``Y`` (``Y <= t < Y + 1``) is GlaUnTI's balance year ``Y``
(for the northern hemisphere 1 October Y−1 to 30 September Y); month ``t = Y + i/12`` is month
``i`` of that balance year (i = 0: October). This is OGGM's own hydrological-year convention of
versions before 1.6; OGGM 1.6's own models run calendar years, a quarter year later.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BAND_M = 50.0
FIT_M = 200.0
SECONDS_IN_YEAR = 365 * 24 * 3600  # OGGM's cfg.SEC_IN_YEAR
SECONDS_IN_MONTH = SECONDS_IN_YEAR / 12  # OGGM's cfg.SEC_IN_MONTH (2 628 000 s)
WATER_DENSITY = 1000.0  # kg m-3: 1 m w.e. = 1000 kg m-2


@dataclass(frozen=True)
class SMBElevation:
    """Piecewise-linear SMB–elevation relations, one per month of each balance year.

    years: (Y,) int balance years; centres: (Y, B) m, band elevations, NaN-padded;
    monthly: (Y, 12, B) m w.e. in the month at each centre; slope_low/slope_high: (Y, 12)
    m w.e. per m of elevation, below the lowest and above the highest centre;
    glacier_wide: (Y,) m w.e., the grid's weighted annual balance (the reference the relation
    is checked against); z_range: (Y, 2) m, lowest and highest glacier cell."""

    years: np.ndarray
    centres: np.ndarray
    monthly: np.ndarray
    slope_low: np.ndarray
    slope_high: np.ndarray
    glacier_wide: np.ndarray
    z_range: np.ndarray

    def index(self, year: int) -> int:
        k = np.flatnonzero(self.years == year)
        if k.size == 0:
            raise ValueError(f"balance year {year} is outside the GlaUnTI SMB ({self.years[0]}–{self.years[-1]})")
        return int(k[0])

    def evaluate(self, heights, k: int, months=slice(None)) -> np.ndarray:
        """SMB (m w.e.) at ``heights`` (m) summed over ``months`` of year index k."""
        heights = np.asarray(heights, dtype=np.float64)
        valid = np.isfinite(self.centres[k])
        centres = self.centres[k][valid]
        values = np.atleast_2d(self.monthly[k, months][..., valid]).sum(axis=0)
        low = np.atleast_1d(self.slope_low[k, months]).sum()
        high = np.atleast_1d(self.slope_high[k, months]).sum()
        out = np.interp(heights, centres, values)
        out = np.where(heights < centres[0], values[0] + low * (heights - centres[0]), out)
        return np.where(heights > centres[-1], values[-1] + high * (heights - centres[-1]), out)


def _weighted_slope(z: np.ndarray, w: np.ndarray, smb: np.ndarray) -> np.ndarray:
    """Weighted least-squares slope of smb (M, n) on z (n,) for each of the M rows."""
    zc = z - np.average(z, weights=w)
    denominator = np.sum(w * zc * zc)
    if denominator <= 0:
        return np.zeros(smb.shape[0])
    return (smb * (w * zc)).sum(axis=1) / denominator


def reduce_fields(years, monthly_fields, weights, elevation, band_m: float = BAND_M,
                  fit_m: float = FIT_M) -> SMBElevation:
    """The relations of each balance year from its monthly SMB fields.

    Args:
        years: (Y,) balance years.
        monthly_fields: (Y, 12, H, W) SMB summed over each month of the balance year, m w.e.
        weights: (Y, H, W) glacier fraction of each cell (0 off the glacier).
        elevation: (Y, H, W) surface elevation, m.
    """
    years = np.asarray(years, dtype=int)
    n_years = len(years)
    per_year = []
    for k in range(n_years):
        on = (weights[k] > 0) & np.isfinite(elevation[k])
        if not on.any():
            raise ValueError(f"balance year {years[k]}: the glacier has no cell (outline fraction > 0)")
        z, w = elevation[k][on].astype(np.float64), weights[k][on].astype(np.float64)
        smb = monthly_fields[k][:, on].astype(np.float64)  # (12, n)
        band = np.floor((z - z.min()) / band_m).astype(int)
        centres, values = [], []
        for b in np.unique(band):
            sel = band == b
            centres.append(np.average(z[sel], weights=w[sel]))
            values.append((smb[:, sel] * w[sel]).sum(axis=1) / w[sel].sum())
        low_cells = z <= z.min() + fit_m
        high_cells = z >= z.max() - fit_m
        per_year.append((np.array(centres), np.array(values).T,
                         _weighted_slope(z[low_cells], w[low_cells], smb[:, low_cells]),
                         _weighted_slope(z[high_cells], w[high_cells], smb[:, high_cells]),
                         float((smb.sum(axis=0) * w).sum() / w.sum()), (float(z.min()), float(z.max()))))
    n_bands = max(len(p[0]) for p in per_year)
    centres = np.full((n_years, n_bands), np.nan)
    monthly = np.full((n_years, 12, n_bands), np.nan)
    for k, (c, v, *_rest) in enumerate(per_year):
        centres[k, :len(c)] = c
        monthly[k, :, :len(c)] = v
    return SMBElevation(years=years, centres=centres, monthly=monthly,
                        slope_low=np.array([p[2] for p in per_year]),
                        slope_high=np.array([p[3] for p in per_year]),
                        glacier_wide=np.array([p[4] for p in per_year]),
                        z_range=np.array([p[5] for p in per_year]))


def monthly_sums(daily, dates, begins, ends) -> np.ndarray:
    """(Y, 12, H, W) m w.e.: the daily SMB (T, H, W) m w.e. per day on ``dates`` (T,)
    datetime64[D] summed over each month of each balance year [begins[k], ends[k]]
    (inclusive). Month i of a year counts from the calendar month of its first day; days of a
    longer year's 13th month go to its last month."""
    dates = np.asarray(dates).astype("datetime64[D]")
    out = np.zeros((len(begins), 12) + daily.shape[1:], dtype=np.float64)
    month_number = dates.astype("datetime64[M]").astype(int)
    for k, (begin, end) in enumerate(zip(begins, ends)):
        inside = (dates >= begin) & (dates <= end)
        if not inside.any():
            raise ValueError(f"balance year from {begin} to {end}: no day of it in the daily SMB "
                             f"({dates[0]} … {dates[-1]})")
        first = np.datetime64(begin, "M").astype(int)
        month = np.clip(month_number[inside] - first, 0, 11)
        np.add.at(out[k], month, daily[inside])
    return out


def mass_balance_model_class():
    """The OGGM MassBalanceModel subclass (defined on first use: OGGM is an optional extra)."""
    global GlaUntiMassBalance
    if "GlaUntiMassBalance" in globals():
        return GlaUntiMassBalance
    from oggm import cfg, utils
    from oggm.core.massbalance import MassBalanceModel

    class GlaUntiMassBalance(MassBalanceModel):
        """OGGM mass balance from GlaUnTI's SMB–elevation relations (:class:`SMBElevation`).

        Units as OGGM: m of ice per second at OGGM's ice density (``rho`` and ``ice_density``,
        OGGM 1.6 and 1.7 names); ``bias`` in mm w.e. a⁻¹ is subtracted, as OGGM's own models
        do. Year ``Y`` (float, OGGM convention) is balance year ``floor(Y)``; its month
        ``round(12 (Y − floor Y))`` is that month of the balance year (module docstring)."""

        def __init__(self, relation: SMBElevation, hemisphere: str = "nh", bias: float = 0.0):
            super().__init__()
            self.relation = relation
            self.hemisphere = hemisphere
            self.bias = float(bias)
            self.rho = cfg.PARAMS["ice_density"]
            self.ice_density = self.rho
            low, high = float(np.min(relation.z_range[:, 0])), float(np.max(relation.z_range[:, 1]))
            # Wide enough for OGGM's ELA search on a glacier that thins or advances.
            self.valid_bounds = [low - 1000.0, high + 1000.0]
            self.ys, self.ye = int(relation.years[0]), int(relation.years[-1])

        def is_year_valid(self, year) -> bool:
            return self.ys <= int(np.floor(year)) <= self.ye

        def _to_ice_rate(self, mwe, bias_mm, seconds):
            return (mwe * WATER_DENSITY - bias_mm) / self.rho / seconds

        def get_annual_mb(self, heights, year=None, fl_id=None, fls=None):
            k = self.relation.index(int(np.floor(year)))
            return self._to_ice_rate(self.relation.evaluate(heights, k), self.bias, cfg.SEC_IN_YEAR)

        def get_monthly_mb(self, heights, year=None, fl_id=None, fls=None):
            y, m = utils.floatyear_to_date(year)
            k = self.relation.index(int(y))
            return self._to_ice_rate(self.relation.evaluate(heights, k, months=int(m) - 1),
                                     self.bias * cfg.SEC_IN_MONTH / cfg.SEC_IN_YEAR, cfg.SEC_IN_MONTH)

    return GlaUntiMassBalance
