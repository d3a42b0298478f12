"""Writers of the published on-disk layout (docs/data_format.md): NetCDF files with the CF/GDAL
georeferencing of the published files, and the CSV tables. Used by the synthetic twin and by the
own-glacier preparation (:mod:`dataloader.prepare`).

Nothing time-dependent (history, creation date) is written, so that a seed reproduces the data.
"""

from __future__ import annotations

import os
import pickle
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

import netCDF4
import numpy as np
import pyproj

import constants

CELL = 100.0  # grid spacing of the published layout (m)
COMPRESSION = {"zlib": True, "shuffle": True, "complevel": 9}  # as the reference files
# The daily climate is most of the bytes written: zlib level 6 writes it ~5× faster than 9
# for the same size (a twin's 7032×24×24 temperature: 0.15 against 0.71 s, 0.55 MB each).
DAILY_COMPRESSION = {**COMPRESSION, "complevel": 6}
FACIES_BANDS = ("ice", "snow", "debris", "firn", "shadow", "superimposed-ice", "cloud", "water",
                "confidence")
# Largest chunk of the daily climate variables (values); small grids get one chunk like the
# reference files, large ones are written slab by slab so memory stays bounded.
MAX_CHUNK_VALUES = 2_000_000

# Dataset-wide divisors of the corrector's inputs (docs/data_format.md §4; delta_z is not used by
# the models).
NORMALISATION_FACTORS = {
    "elevation": constants.elevation_norm,
    "elevation_std": constants.elevation_std_norm,
    "delta_z": 2471.570922600618,
    "t_monthly": constants.t_monthly_norm,
    "p_monthly": constants.p_monthly_norm,
}

INDEX_COLUMNS = ("name", "wgms_name", "fold", "region", "max_year", "height", "width")
TOTAL_SMB_COLUMNS = (("year", None), ("begin_date", None), ("midseason_date", None),
                     ("end_date", None), ("winter_balance", 3), ("summer_balance", 3),
                     ("annual_balance", 3))
POINT_SMB_COLUMNS = (("year", None), ("point_id", None), ("balance_code", None),
                     ("begin_date", None), ("end_date", None), ("latitude", 7),
                     ("longitude", 7), ("elevation", 1), ("balance", 3))


@lru_cache(maxsize=None)
def _crs_attributes(epsg: int) -> tuple[tuple[str, object], ...]:
    wkt = pyproj.CRS.from_epsg(epsg).to_wkt("WKT1_GDAL")
    cf = pyproj.CRS.from_wkt(wkt).to_cf()
    cf["crs_wkt"] = wkt
    return tuple(cf.items())


def _grid(ds: netCDF4.Dataset, x: np.ndarray, y: np.ndarray, epsg: int) -> None:
    """Coordinate variables and the ``spatial_ref`` grid mapping, as the reference files hold them."""
    yv = ds.createVariable("y", "f8", ("y",))
    yv.setncatts({"units": "metre", "axis": "Y", "long_name": "y coordinate of projection",
                  "standard_name": "projection_y_coordinate"})
    yv[:] = y
    xv = ds.createVariable("x", "f8", ("x",))
    xv.setncatts({"units": "metre", "axis": "X", "long_name": "x coordinate of projection",
                  "standard_name": "projection_x_coordinate"})
    xv[:] = x
    ref = ds.createVariable("spatial_ref", "i8", ())
    attrs = dict(_crs_attributes(epsg))
    attrs["spatial_ref"] = attrs["crs_wkt"]
    x_left = float(x[0] - CELL / 2)
    y_top = float(y[0] + CELL / 2)
    attrs["GeoTransform"] = f"{x_left!r} {CELL!r} 0.0 {y_top!r} 0.0 {-CELL!r}"
    ref.setncatts(attrs)
    ref.assignValue(0)


def _data_variable(ds, name, dims, attrs, chunks, compression=COMPRESSION) -> netCDF4.Variable:
    var = ds.createVariable(name, "f4", dims, fill_value=np.float32(np.nan), chunksizes=chunks,
                            **compression)
    var.setncatts({**attrs, "grid_mapping": "spatial_ref"})
    return var


