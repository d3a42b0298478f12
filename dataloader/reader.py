"""Read and validate one glacier folder (tiny_dataset/FORMAT.md) into `GlacierTensors`.

Every check raises `DataError` naming the file, the variable/field and what was expected, so
that a bad file fails here with a readable message instead of deep inside a model run.
Where the published implementation silently clamps or crops (stakes outside the grid, grids
that disagree between files, missing or duplicated years), this reader refuses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyproj
import xarray as xr

import constants
from dataloader import tensors as T
from dataloader.errors import DataError

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

# Temperatures at or above this are taken for Kelvin (no glacier sees +200 °C).
KELVIN_THRESHOLD = 200.0

# Climate is read in chunks of about this many values (both files together) so that peak memory
# stays bounded even for the largest grids (~10 GB per climate variable in the files for 30
# years of a 500 × 400 grid).
CLIMATE_CHUNK_VALUES = 1 << 24

# The distinct climate columns found while reading are kept in memory up to this many values
# (both variables together), so that the files are read once; beyond, they are read twice.
CLIMATE_KEEP_VALUES = 1 << 24

_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

# `allocate(field, shape, dtype)` returns a writable array for a large field; the cache passes
# one that memory-maps a file in its entry being built, the default keeps it in memory.
Allocator = Callable[[str, tuple, np.dtype], np.ndarray]


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


@dataclasses.dataclass(frozen=True)
class Grid:
    """The grid of outlines.nc, which every other raster must share."""

    x: np.ndarray  # (W,) float64 cell centres, increasing
    y: np.ndarray  # (H,) float64 cell centres, decreasing
    dx: float
    dy: float
    crs: pyproj.CRS
    crs_wkt: str

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.y), len(self.x)


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
        normalisation: normalisation_factors.pkl (uses `t_monthly`, `p_monthly`).
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
    seasons = _read_total_smb(glacier_dir / TOTAL_SMB, years)
    with open_netcdf(glacier_dir / OUTLINES) as ds:
        grid = _read_grid(glacier_dir / OUTLINES, ds, info)
        outlines = _read_yearly(glacier_dir / OUTLINES, ds, "outlines", years, grid)
    _check_outlines(glacier_dir / OUTLINES, outlines, years)
    with open_netcdf(glacier_dir / DEM) as ds:
        elevation = _read_yearly(glacier_dir / DEM, ds, "z", years, grid)
        elevation_std = _read_yearly(glacier_dir / DEM, ds, "zstddev", years, grid)
    with open_netcdf(glacier_dir / OROGRAPHY) as ds:
        var = _variable(glacier_dir / OROGRAPHY, ds, "elevation", ("y", "x"), grid)
        orography = _finite(glacier_dir / OROGRAPHY, "elevation", var.values.astype(np.float32))
    facies, has_facies = _read_facies(glacier_dir / FACIES, years, grid)
    first_date, temperature_2m, precipitation, climate_cell = _read_climate(
        glacier_dir, grid, allocate
    )
    begin_day, mid_day, end_day = _season_days(
        glacier_dir / TOTAL_SMB, seasons, first_date, temperature_2m.shape[0]
    )
    stakes = _read_point_smb(glacier_dir / POINT_SMB, seasons, grid, first_date)

    # Lapse-rate downscaling with the DEM of the balance year (MODEL.md §5).
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
    # Winter/summer values of annual-only years are meaningless (FORMAT.md §7.1).
    glacier_wide[~seasonal, 1:] = np.nan

    return T.GlacierTensors(
        name=info.name,
        wgms_name=info.wgms_name,
        region=info.region,
        fold=info.fold,
        max_year=info.max_year,
        x=grid.x,
        y=grid.y,
        crs_wkt=grid.crs_wkt,
        first_date=first_date,
        temperature_2m=temperature_2m,
        precipitation=precipitation,
        climate_cell=climate_cell,
        years=years,
        study=years >= constants.study_period_start_year,
        lapse_offset=lapse_offset,
        outlines=outlines,
        elevation=elevation,
        elevation_std=elevation_std,
        facies=facies,
        has_facies=has_facies,
        climate_monthly=climate_monthly,
        n_months=n_months,
        seasonal=seasonal,
        begin_day=begin_day,
        mid_day=mid_day,
        end_day=end_day,
        **blocks,
        glacier_wide=glacier_wide,
        **stakes,
    )


# ---------------------------------------------------------------------------------------------
# NetCDF rasters


def _read_grid(path: Path, ds: xr.Dataset, info: GlacierInfo) -> Grid:
    """The grid and CRS of outlines.nc, checked against index.csv and for regular spacing."""
    crs_wkt, crs = _crs(path, ds)
    coords = {}
    for name in ("x", "y"):
        if name not in ds.coords or ds[name].ndim != 1:
            raise DataError(path, f"coordinate {name!r}", "is missing, expected 1-D cell centres")
        coords[name] = ds[name].values.astype(np.float64)
    x, y = coords["x"], coords["y"]
    if (len(y), len(x)) != (info.height, info.width):
        raise DataError(
            path, "grid",
            f"is {len(y)} × {len(x)} (y × x), expected {info.height} × {info.width} "
            "(index.csv height × width)",
        )
    if len(x) < 2 or len(y) < 2:
        raise DataError(path, "grid", f"is {len(y)} × {len(x)}, expected at least 2 cells per side")
    dx, dy = x[1] - x[0], y[0] - y[1]
    for name, step, values in (("x", dx, x), ("y", -dy, y)):
        if abs(step) == 0 or not np.allclose(np.diff(values), step, rtol=0, atol=1e-6 * abs(step)):
            raise DataError(path, f"coordinate {name!r}", "is not regularly spaced")
    if dx <= 0:
        raise DataError(path, "coordinate 'x'", "decreases, expected increasing eastings")
    if dy <= 0:
        raise DataError(path, "coordinate 'y'", "increases, expected decreasing northings (north-up)")
    return Grid(x=x, y=y, dx=float(dx), dy=float(dy), crs=crs, crs_wkt=crs_wkt)


def _crs(path: Path, ds: xr.Dataset) -> tuple[str, pyproj.CRS]:
    """CRS from the `spatial_ref` grid-mapping variable (CF/GDAL convention)."""
    if "spatial_ref" not in ds.variables:
        raise DataError(
            path, "variable 'spatial_ref'",
            "is missing, expected a scalar grid-mapping variable holding the CRS as WKT",
        )
    attrs = ds["spatial_ref"].attrs
    wkt = attrs.get("crs_wkt") or attrs.get("spatial_ref")
    if not wkt:
        raise DataError(
            path, "variable 'spatial_ref'", "has no 'crs_wkt' attribute, expected the CRS as WKT"
        )
    try:
        return wkt, pyproj.CRS.from_wkt(wkt)
    except pyproj.exceptions.CRSError as error:
        raise DataError(path, "attribute 'spatial_ref:crs_wkt'", f"is not a valid CRS ({error})")


def _variable(
    path: Path, ds: xr.Dataset, name: str, dims: tuple[str, ...], grid: Grid
) -> xr.DataArray:
    """Variable `name` with exactly these dims, on the grid of outlines.nc, in its CRS."""
    if name not in ds.data_vars:
        raise DataError(
            path, f"variable {name!r}", f"is missing (found {sorted(map(str, ds.data_vars))})"
        )
    var = ds[name]
    if var.dims != dims:
        raise DataError(path, f"variable {name!r}", f"has dims {var.dims}, expected {dims}")
    for coord, expected in (("x", grid.x), ("y", grid.y)):
        if coord not in ds.coords:
            raise DataError(path, f"coordinate {coord!r}", "is missing, expected 1-D cell centres")
        values = ds[coord].values
        if values.shape != expected.shape:
            raise DataError(
                path, f"coordinate {coord!r}",
                f"has {values.size} values, expected {expected.size} (as outlines.nc and index.csv)",
            )
        # Bit-identical: the published code combines rasters by coordinate labels, where any
        # difference would silently drop cells (FORMAT.md §5).
        if not np.array_equal(values, expected):
            raise DataError(
                path, f"coordinate {coord!r}",
                "differs from outlines.nc, expected bit-identical cell-centre coordinates",
            )
    wkt, crs = _crs(path, ds)
    if wkt != grid.crs_wkt and crs != grid.crs:
        raise DataError(
            path, "variable 'spatial_ref'", f"holds CRS {crs.name!r}, expected that of outlines.nc "
            f"({grid.crs.name!r})",
        )
    return var


def _finite(path: Path, name: str, values: np.ndarray) -> np.ndarray:
    if not np.isfinite(values).all():
        raise DataError(path, f"variable {name!r}", "contains NaN or inf, expected complete values")
    return values


def _year_positions(path: Path, ds: xr.Dataset, years: np.ndarray, required: bool) -> dict:
    """Map each wanted year to its position along the file's `year` axis.

    With `required`, every year 1990 … max_year must appear exactly once.
    """
    if "year" not in ds.coords:
        raise DataError(path, "coordinate 'year'", "is missing, expected integer balance years")
    file_years = ds["year"].values
    if not np.issubdtype(file_years.dtype, np.integer):
        raise DataError(path, "coordinate 'year'", f"has dtype {file_years.dtype}, expected integers")
    unique, counts = np.unique(file_years, return_counts=True)
    if (counts > 1).any():
        raise DataError(path, "coordinate 'year'", f"repeats {unique[counts > 1].tolist()}, "
                        "expected each year once")
    missing = sorted(set(years.tolist()) - set(file_years.tolist()))
    if required and missing:
        raise DataError(
            path, "coordinate 'year'",
            f"lacks {missing}, expected every year {years[0]} … {years[-1]}",
        )
    position = {int(y): i for i, y in enumerate(file_years)}
    return {int(y): position[int(y)] for y in years if int(y) in position}


def _read_yearly(path: Path, ds: xr.Dataset, name: str, years: np.ndarray, grid: Grid) -> np.ndarray:
    """(Y, H, W) float32 slices of a (year, y, x) variable for every balance year."""
    var = _variable(path, ds, name, ("year", "y", "x"), grid)
    positions = _year_positions(path, ds, years, required=True)
    values = var.values.astype(np.float32)[[positions[int(y)] for y in years]]
    return _finite(path, name, values)


def _check_outlines(path: Path, outlines: np.ndarray, years: np.ndarray) -> None:
    if ((outlines < 0) | (outlines > 1)).any():
        raise DataError(path, "variable 'outlines'", "has values outside [0, 1], expected a 0/1 mask")
    empty = years[outlines.sum(axis=(1, 2)) == 0]
    if len(empty):
        raise DataError(
            path, "variable 'outlines'", f"has no glacier cell in {empty.tolist()}, expected a "
            "non-empty mask every year (glacier-wide values are means over it)",
        )


def _read_facies(path: Path, years: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Facies maps looked up by balance year: (Y, 9, H, W) float32 and (Y,) has-map flags.

    NaN cells of an existing map become 0; a year without a map (or no file) is −1 in all nine
    bands (MODEL.md §9.5).
    """
    height, width = grid.shape
    facies = np.full((len(years), len(constants.facies_bands), height, width),
                     constants.facies_placeholder, np.float32)
    has_facies = np.zeros(len(years), bool)
    if not path.exists():
        return facies, has_facies
    with open_netcdf(path) as ds:
        var = _variable(path, ds, "facies", ("year", "band", "y", "x"), grid)
        bands = tuple(str(b) for b in ds["band"].values) if "band" in ds.coords else None
        if bands != constants.facies_bands:
            raise DataError(path, "coordinate 'band'", f"is {bands}, expected {constants.facies_bands}")
        positions = _year_positions(path, ds, years, required=False)
        values = var.values.astype(np.float32)
    for k, year in enumerate(years):
        if int(year) in positions:
            year_map = values[positions[int(year)]]
            if np.isinf(year_map).any():
                raise DataError(path, "variable 'facies'", f"has inf in {year}, expected 0–1 or NaN")
            facies[k] = np.where(np.isnan(year_map), np.float32(0), year_map)
            has_facies[k] = True
    return facies, has_facies


