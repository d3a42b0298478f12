"""Monthly climate for the evolution runs: the reanalysis extended with a GCM by the delta
method, written both as reanalysis-like monthly files (which ``prepare_glacier`` disaggregates
to days exactly as it does ERA5-Land monthly means) and in OGGM's custom-climate format.

Delta method (as OGGM's ``process_cmip_data``): for each calendar month m, the GCM's anomaly
against its own mean of month m over the reference period (temperature: difference;
precipitation: ratio) is applied to the reanalysis' mean of month m over the same period, cell
by cell. Months the reanalysis covers keep the reanalysis; later months are climatology plus
the GCM's anomaly, so their year-to-year variability is the GCM's alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from core.io import atomic_path
from dataloader.errors import DataError

GRAVITY = 9.80665  # m s-2: ERA5 geopotential to height


def _one_variable(path: Path, names: tuple[str, ...]) -> xr.DataArray:
    with xr.open_dataset(path) as ds:
        for name in names:
            if name in ds.data_vars:
                return ds[name].load()
    raise DataError(path, None, f"no variable named any of {', '.join(names)}")


def _time_name(var: xr.DataArray, path: Path) -> str:
    for name in ("time", "valid_time"):
        if name in var.dims:
            return name
    raise DataError(path, f"variable {var.name!r}", f"has dims {var.dims}, expected a 'time' dimension")


def _lat_lon(var: xr.DataArray, path: Path) -> xr.DataArray:
    renames = {a: b for a, b in (("latitude", "lat"), ("longitude", "lon")) if a in var.dims}
    var = var.rename(renames)
    if not {"lat", "lon"} <= set(var.dims):
        raise DataError(path, f"variable {var.name!r}",
                        f"has dims {var.dims}, expected lat/lon (or latitude/longitude)")
    return var


def read_reanalysis_monthly(temperature: Path, precipitation: Path) -> tuple[xr.DataArray, xr.DataArray]:
    """Monthly means on the reanalysis grid: temperature (K) and precipitation (m w.e. per day),
    dims (time, lat, lon), time = first day of each month. Daily input is averaged to months."""
    out = []
    for path, names, units in ((Path(temperature), ("t2m", "temperature_2m", "tas"), ("K", "degC")),
                               (Path(precipitation), ("tp", "precipitation", "pr"), ("m",))):
        var = _one_variable(path, names)
        var = _lat_lon(var.rename({_time_name(var, path): "time"}), path)
        unit = var.attrs.get("units", "")
        if unit not in units:
            raise DataError(path, f"variable {var.name!r}", f"has units {unit!r}, expected one of {units}")
        if unit == "degC":
            var = var + 273.15
        var = var.resample(time="MS").mean()
        out.append(var.transpose("time", "lat", "lon").astype(np.float64))
    return out[0], out[1]


def read_gcm(temperature: Path, precipitation: Path) -> tuple[xr.DataArray, xr.DataArray]:
    """The GCM's monthly temperature (K) and precipitation (kg m-2 s-1), averaged over its cells
    (a single cell in the bundled CMIP5 files), time = first day of each month."""
    out = []
    for path, names, unit in ((Path(temperature), ("tas",), "K"), (Path(precipitation), ("pr",), "kg m-2 s-1")):
        var = _one_variable(path, names)
        if var.attrs.get("units", unit) != unit:
            raise DataError(path, f"variable {var.name!r}", f"has units {var.attrs['units']!r}, expected {unit!r}")
        time = _time_name(var, path)
        var = var.mean([d for d in var.dims if d != time]).rename({time: "time"})
        months = pd.DatetimeIndex(var["time"].values).to_period("M").to_timestamp()
        out.append(var.assign_coords(time=months).astype(np.float64))
    return out[0], out[1]


def _months_of_period(var: xr.DataArray, period: tuple[int, int], what: str) -> xr.DataArray:
    first, last = period
    sel = var.sel(time=slice(f"{first}-01-01", f"{last}-12-31"))
    if sel.sizes["time"] != 12 * (last - first + 1):
        raise ValueError(f"{what}: the reference period {first}–{last} needs all its "
                         f"{12 * (last - first + 1)} months, found {sel.sizes['time']}")
    return sel.groupby("time.month").mean()


def delta_projection(t_ref: xr.DataArray, p_ref: xr.DataArray, gcm_t: xr.DataArray, gcm_p: xr.DataArray,
                     reference: tuple[int, int], until: int) -> tuple[xr.DataArray, xr.DataArray]:
    """The reanalysis (time, lat, lon) continued to December of ``until`` by the delta method;
    same units as the reanalysis (K, m w.e. per day)."""
    last = pd.Timestamp(t_ref["time"].values[-1])
    if until < last.year + 1:
        raise ValueError(f"--until {until}: the reanalysis already covers it (it ends {last:%Y-%m})")
    if pd.Timestamp(gcm_t["time"].values[-1]).year < until:
        raise ValueError(f"--until {until}: the GCM ends in {pd.Timestamp(gcm_t['time'].values[-1]):%Y-%m}")
    clim_t = _months_of_period(t_ref, reference, "reanalysis temperature")
    clim_p = _months_of_period(p_ref, reference, "reanalysis precipitation")
    gcm_clim_t = _months_of_period(gcm_t, reference, "GCM temperature")
    gcm_clim_p = _months_of_period(gcm_p, reference, "GCM precipitation")
    future = slice(f"{last.year}-{last.month:02d}-02", f"{until}-12-31")
    dt = gcm_t.sel(time=future).groupby("time.month") - gcm_clim_t
    ratio = gcm_p.sel(time=future).groupby("time.month") / gcm_clim_p
    t_future = (clim_t.sel(month=dt["time.month"]) + dt).drop_vars("month")
    p_future = (clim_p.sel(month=ratio["time.month"]) * ratio).drop_vars("month")
    t = xr.concat([t_ref, t_future.transpose("time", "lat", "lon")], "time")
    p = xr.concat([p_ref, p_future.transpose("time", "lat", "lon")], "time")
    return t, p


def write_reanalysis_like(folder: Path, t: xr.DataArray, p: xr.DataArray, source: str) -> tuple[Path, Path]:
    """Monthly ``t2m`` (K) and ``tp`` (m per day, monthly mean of daily totals, as ERA5-Land)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, var, attrs in (("t2m", t, {"units": "K", "long_name": "2 metre temperature"}),
                             ("tp", p, {"units": "m", "long_name": "total precipitation, monthly mean of "
                                                                  "daily totals (m w.e. per day)"})):
        ds = var.rename(name).to_dataset().rename({"lat": "latitude", "lon": "longitude"})
        ds[name].attrs = attrs
        ds["latitude"].attrs = {"units": "degrees_north"}
        ds["longitude"].attrs = {"units": "degrees_east"}
        ds.attrs = {"source": source}
        path = folder / f"{name}_monthly.nc"
        with atomic_path(path) as tmp:
            ds.astype(np.float32).to_netcdf(tmp)
        paths.append(path)
    return paths[0], paths[1]