def write_daily(path: Path, name: str, attrs: dict, x: np.ndarray, y: np.ndarray, epsg: int,
                first_date: np.datetime64, n_days: int,
                slab: Callable[[int, int], np.ndarray]) -> None:
    """A (time, y, x) variable whose values for days [d0, d1) come from ``slab(d0, d1)``."""
    height, width = y.size, x.size
    chunk_days = int(min(n_days, max(1, MAX_CHUNK_VALUES // (height * width))))
    with netCDF4.Dataset(path, "w", format="NETCDF4") as ds:
        ds.createDimension("time", n_days)
        ds.createDimension("y", height)
        ds.createDimension("x", width)
        var = _data_variable(ds, name, ("time", "y", "x"), attrs, (chunk_days, height, width),
                             DAILY_COMPRESSION)
        time = ds.createVariable("time", "i4", ("time",))
        time.setncatts({"units": f"days since {first_date}", "calendar": "proleptic_gregorian"})
        time[:] = np.arange(n_days, dtype=np.int32)
        _grid(ds, x, y, epsg)
        for d0 in range(0, n_days, chunk_days):
            d1 = min(d0 + chunk_days, n_days)
            var[d0:d1] = slab(d0, d1)


def write_static(path: Path, name: str, attrs: dict, data: np.ndarray, x, y, epsg) -> None:
    with netCDF4.Dataset(path, "w", format="NETCDF4") as ds:
        ds.createDimension("y", y.size)
        ds.createDimension("x", x.size)
        var = _data_variable(ds, name, ("y", "x"), attrs, data.shape)
        _grid(ds, x, y, epsg)
        var[:] = data.astype(np.float32)


def write_yearly(path: Path, variables: dict[str, tuple[dict, np.ndarray]], years: np.ndarray,
                 x, y, epsg) -> None:
    """(year, y, x) variables; ``variables`` maps a name to (attributes, data)."""
    with netCDF4.Dataset(path, "w", format="NETCDF4") as ds:
        ds.createDimension("year", years.size)
        ds.createDimension("y", y.size)
        ds.createDimension("x", x.size)
        written = []
        for name, (attrs, data) in variables.items():
            written.append((_data_variable(ds, name, ("year", "y", "x"), attrs, data.shape), data))
        year = ds.createVariable("year", "i4", ("year",))
        year[:] = years.astype(np.int32)
        _grid(ds, x, y, epsg)
        for var, data in written:
            var[:] = data.astype(np.float32)


def write_facies(path: Path, years: list[int], data: np.ndarray, x, y, epsg) -> None:
    with netCDF4.Dataset(path, "w", format="NETCDF4") as ds:
        ds.createDimension("year", len(years))
        ds.createDimension("band", len(FACIES_BANDS))
        ds.createDimension("y", y.size)
        ds.createDimension("x", x.size)
        var = _data_variable(ds, "facies", ("year", "band", "y", "x"),
                             {"units": "1", "long_name": "facies class probabilities (8 bands) "
                                                         "and classification confidence"},
                             data.shape)
        year = ds.createVariable("year", "i4", ("year",))
        year[:] = np.asarray(years, dtype=np.int32)
        band = ds.createVariable("band", str, ("band",))
        band[:] = np.array(FACIES_BANDS, dtype=object)
        _grid(ds, x, y, epsg)
        var[:] = data.astype(np.float32)


def _cell(value, digits: int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, np.datetime64):
        return str(value.astype("datetime64[D]"))
    if isinstance(value, float):
        if not np.isfinite(value):
            return ""
        text = f"{value:.{digits}f}"
        return "0." + "0" * digits if text == "-0." + "0" * digits else text
    text = str(value)
    if any(c in text for c in ',"\n'):
        text = '"' + text.replace('"', '""') + '"'
    return text


def write_csv(path: Path, columns: Iterable[tuple[str, int | None]], rows: Iterable[dict]) -> None:
    """``columns``: (name, decimals for floats). Empty field for missing values, ISO dates,
    '\\n' line ends, fixed decimals: identical bytes for identical content."""
    columns = list(columns)
    lines = [",".join(name for name, _ in columns)]
    for row in rows:
        lines.append(",".join(_cell(row[name], digits) for name, digits in columns))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")


def replace_folder(tmp: Path, target: Path) -> None:
    """Move the finished folder ``tmp`` onto ``target``: an existing ``target`` is set aside and
    deleted only once the new one is in place, so a reader never finds half a dataset."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old)


def write_normalisation_factors(path: Path) -> None:
    """The published dataset-wide divisors as ``normalisation_factors.pkl`` (pickle protocol 4)."""
    with open(path, "wb") as f:
        pickle.dump(dict(NORMALISATION_FACTORS), f, protocol=4)
