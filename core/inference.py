"""Daily SMB inference over a glacier's study period, streamed year by year (MODEL.md §8).

The state (SWE or GRU hidden state) is spun up over 1990–1994 and carried through the study
years; each study year is run in the series regime and its days are placed on the calendar.
Days covered by two periods (the midseason day, a shared year boundary) hold the sum of both
half-weighted values (MODEL.md §9.3). Only one year of daily fields is in memory at a time.
"""

from __future__ import annotations

import warnings
from typing import Iterator

import equinox as eqx
import jax.numpy as jnp
import netCDF4
import numpy as np
import xarray as xr

from core.io import atomic_path
from glaunti.glacier import GlacierArrays, initial_state, year_step

SMB_VARIABLE = "smb"


@eqx.filter_jit
def _spinup_step(model, arrays, k, state):
    state, _, _, _ = year_step(model, arrays, k, state, series=False, spinup=True)
    return state


@eqx.filter_jit
def _series_step(model, arrays, k, state):
    state, _, _, series = year_step(model, arrays, k, state, series=True)
    return state, series


def iter_daily_smb(model, arrays: GlacierArrays, tensors) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_day, smb)`` chunks of consecutive calendar days covering the study period;
    ``smb`` is (n, H, W) float32 m w.e. per day, ``first_day`` a climate-day index."""
    state = initial_state(model, arrays)
    study = range(arrays.n_spinup, len(tensors.years))
    for k in range(arrays.n_spinup):
        state = _spinup_step(model, arrays, jnp.int32(k), state)  # traced k: one compile
    pending_day, pending = None, None
    for k in study:
        state, series = _series_step(model, arrays, jnp.int32(k), state)
        series = np.asarray(series)
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


def infer(model, arrays: GlacierArrays, tensors) -> xr.DataArray:
    """The whole daily SMB series in memory, as an xarray DataArray (time, y, x)."""
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
        "units": "m w.e. d-1",
        "grid_mapping": "spatial_ref",
        "comment": "days shared by two model periods hold the sum of both half-weighted values",
    }


def _geotransform(tensors) -> str:
    dx = float(tensors.x[1] - tensors.x[0]) if len(tensors.x) > 1 else 100.0
    dy = float(tensors.y[0] - tensors.y[1]) if len(tensors.y) > 1 else 100.0
    return f"{tensors.x[0] - dx / 2!r} {dx!r} 0.0 {tensors.y[0] + dy / 2!r} 0.0 {-dy!r}"


def write_netcdf(path, tensors, chunks: Iterator[tuple[int, np.ndarray]], model_name: str) -> tuple[int, int]:
    """Stream daily SMB chunks into a CF-compliant NetCDF file (atomically).

    Returns (first_day, number of days) written.
    """
    first_day, n_days = None, 0
    with atomic_path(path) as tmp:
        with netCDF4.Dataset(tmp, "w", format="NETCDF4") as nc:
            nc.createDimension("time", None)
            nc.createDimension("y", len(tensors.y))
            nc.createDimension("x", len(tensors.x))
            nc.title = f"GlaUnTI model {model_name.upper()} daily surface mass balance, {tensors.name}"
            nc.Conventions = "CF-1.8"
            nc.glacier = tensors.name
            crs = nc.createVariable("spatial_ref", "i4")
            crs.crs_wkt = tensors.crs_wkt
            crs.spatial_ref = tensors.crs_wkt
            crs.GeoTransform = _geotransform(tensors)
            for name, values, std in (("y", tensors.y, "projection_y_coordinate"),
                                      ("x", tensors.x, "projection_x_coordinate")):
                var = nc.createVariable(name, "f8", (name,))
                var[:] = values
                var.standard_name, var.units, var.axis = std, "m", name.upper()
            time = nc.createVariable("time", "i4", ("time",))
            time.units = f"days since {np.datetime_as_string(tensors.first_date, unit='D')}"
            time.calendar = "proleptic_gregorian"
            time.standard_name, time.axis = "time", "T"
            smb = nc.createVariable(SMB_VARIABLE, "f4", ("time", "y", "x"), zlib=True, shuffle=True,
                                    complevel=4, fill_value=np.float32(np.nan),
                                    chunksizes=(1, len(tensors.y), len(tensors.x)))
            smb.setncatts(_smb_attrs())
            for day, data in chunks:
                if first_day is None:
                    first_day = day
                time[n_days: n_days + len(data)] = np.arange(day, day + len(data), dtype=np.int32)
                smb[n_days: n_days + len(data)] = data
                n_days += len(data)
    return first_day, n_days


def map_glaciers(fn, names, devices=None):
    """``[fn(name, device) for name in names]`` with the glaciers spread round-robin over the local
    devices (one worker thread per device, so that devices run concurrently; JAX releases the
    GIL while it computes). ``fn`` should place its arrays on ``device``
    (``make_arrays(..., device=device)``); uncommitted values default to it as well.
    Results are returned in the order of ``names``."""
    import jax
    from concurrent.futures import ThreadPoolExecutor

    devices = list(jax.local_devices() if devices is None else devices)
    names = list(names)
    if len(devices) <= 1 or len(names) <= 1:
        return [fn(name, devices[0] if devices else None) for name in names]

    def work(d):
        out = []
        with jax.default_device(devices[d]):
            for i in range(d, len(names), len(devices)):
                out.append((i, fn(names[i], devices[d])))
        return out

    results = [None] * len(names)
    with ThreadPoolExecutor(len(devices)) as pool:
        for part in pool.map(work, range(len(devices))):
            for i, value in part:
                results[i] = value
    return results