def write_oggm_custom(path: Path, t: xr.DataArray, p: xr.DataArray, orography: Path, source: str) -> Path:
    """OGGM's custom-climate file (``temp`` °C, ``prcp`` kg m-2 per month, ``hgt`` m; full
    calendar years), the format ``process_custom_climate_data`` reads."""
    z = _lat_lon(_one_variable(Path(orography), ("z", "orography", "hgt")), Path(orography))
    z = z.isel({d: 0 for d in z.dims if d not in ("lat", "lon")})
    height = z / GRAVITY if z.attrs.get("units", "") == "m**2 s**-2" or float(z.max()) > 20000 else z
    height = height.reindex_like(t.isel(time=0), method="nearest", tolerance=1e-3)
    if not np.isfinite(height).all():
        raise DataError(orography, None, "does not cover every cell of the climate grid")
    times = pd.DatetimeIndex(t["time"].values)
    full = (times.month[0] == 1, times.month[-1] == 12)
    keep = slice(0 if full[0] else 13 - times.month[0], None if full[1] else len(times) - times.month[-1])
    t, p, times = t.isel(time=keep), p.isel(time=keep), times[keep]
    days = xr.DataArray(times.days_in_month.to_numpy(), dims="time", coords={"time": t["time"]})
    ds = xr.Dataset({"temp": (t - 273.15).astype(np.float32),
                     "prcp": (p * 1000.0 * days).astype(np.float32),
                     "hgt": height.drop_vars([c for c in height.coords if c not in ("lat", "lon")]
                                             ).astype(np.float32)})
    ds = ds.sortby("lat")
    ds["temp"].attrs = {"units": "degC"}
    ds["prcp"].attrs = {"units": "kg m-2"}
    ds["hgt"].attrs = {"units": "m"}
    ds["lat"].attrs = {"units": "degrees_north", "long_name": "latitude"}
    ds["lon"].attrs = {"units": "degrees_east", "long_name": "longitude"}
    ds.attrs = {"source": source}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp)
    return path
