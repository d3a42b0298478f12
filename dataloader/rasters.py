"""The NetCDF rasters of a glacier: the grid of outlines.nc, and variables checked against it.

Every raster must share the grid of outlines.nc bit for bit (coordinates and CRS): the
published code combines rasters by coordinate labels, where any difference would silently drop
cells (docs/data_format.md). Each check raises `DataError` naming the file and variable.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyproj
import xarray as xr

import constants
from dataloader.errors import DataError


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


def read_grid(path: Path, ds: xr.Dataset, height: int, width: int) -> Grid:
    """The grid and CRS of outlines.nc, checked against index.csv (`height` × `width` cells)
    and for regular spacing."""
    crs_wkt, crs = _crs(path, ds)
    coords = {}
    for name in ("x", "y"):
        if name not in ds.coords or ds[name].ndim != 1:
            raise DataError(path, f"coordinate {name!r}", "is missing, expected 1-D cell centres")
        coords[name] = ds[name].values.astype(np.float64)
    x, y = coords["x"], coords["y"]
    if (len(y), len(x)) != (height, width):
        raise DataError(
            path, "grid",
            f"is {len(y)} × {len(x)} (y × x), expected {height} × {width} "
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
        raise DataError(path, "attribute 'spatial_ref:crs_wkt'",
                        f"is not a valid CRS ({error})") from error


def grid_variable(
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
        # difference would silently drop cells (docs/data_format.md §5).
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


def finite(path: Path, name: str, values: np.ndarray) -> np.ndarray:
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


def read_yearly(path: Path, ds: xr.Dataset, name: str, years: np.ndarray, grid: Grid) -> np.ndarray:
    """(Y, H, W) float32 slices of a (year, y, x) variable for every balance year."""
    var = grid_variable(path, ds, name, ("year", "y", "x"), grid)
    positions = _year_positions(path, ds, years, required=True)
    values = var.values.astype(np.float32)[[positions[int(y)] for y in years]]
    return finite(path, name, values)


def check_outlines(path: Path, outlines: np.ndarray, years: np.ndarray) -> None:
    if ((outlines < 0) | (outlines > 1)).any():
        raise DataError(path, "variable 'outlines'", "has values outside [0, 1], expected a 0/1 mask")
    empty = years[outlines.sum(axis=(1, 2)) == 0]
    if len(empty):
        raise DataError(
            path, "variable 'outlines'", f"has no glacier cell in {empty.tolist()}, expected a "
            "non-empty mask every year (glacier-wide values are means over it)",
        )


def read_facies(
    path: Path, ds: xr.Dataset | None, years: np.ndarray, grid: Grid
) -> tuple[np.ndarray, np.ndarray]:
    """Facies maps of facies.nc (`ds`, None without the file) looked up by balance year:
    (Y, 9, H, W) float32 and (Y,) has-map flags.

    NaN cells of an existing map become 0; a year without a map (or no file) is −1 in all nine
    bands (docs/data_format.md §6.6).
    """
    height, width = grid.shape
    facies = np.full((len(years), len(constants.facies_bands), height, width),
                     constants.facies_placeholder, np.float32)
    has_facies = np.zeros(len(years), bool)
    if ds is None:
        return facies, has_facies
    var = grid_variable(path, ds, "facies", ("year", "band", "y", "x"), grid)
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
