"""`GlacierTensors`, the prepared arrays of one glacier, and the pure functions that build them.

Nothing here touches files: `dataloader.reader` reads and validates the files and calls these
functions; `dataloader.cache` stores and reloads the result. Shapes use Y balance years,
D climate days, C distinct climate columns, L day-block length, N stakes, H × W grid cells
(docs/architecture.md).
"""

from __future__ import annotations

import dataclasses

import numpy as np

import constants

# A balance-year window spans 12-14 calendar months (partial months at both ends count).
MAX_MONTHS = 14

# Day blocks are at least this long and a multiple of BLOCK_MULTIPLE, so that every glacier of a
# dataset usually shares one block length (one compiled function per grid shape).
MIN_BLOCK_LENGTH = 384
BLOCK_MULTIPLE = 8

# Fields that are plain Python scalars/strings; every other field is a numpy array.
SCALAR_FIELDS = ("name", "wgms_name", "region", "fold", "max_year", "crs_wkt", "first_date")


@dataclasses.dataclass(frozen=True, eq=False)
class GlacierTensors:
    """Everything the models, losses and evaluation need for one glacier (numpy arrays).

    The fields and their shapes are the contract of docs/architecture.md. Arrays are
    read-only (memory-mapped when they come from the cache).
    """

    name: str
    wgms_name: str
    region: str
    fold: int
    max_year: int
    x: np.ndarray  # (W,) float64 cell-centre easting
    y: np.ndarray  # (H,) float64 cell-centre northing, decreasing
    crs_wkt: str
    first_date: np.datetime64  # date of climate day 0, datetime64[D]
    # The daily climate is stored as its C distinct cell series (nearest-neighbour resampled
    # reanalysis is constant over blocks of cells): the (D, H, W) field of a variable is
    # `variable[:, climate_cell]`, bit for bit; `climate_fields` expands a day range.
    temperature_2m: np.ndarray  # (D, C) float32 at orography height
    precipitation: np.ndarray  # (D, C) float32 m w.e. per day
    climate_cell: np.ndarray  # (H, W) int32 column of each cell, shared by both variables
    years: np.ndarray  # (Y,) int32
    study: np.ndarray  # (Y,) bool
    # (Y, H, W) float32; surface T = temperature_2m[d][climate_cell] + lapse_offset[k]
    lapse_offset: np.ndarray
    outlines: np.ndarray  # (Y, H, W) float32 0/1
    elevation: np.ndarray  # (Y, H, W) float32 m
    elevation_std: np.ndarray  # (Y, H, W) float32 m
    facies: np.ndarray  # (Y, 9, H, W) float32
    has_facies: np.ndarray  # (Y,) bool
    climate_monthly: np.ndarray  # (Y, 2, MAX_MONTHS) float32
    n_months: np.ndarray  # (Y,) int32
    seasonal: np.ndarray  # (Y,) bool
    begin_day: np.ndarray  # (Y,) int32
    mid_day: np.ndarray  # (Y,) int32, -1 when not seasonal
    end_day: np.ndarray  # (Y,) int32
    day_index: np.ndarray  # (Y, L) int32
    day_weight: np.ndarray  # (Y, L) float32
    day_valid: np.ndarray  # (Y, L) bool
    day_season: np.ndarray  # (Y, L) int8
    day_period_start: np.ndarray  # (Y, L) bool
    glacier_wide: np.ndarray  # (Y, 3) float32 annual, winter, summer
    stake_year: np.ndarray  # (N,) int32
    stake_code: np.ndarray  # (N,) int8
    stake_row: np.ndarray  # (N,) int32
    stake_col: np.ndarray  # (N,) int32
    stake_balance: np.ndarray  # (N,) float32
    stake_begin_day: np.ndarray  # (N,) int32
    stake_end_day: np.ndarray  # (N,) int32
    stake_weight: np.ndarray  # (N,) float32
    stake_id: np.ndarray  # (N,) str

    def __post_init__(self):
        # The tensors are shared (cache, prefetch thread); nobody may change them in place.
        for name in array_fields():
            getattr(self, name).flags.writeable = False

    @property
    def block_length(self) -> int:
        """L, the number of days in every year's block (valid days + padding)."""
        return self.day_index.shape[1]

    @property
    def n_days(self) -> int:
        """D, the number of climate days."""
        return self.temperature_2m.shape[0]

    def climate_fields(self, first_day: int, last_day: int) -> tuple[np.ndarray, np.ndarray]:
        """Temperature_2m and precipitation of days first_day … last_day (inclusive) on the grid.

        For plotting and notebooks; the models gather single days themselves.

        Returns:
            two new (n, H, W) float32 arrays, n = last_day − first_day + 1.
        """
        if not 0 <= first_day <= last_day < self.n_days:
            raise IndexError(f"day range {first_day} … {last_day} is outside 0 … {self.n_days - 1}")
        days = slice(first_day, last_day + 1)
        return (expand_climate(self.temperature_2m[days], self.climate_cell),
                expand_climate(self.precipitation[days], self.climate_cell))

    def dates(self, k: int) -> np.ndarray:
        """(L,) datetime64[D]: the date of each block day of year index k, NaT in padding."""
        dates = self.first_date + self.day_index[k].astype("timedelta64[D]")
        return np.where(self.day_valid[k], dates, np.datetime64("NaT", "D"))


