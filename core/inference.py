"""Daily SMB inference over a glacier's study period, streamed year by year.

The state (SWE or GRU hidden state) is spun up over 1990–1994 and carried through the study
years; each study year is run in the series regime and its days are placed on the calendar.
Days covered by two periods (the midseason day, a shared year boundary) hold the sum of both
half-weighted values. Only about one year of daily fields is in memory at a time: the NetCDF
writer buffers one block of file chunks (at most MAP_VALUES values).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
import netCDF4
import numpy as np
import pyproj
import xarray as xr

from core.distributed import map_glaciers  # noqa: F401  (inference spreads glaciers over devices)
from core.io import atomic_path
from core.training import announce_compile, progress_note
from glaunti.glacier import GlacierArrays, initial_state, walk_years, year_step

SMB_VARIABLE = "smb"


@eqx.filter_jit
def _spun_up(model, arrays):
    """The state after the spin-up years, from the cold start (the engine's year walk)."""
    state = initial_state(model, arrays)
    if arrays.n_spinup:
        state = walk_years(model, arrays, state, 0, arrays.n_spinup - 1)[0]
    return state


@eqx.filter_jit
def _series_step(model, arrays, k, state):
    state, _, _, series = year_step(model, arrays, k, state, series=True)
    return state, series


# (model type, array shapes) whose inference functions this process has compiled.
_COMPILED: set = set()


def iter_daily_smb(model, arrays: GlacierArrays, tensors, verbose: bool = True
                   ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_day, smb)`` chunks of consecutive calendar days covering the study period;
    ``smb`` is (n, H, W) float32 m w.e. per day, ``first_day`` a climate-day index. The first
    glacier of a new shape says that it compiles (``verbose``)."""
    key = (type(model), tuple(np.shape(x) for x in jax.tree_util.tree_leaves(arrays)))
    t0 = None
    if key not in _COMPILED:
        _COMPILED.add(key)
        if verbose:
            height, width = arrays.shape
            t0 = announce_compile(f"model {getattr(model, 'kind', '?')} inference", f"{height}×{width}")
    state = _spun_up(model, arrays)
    study = range(arrays.n_spinup, len(tensors.years))
    pending_day, pending = None, None
    for k in study:
        state, series = _series_step(model, arrays, jnp.int32(k), state)  # traced k: one compile
        series = np.asarray(series)
        if t0 is not None:
            progress_note(f"  compiled and ran its first year in {time.perf_counter() - t0:.1f} s")
            t0 = None
        begin, end = int(tensors.begin_day[k]), int(tensors.end_day[k])
        year = np.zeros((end - begin + 1,) + series.shape[1:], dtype=np.float32)
        valid = np.asarray(tensors.day_valid[k])
        np.add.at(year, np.asarray(tensors.day_index[k])[valid] - begin, series[valid])
        if pending is not None:
            overlap = pending_day + len(pending) - begin
            if overlap > 0:
                year[:overlap] += pending[len(pending) - overlap:]
                pending = pending[: len(pending) - overlap]
            elif overlap < 0:
                warnings.warn(f"{tensors.name}: {-overlap} day(s) between balance years "
                              f"{int(tensors.years[k]) - 1} and {int(tensors.years[k])} are not modelled; "
                              "they hold 0 in the daily output", stacklevel=2)
                pending = np.concatenate([pending, np.zeros((-overlap,) + pending.shape[1:], np.float32)])
            if len(pending):
                yield pending_day, pending
        pending_day, pending = begin, year
    if pending is not None:
        yield pending_day, pending


def daily_dates(tensors, first_day: int, n: int) -> np.ndarray:
    return tensors.first_date + np.arange(first_day, first_day + n).astype("timedelta64[D]")


def infer(model, arrays: GlacierArrays, tensors) -> tuple[xr.DataArray, int]:
    """The whole daily SMB series in memory: (DataArray (time, y, x), climate-day index of its
    first day)."""
    chunks = list(iter_daily_smb(model, arrays, tensors))
    first_day = chunks[0][0]
    data = np.concatenate([c for _, c in chunks])
    return _as_dataarray(tensors, data, daily_dates(tensors, first_day, len(data))), first_day


def _as_dataarray(tensors, data, dates):
    return xr.DataArray(
        data, dims=("time", "y", "x"),
        coords={"time": dates.astype("datetime64[ns]"), "y": tensors.y, "x": tensors.x},
        name=SMB_VARIABLE, attrs=_smb_attrs(),
    )


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


def _blocks(chunks: Iterator[tuple[int, np.ndarray]], days: int) -> Iterator[tuple[int, np.ndarray]]:
    """Regroup consecutive ``(first_day, (n, H, W))`` pieces into blocks of exactly ``days``
    days (the last may be shorter), so that each chunk of the file is compressed once; holds
    at most one block plus one piece."""
    start, buffer, held = None, [], 0
    for day, data in chunks:
        if start is None:
            start = day
        elif day != start + held:
            raise ValueError(f"daily SMB piece starts at day {day}, expected {start + held} "
                             "(pieces must be consecutive)")
        buffer.append(data)
        held += len(data)
        while held >= days:
            joined = np.concatenate(buffer) if len(buffer) > 1 else buffer[0]
            yield start, joined[:days]
            rest = joined[days:]
            start, buffer, held = start + days, [rest] if len(rest) else [], len(rest)
    if held:
        yield start, np.concatenate(buffer)


def write_netcdf(path, tensors, chunks: Iterator[tuple[int, np.ndarray]], model_name: str) -> tuple[int, int]:
    """Stream daily SMB chunks into a CF-compliant NetCDF file (atomically).

    ``chunks`` yields ``(first_day, smb)`` pieces of consecutive days as :func:`iter_daily_smb`
    does; they are written in blocks of whole file chunks (:func:`chunk_shape`).
    Returns (first_day, number of days) written.
    """
    first_day, n_days = None, 0
    layout = chunk_shape(len(tensors.y), len(tensors.x))
    with atomic_path(path) as tmp:
        with netCDF4.Dataset(tmp, "w", format="NETCDF4") as nc:
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
            time = nc.createVariable("time", "i4", ("time",), chunksizes=(layout[0],))
            time.setncatts({"standard_name": "time", "axis": "T", "long_name": "day",
                            "units": f"days since {np.datetime_as_string(tensors.first_date, unit='D')}",
                            "calendar": "proleptic_gregorian"})
            smb = nc.createVariable(SMB_VARIABLE, "f4", ("time", "y", "x"), zlib=True, shuffle=True,
                                    complevel=4, fill_value=np.float32(np.nan), chunksizes=layout)
            smb.setncatts(_smb_attrs())
            for day, data in _blocks(chunks, layout[0]):
                if first_day is None:
                    first_day = day
                time[n_days: n_days + len(data)] = np.arange(day, day + len(data), dtype=np.int32)
                smb[n_days: n_days + len(data)] = data
                n_days += len(data)
    return first_day, n_days