def _read_climate(
    glacier_dir: Path, grid: Grid, allocate: Allocator
) -> tuple[np.datetime64, np.ndarray, np.ndarray, np.ndarray]:
    """Daily climate as its distinct cell series.

    The reanalysis is resampled by nearest neighbour onto the glacier grid, so whole blocks of
    cells carry the same series. Two cells share a column when their temperature and their
    precipitation series are bit-identical over all days; columns are numbered in the
    row-major order of their first cell.

    Both files are read once, together, in chunks of days: each chunk refines the partition
    of the cells (`_refine`) and its class series are kept in memory, so that the columns can
    be assembled at the end without a second read. If the kept series would exceed
    CLIMATE_KEEP_VALUES (many distinct columns), they are dropped and the columns are
    gathered in a second pass over the files instead; peak memory stays bounded either way.

    Returns:
        first date, (D, C) float32 temperature_2m and precipitation (`allocate`d), and the
        (H, W) int32 climate_cell map: `temperature_2m[:, climate_cell]` is the file's
        (D, H, W) array, bit for bit.
    """
    fields = (
        (TEMPERATURE, "temperature_2m", "temperature_2m"),
        (PRECIPITATION, "total_precipitation_sum", "precipitation"),
    )
    n_cells = grid.shape[0] * grid.shape[1]
    with contextlib.ExitStack() as stack:
        paths, variables, days = [], [], None
        for file_name, variable, _ in fields:
            path = glacier_dir / file_name
            ds = stack.enter_context(open_netcdf(path))
            variables.append(_variable(path, ds, variable, ("time", "y", "x"), grid))
            file_days = _daily_time_axis(path, ds)
            if days is None:
                days = file_days
            elif not np.array_equal(file_days, days):
                raise DataError(path, "coordinate 'time'", f"differs from {TEMPERATURE}, expected "
                                "the same days")
            paths.append(path)
        windows = _day_windows(variables, len(days), n_cells)

        def read(start: int, stop: int, check: bool) -> list[np.ndarray]:
            """(days, cells) float32 chunk of each file."""
            chunks = []
            for path, (_, variable, _), var in zip(paths, fields, variables):
                chunk = var[start:stop].values.astype(np.float32, copy=False)
                if check:
                    _check_climate_chunk(path, variable, chunk, days[start:stop])
                chunks.append(chunk.reshape(stop - start, n_cells))
            return chunks

        # Pass 1: partition the cells; keep (parents, class series) of each chunk while small.
        labels = np.zeros(n_cells, np.int64)  # class of each cell given the days read so far
        kept, kept_values = [], 0
        for start, stop in windows:
            chunks = read(start, stop, check=True)
            new_labels, first = _refine(labels, chunks)
            parents = labels[first]  # class of each new class before this chunk
            labels = new_labels
            if kept is not None:
                kept_values += len(fields) * (stop - start) * len(first)
                if kept_values <= CLIMATE_KEEP_VALUES:
                    kept.append((start, stop, parents, [c[:, first] for c in chunks]))
                else:
                    kept = None
            del chunks

        # Columns in the row-major order of their first cell.
        _, first = np.unique(labels, return_index=True)
        order = np.argsort(first)  # column c is class order[c] …
        column_cell = first[order]  # … whose first cell is column_cell[c]
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        climate_cell = rank[labels].astype(np.int32).reshape(grid.shape)
        out = [allocate(field, (len(days), len(order)), np.dtype(np.float32))
               for _, _, field in fields]
        if kept is not None:
            classes = order  # class after the last chunk of each column; walked back chunk by chunk
            for start, stop, parents, series in reversed(kept):
                for target, values in zip(out, series):
                    target[start:stop] = values[:, classes]
                classes = parents[classes]
        else:
            for start, stop in windows:
                for target, chunk in zip(out, read(start, stop, check=False)):
                    target[start:stop] = chunk[:, column_cell]
    return days[0], out[0], out[1], climate_cell