def expand_climate(columns: np.ndarray, climate_cell: np.ndarray) -> np.ndarray:
    """(n, C) climate columns → (n, H, W) C-contiguous field (a new array)."""
    return np.take(np.asarray(columns), climate_cell, axis=1)


def array_fields() -> tuple[str, ...]:
    """Names of the GlacierTensors fields that hold numpy arrays."""
    return tuple(f.name for f in dataclasses.fields(GlacierTensors) if f.name not in SCALAR_FIELDS)


def block_length(begin_day: np.ndarray, mid_day: np.ndarray, end_day: np.ndarray) -> int:
    """L = max(MIN_BLOCK_LENGTH, longest block rounded up to a multiple of BLOCK_MULTIPLE).

    A seasonal block holds end − begin + 2 days (the midseason day twice), an annual one
    end − begin + 1.
    """
    lengths = end_day - begin_day + 1 + (mid_day >= 0)
    longest = int(lengths.max())
    return max(MIN_BLOCK_LENGTH, -(-longest // BLOCK_MULTIPLE) * BLOCK_MULTIPLE)


def day_blocks(
    begin_day: np.ndarray, mid_day: np.ndarray, end_day: np.ndarray, length: int
) -> dict[str, np.ndarray]:
    """Lay out each balance year as one block of `length` days.

    A seasonal year (mid_day ≥ 0) is the winter period [begin, mid] followed by the summer
    period [mid, end]; an annual year is [begin, end]. Inside a period the first and last day
    weigh ½ (periods are cut at inclusive dates, so the boundary day is shared), the others 1;
    padding weighs 0.

    Args:
        begin_day, mid_day, end_day: (Y,) climate-day indices, mid_day = -1 if not seasonal.
        length: L, at least `block_length(...)`.

    Returns:
        day_index (Y, L) int32, day_weight (Y, L) float32, day_valid (Y, L) bool,
        day_season (Y, L) int8 (0 winter/annual, 1 summer), day_period_start (Y, L) bool.
    """
    n_years = len(begin_day)
    out = {
        "day_index": np.zeros((n_years, length), np.int32),
        "day_weight": np.zeros((n_years, length), np.float32),
        "day_valid": np.zeros((n_years, length), bool),
        "day_season": np.zeros((n_years, length), np.int8),
        "day_period_start": np.zeros((n_years, length), bool),
    }
    for k in range(n_years):
        if mid_day[k] >= 0:
            periods = [(begin_day[k], mid_day[k]), (mid_day[k], end_day[k])]
        else:
            periods = [(begin_day[k], end_day[k])]
        start = 0
        for season, (first, last) in enumerate(periods):
            n = last - first + 1
            block = slice(start, start + n)
            out["day_index"][k, block] = np.arange(first, last + 1)
            out["day_weight"][k, block] = 1.0
            out["day_weight"][k, start] = 0.5
            out["day_weight"][k, start + n - 1] = 0.5
            out["day_valid"][k, block] = True
            out["day_season"][k, block] = season
            out["day_period_start"][k, start] = True
            start += n
    return out


def stake_date_weight(delta_begin: np.ndarray, delta_end: np.ndarray) -> np.ndarray:
    """(N,) float32 calibration weight exp(−(Δbegin/τ)²)·exp(−(Δend/τ)²), Δ in whole days."""
    tau = constants.stake_date_tau
    w = np.exp(-((delta_begin / tau) ** 2)) * np.exp(-((delta_end / tau) ** 2))
    return w.astype(np.float32)


def monthly_climate(
    temperature_2m: np.ndarray,
    precipitation: np.ndarray,
    climate_cell: np.ndarray,
    lapse_offset: np.ndarray,
    outlines: np.ndarray,
    first_date: np.datetime64,
    begin_day: int,
    end_day: int,
    t_norm: float,
    p_norm: float,
) -> np.ndarray:
    """Normalised monthly glacier-mean surface temperature and precipitation of one year.

    The inclusive window [begin_day, end_day] is cut into calendar months (the partial first
    and last months average only the days present), each month's daily surface temperature
    (temperature_2m + lapse_offset) and precipitation are averaged per cell, then averaged over
    the glacier with the outlines as weights and divided by t_norm and p_norm. float32
    throughout, in the order a plain numpy/xarray implementation computes it: each month's
    columns are expanded to the (days, H, W) field first, so the sums run exactly as on the
    full grid.

    Args:
        temperature_2m, precipitation: (D, C) float32 climate columns of the whole series.
        climate_cell: (H, W) column of each cell.
        lapse_offset, outlines: (H, W) float32 of the year.
        first_date: date of day 0.

    Returns:
        (2, n_months) float32, temperature row first.
    """
    months = (first_date + np.arange(begin_day, end_day + 1)).astype("datetime64[M]")
    starts = begin_day + np.flatnonzero(np.r_[True, months[1:] != months[:-1]])
    stops = np.r_[starts[1:], end_day + 1]
    weight_sum = outlines.sum()
    result = np.empty((2, len(starts)), np.float32)
    for m, (a, b) in enumerate(zip(starts, stops)):
        t_cells = (expand_climate(temperature_2m[a:b], climate_cell) + lapse_offset).mean(axis=0)
        p_cells = expand_climate(precipitation[a:b], climate_cell).mean(axis=0)
        result[0, m] = (t_cells * outlines).sum() / weight_sum / np.float32(t_norm)
        result[1, m] = (p_cells * outlines).sum() / weight_sum / np.float32(p_norm)
    return result
