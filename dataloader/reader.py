"""Read and validate one glacier folder (docs/data_format.md) into `GlacierTensors`.

This module opens the files, in an order that reports cheap errors first, and combines what the
concept modules make of them: `dataloader.rasters` (the grid and the yearly and facies rasters),
`dataloader.climate_columns` (the daily climate as distinct cell series), `dataloader.tables`
(total_smb.csv and point_smb.csv) and `dataloader.tensors` (the derived arrays).

Every check raises `DataError` naming the file, the variable/field and what was expected, so
that a bad file fails here with a readable message instead of deep inside a model run.
Where the published implementation silently clamps or crops (stakes outside the grid, grids
that disagree between files, missing or duplicated years), this reader refuses.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import xarray as xr

import constants
from dataloader import tensors as T
from dataloader.climate_columns import Allocator, climate_source, read_climate
from dataloader.errors import DataError
from dataloader.rasters import check_outlines, finite, grid_variable, read_facies, read_grid, read_yearly
from dataloader.tables import Seasons, read_point_smb, read_total_smb

TEMPERATURE = "temperature.nc"
PRECIPITATION = "precipitation.nc"
OROGRAPHY = "orography.nc"
DEM = "dem.nc"
OUTLINES = "outlines.nc"
TOTAL_SMB = "total_smb.csv"
POINT_SMB = "point_smb.csv"
FACIES = "facies.nc"
REQUIRED_FILES = (TEMPERATURE, PRECIPITATION, OROGRAPHY, DEM, OUTLINES, TOTAL_SMB)
OPTIONAL_FILES = (POINT_SMB, FACIES)
# The daily climate: (file, variable in the file, GlacierTensors field).
CLIMATE = (
    (TEMPERATURE, "temperature_2m", "temperature_2m"),
    (PRECIPITATION, "total_precipitation_sum", "precipitation"),
)


@dataclasses.dataclass(frozen=True)
class GlacierInfo:
    """One row of index.csv."""

    name: str
    wgms_name: str
    fold: int
    region: str
    max_year: int
    height: int
    width: int


def source_files(glacier_dir: Path) -> list[Path]:
    """Every file `read_glacier` may read, present or not (an optional file appearing later
    must invalidate a cached glacier too)."""
    return [Path(glacier_dir) / f for f in (*REQUIRED_FILES, *OPTIONAL_FILES)]


def open_netcdf(path: Path) -> xr.Dataset:
    """Open a NetCDF file lazily; the single entry point for NetCDF reads (tests count calls)."""
    if not path.is_file():
        raise DataError(path, None, "is missing (required file)")
    if path.stat().st_size == 0:
        raise DataError(path, None, "is empty (0 bytes), expected a NetCDF-4 file")
    try:
        return xr.open_dataset(path)
    except Exception as error:  # the backends raise many types for unreadable files
        # First line only: some backends explain at length, the message must stay one line.
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if "did not find a match" in reason:  # xarray: no backend recognises the bytes
            reason = "no NetCDF backend recognises its format"
        raise DataError(path, None, f"could not be read as NetCDF ({reason})") from error


def read_glacier(
    glacier_dir: Path,
    info: GlacierInfo,
    normalisation: dict[str, float],
    allocate: Allocator | None = None,
) -> T.GlacierTensors:
    """Read, validate and combine the files of one glacier.

    Args:
        glacier_dir: `<data_folder>/<name>`.
        info: its index.csv row.
        normalisation: the dataset's normalisation factors (uses `t_monthly`, `p_monthly`),
            which equal constants.t_monthly_norm and p_monthly_norm (`dataset.read_normalisation`
            checks the file; the own-glacier path passes layout.NORMALISATION_FACTORS).
        allocate: where the (D, C) climate columns are written (default: in memory).

    Returns:
        The glacier's `GlacierTensors` (docs/architecture.md).
    """
    glacier_dir = Path(glacier_dir)
    if not glacier_dir.is_dir():
        raise DataError(glacier_dir, None, f"is missing: index.csv lists glacier {info.name!r}")
    allocate = allocate or (lambda field, shape, dtype: np.empty(shape, dtype))
    years = np.arange(constants.initialisation_period_start_year, info.max_year + 1, dtype=np.int32)

    # Cheap files first, so that their errors do not wait for gigabytes of climate.
    seasons = read_total_smb(glacier_dir / TOTAL_SMB, years)
    with open_netcdf(glacier_dir / OUTLINES) as ds:
        grid = read_grid(glacier_dir / OUTLINES, ds, info.height, info.width)
        outlines = read_yearly(glacier_dir / OUTLINES, ds, "outlines", years, grid)
    check_outlines(glacier_dir / OUTLINES, outlines, years)
    with open_netcdf(glacier_dir / DEM) as ds:
        elevation = read_yearly(glacier_dir / DEM, ds, "z", years, grid)
        elevation_std = read_yearly(glacier_dir / DEM, ds, "zstddev", years, grid)
    with open_netcdf(glacier_dir / OROGRAPHY) as ds:
        var = grid_variable(glacier_dir / OROGRAPHY, ds, "elevation", ("y", "x"), grid)
        orography = finite(glacier_dir / OROGRAPHY, "elevation", var.values.astype(np.float32))
    facies_path = glacier_dir / FACIES
    with open_netcdf(facies_path) if facies_path.exists() else contextlib.nullcontext() as ds:
        facies, has_facies = read_facies(facies_path, ds, years, grid)
    with contextlib.ExitStack() as files:
        # Each file is checked before the next is opened, so errors come in file order.
        sources = []
        for file_name, variable, field in CLIMATE:
            ds = files.enter_context(open_netcdf(glacier_dir / file_name))
            sources.append(climate_source(glacier_dir / file_name, ds, variable, field, grid))
        first_date, temperature_2m, precipitation, climate_cell = read_climate(sources, grid, allocate)
    begin_day, mid_day, end_day = _season_days(
        glacier_dir / TOTAL_SMB, seasons, first_date, temperature_2m.shape[0]
    )
    stakes = read_point_smb(glacier_dir / POINT_SMB, seasons, grid, first_date)

    # Lapse-rate downscaling with the DEM of the balance year (docs/model.md §5).
    lapse_offset = constants.lapse_rate * (elevation - orography)

    climate_monthly = np.zeros((len(years), 2, T.MAX_MONTHS), np.float32)
    n_months = np.zeros(len(years), np.int32)
    for k, year in enumerate(years):
        monthly = T.monthly_climate(
            temperature_2m, precipitation, climate_cell, lapse_offset[k], outlines[k], first_date,
            begin_day[k], end_day[k], normalisation["t_monthly"], normalisation["p_monthly"],
        )
        if monthly.shape[1] > T.MAX_MONTHS:
            raise DataError(
                glacier_dir / TOTAL_SMB, f"year {year}",
                f"spans {monthly.shape[1]} calendar months, expected at most {T.MAX_MONTHS}",
            )
        climate_monthly[k, :, : monthly.shape[1]] = monthly
        n_months[k] = monthly.shape[1]

    blocks = T.day_blocks(begin_day, mid_day, end_day, T.block_length(begin_day, mid_day, end_day))
    seasonal = mid_day >= 0
    glacier_wide = seasons.balances.copy()
    # Winter/summer values of annual-only years are meaningless (docs/data_format.md §7.1).
    glacier_wide[~seasonal, 1:] = np.nan

    return T.GlacierTensors(
        # identity, grid and calendar
        name=info.name, wgms_name=info.wgms_name, region=info.region, fold=info.fold, max_year=info.max_year,
        x=grid.x, y=grid.y, crs_wkt=grid.crs_wkt, first_date=first_date,
        # climate
        temperature_2m=temperature_2m, precipitation=precipitation, climate_cell=climate_cell,
        climate_monthly=climate_monthly, n_months=n_months, lapse_offset=lapse_offset,
        # years and their geometry
        years=years, study=years >= constants.study_period_start_year, outlines=outlines,
        elevation=elevation, elevation_std=elevation_std, facies=facies, has_facies=has_facies,
        # periods and observations
        seasonal=seasonal, begin_day=begin_day, mid_day=mid_day, end_day=end_day, **blocks,
        glacier_wide=glacier_wide, **stakes,
    )


def _season_days(
    path: Path, seasons: Seasons, first_date: np.datetime64, n_days: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Y,) int32 climate-day indices of begin, midseason (-1 if none) and end, each year
    checked to lie within the climate series of `n_days` days from `first_date`."""
    begin = (seasons.begin - first_date).astype(np.int64)
    end = (seasons.end - first_date).astype(np.int64)
    mid = np.where(np.isnat(seasons.mid), -1, (seasons.mid - first_date).astype(np.int64))
    last_date = first_date + (n_days - 1)
    for k, year in enumerate(seasons.years):
        if begin[k] < 0 or end[k] >= n_days:
            raise DataError(
                path, f"year {year}",
                f"runs {seasons.begin[k]} … {seasons.end[k]}, outside the climate series "
                f"{first_date} … {last_date} ({TEMPERATURE}); expected it covered",
            )
    return begin.astype(np.int32), mid.astype(np.int32), end.astype(np.int32)