def _day_windows(variables: list[xr.DataArray], n_days: int, n_cells: int) -> list[tuple[int, int]]:
    """[start, stop) day windows of about CLIMATE_CHUNK_VALUES values for both files together,
    made of whole HDF5 chunks of both files (a chunk cut in two is decompressed twice)."""
    file_chunks = [(var.encoding.get("chunksizes") or (1,))[0] for var in variables]
    file_chunk = math.lcm(*file_chunks)
    if file_chunk > 8 * max(file_chunks):  # unrelated chunkings: align to the longer one only
        file_chunk = max(file_chunks)
    step = max(1, CLIMATE_CHUNK_VALUES // (len(variables) * n_cells))
    step = max(file_chunk, step // file_chunk * file_chunk)
    return [(start, min(start + step, n_days)) for start in range(0, n_days, step)]


def _refine(labels: np.ndarray, chunks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Split the classes of `labels` (n_cells,) so that two cells stay together only if their
    columns in every (days, n_cells) chunk are bit-identical (0.0 and −0.0 differ).

    Cells are grouped by a hash of (class, columns) and every group is then checked for exact
    equality; on a hash collision the chunk is grouped exactly by sorting its columns.

    Returns:
        (n_cells,) new labels 0 … C−1 and (C,) the first cell of each new class.
    """
    bits = [chunk.view(np.uint32) for chunk in chunks]
    key = labels.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    for i, b in enumerate(bits):
        key += _column_hash(b, seed=i)
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    representative = first[inverse]
    same = labels[representative] == labels
    rows = max(1, (1 << 22) // len(labels))  # bounded temporaries
    for values in bits:
        for start in range(0, len(values), rows):
            block = values[start : start + rows]
            same &= (np.take(block, representative, axis=1) == block).all(axis=0)
    if same.all():
        return inverse, first
    exact = np.concatenate([labels.astype(np.uint32)[:, None], *(b.T for b in bits)], axis=1)
    _, first, inverse = np.unique(exact, axis=0, return_index=True, return_inverse=True)
    return inverse.reshape(-1), first


def _column_hash(bits: np.ndarray, seed: int) -> np.ndarray:
    """(n,) uint64 hash of each column of a (days, n) uint32 array: Σ bits[d] · w[d] mod 2⁶⁴
    with fixed random odd weights w (a different set per `seed`)."""
    weights = np.random.default_rng([seed, len(bits)]).integers(
        0, 1 << 63, size=len(bits), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    hashed = np.zeros(bits.shape[1], np.uint64)
    rows = max(1, (1 << 16) // bits.shape[1])
    buffer = np.empty((rows, bits.shape[1]), np.uint64)
    for start in range(0, len(bits), rows):
        block = buffer[: min(rows, len(bits) - start)]
        np.multiply(bits[start : start + rows], weights[start : start + rows, None], out=block)
        hashed += block[0] if len(block) == 1 else block.sum(axis=0, dtype=np.uint64)
    return hashed


def _daily_time_axis(path: Path, ds: xr.Dataset) -> np.ndarray:
    """(D,) datetime64[D] days of the file, checked to be consecutive days at 00:00."""
    if "time" not in ds.coords:
        raise DataError(path, "coordinate 'time'", "is missing, expected one value per day")
    values = ds["time"].values
    if not np.issubdtype(values.dtype, np.datetime64):
        raise DataError(
            path, "coordinate 'time'",
            f"could not be decoded to dates (dtype {values.dtype}), expected 'days since <date>' "
            "in the proleptic_gregorian calendar",
        )
    days = values.astype("datetime64[D]")
    if len(days) == 0:
        raise DataError(path, "coordinate 'time'", "is empty, expected daily values")
    if (days != values).any():
        raise DataError(path, "coordinate 'time'", "has times other than 00:00, expected days")
    gaps = np.flatnonzero(np.diff(days) != np.timedelta64(1, "D"))
    if len(gaps):
        i = gaps[0]
        raise DataError(
            path, "coordinate 'time'",
            f"is not consecutive: {days[i]} is followed by {days[i + 1]}, expected one value per "
            "day without gaps",
        )
    return days


def _check_climate_chunk(path: Path, variable: str, chunk: np.ndarray, days: np.ndarray) -> None:
    finite = np.isfinite(chunk).all(axis=(1, 2))
    if not finite.all():
        raise DataError(
            path, f"variable {variable!r}",
            f"contains NaN or inf (first on {days[np.argmin(finite)]}), expected complete climate",
        )
    if variable == "temperature_2m" and chunk.max() >= KELVIN_THRESHOLD:
        raise DataError(
            path, f"variable {variable!r}",
            f"reaches {chunk.max():.1f}, which looks like Kelvin; expected °C (all values < "
            f"{KELVIN_THRESHOLD:g})",
        )


# ---------------------------------------------------------------------------------------------
# CSV tables


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """All fields as strings ('' = missing), with the required columns checked."""
    if not path.is_file():
        raise DataError(path, None, "is missing (required file)")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as error:
        raise DataError(path, None, f"could not be read as CSV ({error})") from error
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(path, f"columns {missing}", f"are missing (found {list(table.columns)})")
    return table


def _line(row: int) -> str:
    """File line of a table row (the header is line 1)."""
    return f"line {row + 2}"


def _parse_int(path: Path, column: str, row: int, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(path, f"column {column!r}, {_line(row)},", f"is {text!r}, expected an integer")


def _parse_float(path: Path, column: str, row: int, text: str) -> float:
    """Float or NaN for an empty field."""
    if text == "":
        return np.nan
    try:
        return float(text)
    except ValueError:
        raise DataError(path, f"column {column!r}, {_line(row)},", f"is {text!r}, expected a number")


def _parse_date(path: Path, column: str, row: int, text: str) -> np.datetime64:
    """ISO YYYY-MM-DD date, or NaT for an empty field."""
    if text == "":
        return np.datetime64("NaT", "D")
    try:
        if not _ISO_DATE.match(text):
            raise ValueError(text)
        return np.datetime64(datetime.date.fromisoformat(text), "D")
    except ValueError:
        raise DataError(path, f"column {column!r}, {_line(row)},", f"is {text!r}, expected a "
                        "date YYYY-MM-DD")


@dataclasses.dataclass(frozen=True)
class Seasons:
    """Season dates and glacier-wide balances of total_smb.csv, one entry per balance year."""

    years: np.ndarray  # (Y,) int
    begin: np.ndarray  # (Y,) datetime64[D]
    mid: np.ndarray  # (Y,) datetime64[D], NaT for annual-only years
    end: np.ndarray  # (Y,) datetime64[D]
    balances: np.ndarray  # (Y, 3) float32 annual, winter, summer; NaN if missing


def _read_total_smb(path: Path, years: np.ndarray) -> Seasons:
    """Season dates and balances of every balance year in `years`, validated."""
    dates = ("begin_date", "midseason_date", "end_date")
    balances = ("annual_balance", "winter_balance", "summer_balance")
    table = _read_csv(path, ("year", *dates, *balances))
    file_years = [_parse_int(path, "year", i, v) for i, v in enumerate(table["year"])]
    wanted = set(years.tolist())
    repeated = sorted({y for y in file_years if y in wanted and file_years.count(y) > 1})
    if repeated:
        raise DataError(path, "column 'year'", f"repeats {repeated}, expected one row per year")
    missing = sorted(wanted - set(file_years))
    if missing:
        raise DataError(path, "column 'year'", f"lacks {missing}, expected every year "
                        f"{years[0]} … {years[-1]}")
    row_of = {y: i for i, y in enumerate(file_years)}
    parsed = {c: [] for c in (*dates, *balances)}
    for year in years.tolist():
        i = row_of[year]
        begin, mid, end = (_parse_date(path, c, i, table[c].iloc[i]) for c in dates)
        for column, date in (("begin_date", begin), ("end_date", end)):
            if np.isnat(date):
                raise DataError(path, f"column {column!r}, {_line(i)},", "is empty, expected a date")
        if end < begin:
            raise DataError(path, f"year {year}, {_line(i)},", f"ends ({end}) before it begins ({begin})")
        if not np.isnat(mid) and not begin <= mid <= end:
            raise DataError(path, f"column 'midseason_date', {_line(i)},",
                            f"is {mid}, expected within [{begin}, {end}]")
        for column, date in zip(dates, (begin, mid, end)):
            parsed[column].append(date)
        for column in balances:
            parsed[column].append(_parse_float(path, column, i, table[column].iloc[i]))
    return Seasons(
        years=years,
        begin=np.array(parsed["begin_date"], "datetime64[D]"),
        mid=np.array(parsed["midseason_date"], "datetime64[D]"),
        end=np.array(parsed["end_date"], "datetime64[D]"),
        balances=np.array([parsed[c] for c in balances], np.float32).T.copy(),
    )


def _season_days(
    path: Path, seasons: Seasons, first_date: np.datetime64, n_days: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Y,) int32 climate-day indices of begin, midseason (-1 if none) and end."""
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


def _read_point_smb(
    path: Path, seasons: Seasons, grid: Grid, first_date: np.datetime64
) -> dict[str, np.ndarray]:
    """Stake arrays of GlacierTensors, (N,) each; empty if the glacier has no point file.

    Rows of years outside 1990 … max_year cannot be modelled and are left out; rows without a
    balance carry no information and are left out too.
    """
    columns = ("year", "point_id", "balance_code", "begin_date", "end_date", "latitude",
               "longitude", "balance")
    kept = {c: [] for c in ("line", "k", "code", "begin", "end", "lat", "lon", "balance", "id")}
    if path.exists():
        table = _read_csv(path, columns)
        year_index = {int(y): k for k, y in enumerate(seasons.years)}
        for i, record in enumerate(table.to_dict("records")):
            year = _parse_int(path, "year", i, record["year"])
            code = record["balance_code"]
            if code not in T.STAKE_CODES:
                raise DataError(path, f"column 'balance_code', {_line(i)},",
                                f"is {code!r}, expected one of {T.STAKE_CODES}")
            begin = _parse_date(path, "begin_date", i, record["begin_date"])
            end = _parse_date(path, "end_date", i, record["end_date"])
            for column, date in (("begin_date", begin), ("end_date", end)):
                if np.isnat(date):
                    raise DataError(path, f"column {column!r}, {_line(i)},", "is empty, expected a date")
            if end < begin:
                raise DataError(path, f"{_line(i)}", f"ends ({end}) before it begins ({begin})")
            latitude = _parse_float(path, "latitude", i, record["latitude"])
            longitude = _parse_float(path, "longitude", i, record["longitude"])
            if not (np.isfinite(latitude) and np.isfinite(longitude)):
                raise DataError(path, f"{_line(i)}", "has no latitude/longitude, expected both")
            balance = _parse_float(path, "balance", i, record["balance"])
            if year not in year_index or not np.isfinite(balance):
                continue
            for column, value in zip(kept, (i, year_index[year], T.STAKE_CODES.index(code), begin,
                                            end, latitude, longitude, balance, record["point_id"])):
                kept[column].append(value)

    k = np.array(kept["k"], np.int32)
    code = np.array(kept["code"], np.int8)
    begin = np.array(kept["begin"], "datetime64[D]")
    end = np.array(kept["end"], "datetime64[D]")
    row, col = _stake_cells(path, grid, np.array(kept["lat"], float), np.array(kept["lon"], float),
                            kept["line"], kept["id"])
    return {
        "stake_year": k,
        "stake_code": code,
        "stake_row": row,
        "stake_col": col,
        "stake_balance": np.array(kept["balance"], np.float32),
        "stake_begin_day": (begin - first_date).astype(np.int32),
        "stake_end_day": (end - first_date).astype(np.int32),
        "stake_weight": _stake_weights(seasons, k, code, begin, end),
        "stake_id": np.array(kept["id"], str),
    }


def _stake_cells(
    path: Path, grid: Grid, lat: np.ndarray, lon: np.ndarray, line: list, point_id: list
) -> tuple[np.ndarray, np.ndarray]:
    """(N,) int32 row and column of each stake: WGS 84 → CRS of outlines.nc, then floor of the
    inverse corner-based transform (x_left = x[0] − dx/2, y_top = y[0] + dy/2)."""
    transformer = pyproj.Transformer.from_crs("EPSG:4326", grid.crs, always_xy=True)
    easting, northing = (np.asarray(v, float) for v in transformer.transform(lon, lat))
    x_left, y_top = grid.x[0] - grid.dx / 2, grid.y[0] + grid.dy / 2
    col = np.floor((easting - x_left) / grid.dx)
    row = np.floor((y_top - northing) / grid.dy)
    height, width = grid.shape
    outside = ~((row >= 0) & (row < height) & (col >= 0) & (col < width))
    if outside.any():
        i = int(np.argmax(outside))
        raise DataError(
            path, f"point {point_id[i]!r}, {_line(line[i])},",
            f"at latitude {lat[i]}, longitude {lon[i]} lies at ({easting[i]:.1f}, {northing[i]:.1f}) "
            f"in {grid.crs.name}, outside the grid (x {x_left:.1f} … {x_left + width * grid.dx:.1f}, "
            f"y {y_top - height * grid.dy:.1f} … {y_top:.1f}); expected a point inside it",
        )
    return row.astype(np.int32), col.astype(np.int32)


def _stake_weights(
    seasons: Seasons, k: np.ndarray, code: np.ndarray, begin: np.ndarray, end: np.ndarray
) -> np.ndarray:
    """(N,) float32 calibration date weights (MODEL.md §5, FORMAT.md §7.2).

    Δ are whole days between the stake's dates and the dates of the season run: annual →
    (begin, end), winter → (begin, midseason), summer → (midseason, end). Index stakes and
    winter/summer stakes of annual-only years are no calibration targets: weight 0.
    """
    winter, summer = T.STAKE_CODES.index("winter"), T.STAKE_CODES.index("summer")
    run_begin = np.where(code == summer, seasons.mid[k], seasons.begin[k])
    run_end = np.where(code == winter, seasons.mid[k], seasons.end[k])
    one_day = np.timedelta64(1, "D")
    # Δ is NaN where the run date is NaT (annual-only years); those weights are zeroed below.
    weight = T.stake_date_weight((begin - run_begin) / one_day, (end - run_end) / one_day)
    seasonal_code = (code == winter) | (code == summer)
    not_target = (code == T.INDEX_CODE) | (seasonal_code & np.isnat(seasons.mid[k]))
    return np.where(not_target, np.float32(0), weight).astype(np.float32)
