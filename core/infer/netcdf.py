"""The daily SMB NetCDF files: CF-1.8, the glacier's grid with its CRS as a CF grid mapping and
a GDAL GeoTransform (xarray, rioxarray, GDAL and QGIS place it), chunked by year and spatial
tile, written through a temporary file (``core.io.atomic_path``)."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import netCDF4
import numpy as np
import pyproj

from core.infer.calendar import BatchCalendar
from core.io import atomic_path

SMB_VARIABLE = "smb"


class BatchFiles:
    """The daily SMB files of one batch's glaciers, fed year by year (:meth:`add`) with what
    :func:`batch_series` yields; each file holds its glacier's own grid and days, as
    :func:`write_netcdf` writes them. A context manager: all files are committed when it closes
    without an error, none otherwise. ``spans`` then holds (first_day, number of days) per file."""

    def __init__(self, tensors: Sequence, paths: Sequence, model_name: str, terms: Sequence[str] = ()):
        if len(paths) != len(tensors):
            raise ValueError(f"{len(tensors)} glaciers need as many paths, got {len(paths)}")
        self.tensors, self.paths, self.model_name = list(tensors), list(paths), model_name
        self.terms = tuple(terms)
        self.spans: list[tuple[int, int]] = []

    def __enter__(self) -> BatchFiles:
        with contextlib.ExitStack() as stack:
            self._files = [stack.enter_context(DailySMBFile(stack.enter_context(atomic_path(p)), t,
                                                            self.model_name, self.terms))
                           for p, t in zip(self.paths, self.tensors)]
            self._calendar = BatchCalendar(self.tensors, bool(self.terms))
            self._stack = stack.pop_all()
        return self

    def add(self, k: int, series: np.ndarray, terms: np.ndarray | None = None) -> None:
        """Year k's daily SMB of the batch (B, L, H, W), each glacier cropped to its own grid,
        and (with the files' ``terms``) its glacier-wide day terms (B, L, n_terms)."""
        for i, day, data, day_terms in self._calendar.add(k, series, terms):
            self._files[i].add(day, data, day_terms)

    def __exit__(self, kind, value, traceback):
        if kind is not None:  # an error: every temporary file is removed
            self._stack.__exit__(kind, value, traceback)
            return False
        try:
            for i, day, data, day_terms in self._calendar.finish():
                self._files[i].add(day, data, day_terms)
        except BaseException as err:
            self._stack.__exit__(type(err), err, err.__traceback__)
            raise
        self._stack.close()
        self.spans = [(f.first_day, f.n_days) for f in self._files]
        return False


def _smb_attrs():
    return {
        "long_name": "daily surface mass balance",
        "units": "m w.e. d-1",  # metres of water equivalent per day (1 m w.e. = 1000 kg m-2)
        "grid_mapping": "spatial_ref",
        "comment": "days shared by two model periods hold the sum of both half-weighted values",
    }


# Chunking of the daily SMB. A chunk holds CHUNK_DAYS consecutive days of a rectangular tile:
# - days: 365, fewer when a year of the whole grid exceeds MAP_VALUES, because reading one
#   day's map decompresses every chunk of its block of days (at most MAP_VALUES values);
# - tile: the whole grid when the chunk stays within CHUNK_VALUES, otherwise the grid cut into
#   near-equal tiles that do, because reading one cell's series decompresses its tile over
#   all days.
# One chunk per day (the former layout) compressed poorly and made a series touch every day.
CHUNK_DAYS = 365
MAP_VALUES = 4_000_000    # 16 MB of float32
CHUNK_VALUES = 262_144    # 1 MB of float32


def chunk_shape(height: int, width: int) -> tuple[int, int, int]:
    """(days, rows, columns) of one chunk of the (time, y, x) daily SMB of an H x W grid."""
    days = max(1, min(CHUNK_DAYS, MAP_VALUES // (height * width)))
    cells = max(1, CHUNK_VALUES // days)
    if height * width <= cells:
        return days, height, width
    side = max(1, math.isqrt(cells))
    rows = -(-height // -(-height // side))  # ceil(H / number of tiles): near-equal tiles
    cols = -(-width // -(-width // side))
    return days, rows, cols


def _geotransform(x: np.ndarray, y: np.ndarray) -> str:
    """GDAL's ``GeoTransform`` of a grid of cell centres ``x`` (W,), ``y`` (H,) decreasing:
    "x_left dx 0 y_top 0 -dy" from the outer corner of the first cell (m)."""
    dx = float(x[1] - x[0]) if len(x) > 1 else 100.0
    dy = float(y[0] - y[1]) if len(y) > 1 else 100.0
    # Plain Python floats: a numpy scalar's repr is "np.float64(...)" under numpy 2.
    return " ".join(repr(float(v)) for v in (x[0] - dx / 2, dx, 0.0, y[0] + dy / 2, 0.0, -dy))


def _grid_mapping_attrs(crs_wkt: str, x: np.ndarray, y: np.ndarray) -> dict:
    """``spatial_ref`` as the input files hold it: CF grid-mapping parameters, the WKT under
    both names read by CF tools and GDAL, and the GeoTransform."""
    try:
        attrs = pyproj.CRS.from_wkt(crs_wkt).to_cf()
    except pyproj.exceptions.CRSError:
        attrs = {}
    attrs.update(crs_wkt=crs_wkt, spatial_ref=crs_wkt, GeoTransform=_geotransform(x, y))
    return attrs


# The glacier-wide day terms of the TI models (``glaunti.ti_model.TERMS``) in the daily file.
TERM_ATTRS = {
    "snowfall": ("glacier-wide snowfall", "solid precipitation as the model accumulates it (scaled by "
                 "prec_scale and the corrector's d1)"),
    "rainfall": ("glacier-wide rainfall", "liquid share of the forcing precipitation (not scaled)"),
    "melt": ("glacier-wide melt", "snow and ice melt; smb = snowfall - melt"),
}


class DailySMBFile:
    """A CF-compliant daily SMB NetCDF file being written: :meth:`add` takes pieces of
    consecutive days and writes them in blocks of whole file chunks (:func:`chunk_shape`), so
    that each chunk is compressed once; at most one block plus one piece is held. A context
    manager: the file is complete when it closes (give it a temporary path, ``atomic_path``).

    ``terms`` (names of :data:`TERM_ATTRS`) adds one glacier-wide daily series per term
    (``time``; the outline-weighted mean over each balance year's outlines), fed by
    the same :meth:`add` calls as the SMB."""

    def __init__(self, path, tensors, model_name: str, terms: Sequence[str] = ()):
        self.first_day, self.n_days = None, 0
        self._buffer, self._held = [], 0
        self._terms = {}
        self._layout = chunk_shape(len(tensors.y), len(tensors.x))
        self._nc = nc = netCDF4.Dataset(path, "w", format="NETCDF4")
        try:
            nc.createDimension("time", None)
            nc.createDimension("y", len(tensors.y))
            nc.createDimension("x", len(tensors.x))
            nc.title = f"GlaUnTI model {model_name.upper()} daily surface mass balance, {tensors.name}"
            nc.Conventions = "CF-1.8"
            nc.glacier = tensors.name
            crs = nc.createVariable("spatial_ref", "i4")
            crs.setncatts(_grid_mapping_attrs(tensors.crs_wkt, tensors.x, tensors.y))
            for name, values in (("y", tensors.y), ("x", tensors.x)):
                var = nc.createVariable(name, "f8", (name,))
                var[:] = values
                var.setncatts({"standard_name": f"projection_{name}_coordinate", "units": "m",
                               "axis": name.upper(), "long_name": f"{name} coordinate of cell centre"})
            self._time = nc.createVariable("time", "i4", ("time",), chunksizes=(self._layout[0],))
            self._time.setncatts({"standard_name": "time", "axis": "T", "long_name": "day",
                                  "units": f"days since {np.datetime_as_string(tensors.first_date, unit='D')}",
                                  "calendar": "proleptic_gregorian"})
            self._smb = nc.createVariable(SMB_VARIABLE, "f4", ("time", "y", "x"), zlib=True, shuffle=True,
                                          complevel=4, fill_value=np.float32(np.nan), chunksizes=self._layout)
            self._smb.setncatts(_smb_attrs())
            for name in terms:
                long_name, comment = TERM_ATTRS[name]
                var = nc.createVariable(name, "f4", ("time",), fill_value=np.float32(np.nan),
                                        chunksizes=(self._layout[0],))
                var.setncatts({"long_name": long_name, "units": "m w.e. d-1", "comment": comment,
                               "cell_methods": "area: mean where glacier"})
                self._terms[name] = var
        except BaseException:
            nc.close()
            raise

    def add(self, day: int, data: np.ndarray, terms: np.ndarray | None = None) -> None:
        """Append ``data`` (n, H, W) for the days from ``day`` on (consecutive with the last),
        and the file's glacier-wide ``terms`` (n, n_terms) of the same days (written at once:
        they are small)."""
        if self.first_day is None:
            self.first_day = day
        elif day != self.first_day + self.n_days + self._held:
            raise ValueError(f"daily SMB piece starts at day {day}, expected "
                             f"{self.first_day + self.n_days + self._held} (pieces must be consecutive)")
        if (terms is None) != (not self._terms):
            raise ValueError(f"this file's day terms are {list(self._terms) or 'none'}; got "
                             f"{'none' if terms is None else terms.shape[-1]}")
        at = self.n_days + self._held
        for j, var in enumerate(self._terms.values()):
            var[at: at + len(data)] = terms[:, j]
        self._buffer.append(data)
        self._held += len(data)
        days = self._layout[0]
        while self._held >= days:
            joined = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
            self._write(joined[:days])
            rest = joined[days:]
            self._buffer, self._held = [rest] if len(rest) else [], len(rest)

    def _write(self, data: np.ndarray) -> None:
        start = self.first_day + self.n_days
        self._time[self.n_days: self.n_days + len(data)] = np.arange(start, start + len(data), dtype=np.int32)
        self._smb[self.n_days: self.n_days + len(data)] = data
        self.n_days += len(data)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        try:
            if kind is None and self._held:
                self._write(np.concatenate(self._buffer))
                self._buffer, self._held = [], 0
        finally:
            self._nc.close()
        return False


def write_netcdf(path, tensors, chunks: Iterator[tuple[int, np.ndarray]], model_name: str) -> tuple[int, int]:
    """Stream daily SMB chunks into a CF-compliant NetCDF file (atomically).

    ``chunks`` yields ``(first_day, smb)`` pieces of consecutive days as :func:`iter_daily_smb`
    does; they are written in blocks of whole file chunks (:class:`DailySMBFile`).
    Returns (first_day, number of days) written.
    """
    with atomic_path(path) as tmp, DailySMBFile(tmp, tensors, model_name) as file:
        for day, data in chunks:
            file.add(day, data)
    return file.first_day, file.n_days
