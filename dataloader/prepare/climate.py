"""Reanalysis climate (ERA5-Land or any CF NetCDF on a regular lat/lon grid) -> the daily climate
files of the published layout (docs/data_format.md): ``temperature.nc`` (°C), ``precipitation.nc``
(m w.e. per day) and ``orography.nc`` (m), resampled onto the 100 m glacier grid by nearest
neighbour, as in the published data.

Accepted sources, told apart by their time step:

* **daily** (ERA5-Land "daily statistics"): one value per day, used as is.
* **hourly** ERA5-Land: the day's temperature is the mean of its 24 values 00…23 UTC; ``tp`` is
  accumulated from 00 UTC (the value at 01 UTC is the first hour's amount), so a day's total is
  the value at 00 UTC of the *next* day. The accumulation is checked: ERA5 (not -Land) hourly
  ``tp`` holds per-hour amounts and would be misread.
* **monthly** means (only with ``monthly=True``; ``tp`` as the monthly mean of daily totals in m
  per day, as ERA5-Land's monthly means are), disaggregated to days:

  - precipitation: the month's daily rate on every day of the month (exactly mean-preserving);
  - temperature: linear interpolation between mid-month values, then shifted within each month
    by a constant so that the month's mean is exactly the monthly value (before the first and
    after the last mid-month the first/last value holds). Constant-per-month temperature would
    also preserve the means, but steps of several °C at month boundaries would put whole
    days above or below 0 °C for the wrong part of a month in spring and autumn; the linear
    cycle follows the seasonal course.

  What it misses: day-to-day weather. Melt depends on the positive part of temperature, so in
  months whose mean is near 0 °C the warm spells that melt (and the cold, snowy days) are lost
  and melt is underestimated; snowfall timing within a month is lost as well. The published
  model was calibrated on daily ERA5-Land, so results from monthly input are an approximation;
  :func:`open_climate` prints a warning to say so.

Files are opened lazily and written in time chunks: only one chunk's time window (and only the
box of reanalysis cells the glacier uses) is read from the sources at a time, so memory does not
grow with the number of days.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from dataloader.errors import DataError
from dataloader.layout import write_daily, write_static

G = 9.80665  # standard gravity (m s-2): geopotential -> height

TEMPERATURE_UNITS = {  # units attribute -> offset added to get °C
    "k": -273.15, "kelvin": -273.15, "degk": -273.15,
    "degc": 0.0, "°c": 0.0, "c": 0.0, "celsius": 0.0, "deg_c": 0.0, "degrees_celsius": 0.0,
    "degree_celsius": 0.0,
}
PRECIPITATION_UNITS = {  # units attribute -> factor to get m (per day for daily and monthly data)
    "m": 1.0, "metre": 1.0, "meter": 1.0, "metres": 1.0, "meters": 1.0,
    "m of water equivalent": 1.0, "m day-1": 1.0, "m d-1": 1.0, "m/day": 1.0, "m/d": 1.0,
    "mm": 1e-3, "kg m-2": 1e-3, "kg m**-2": 1e-3, "mm day-1": 1e-3, "mm/day": 1e-3, "mm d-1": 1e-3,
}
GEOPOTENTIAL_UNITS = {"m**2 s**-2", "m2 s-2", "m^2 s^-2", "m2/s2", "m^2/s^2", "m**2/s**2"}
HEIGHT_UNITS = {"m", "metre", "meter", "metres", "meters", "m a.s.l."}

NAMES = {"temperature": "t2m", "precipitation": "tp", "orography": "z"}
ACCUMULATION_TOLERANCE = 1e-4  # m; a drop larger than this within a day is not packing noise

MONTHLY_WARNING = (
    "WARNING: monthly climate is disaggregated to days (precipitation: the month's daily rate "
    "every day; temperature: mean-preserving linear interpolation between mid-month values). "
    "This has no day-to-day variability and underestimates melt in months with mean "
    "temperature near 0 °C; the published model was not calibrated on such input.")


@dataclass
class _Series:
    """One lazily opened (time, lat, lon) variable; ``value * scale + offset`` is in target units."""

    path: Path
    data: xr.DataArray
    times: np.ndarray  # datetime64[ns]
    lat: np.ndarray
    lon: np.ndarray
    scale: float
    offset: float
    dataset: xr.Dataset  # kept to close the file

    def close(self) -> None:
        self.dataset.close()


@dataclass
class Climate:
    """Opened climate sources (see :func:`open_climate`).

    Attributes:
        temperature, precipitation: the lazily opened series (internal).
        orography: (nlat_o, nlon_o) float64 reanalysis surface height (m) on ``orography_lat``,
            ``orography_lon``.
        step: ``'hourly'``, ``'daily'`` or ``'monthly'``.
        first_day, last_day: the first and last day (datetime64[D]) that both temperature and
            precipitation cover completely.
        lon, lat: (nlon,), (nlat,) the temperature file's cell-centre vectors (degrees, as in
            the file), into which :func:`nearest_cells` indexes.
        paths: source files by role.
    """

    temperature: _Series
    precipitation: _Series
    orography: np.ndarray
    orography_lat: np.ndarray
    orography_lon: np.ndarray
    step: str
    first_day: np.datetime64
    last_day: np.datetime64
    lon: np.ndarray
    lat: np.ndarray
    paths: dict

    def close(self) -> None:
        self.temperature.close()
        self.precipitation.close()

    def __enter__(self) -> Climate:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Opening

def _pick_variable(ds: xr.Dataset, path: Path, role: str) -> xr.DataArray:
    if NAMES[role] in ds.data_vars:
        return ds[NAMES[role]]
    gridded = [v for v in ds.data_vars if {"lat", "lon"} <= set(ds[v].dims)]
    if len(gridded) == 1:
        return ds[gridded[0]]
    raise DataError(path, None, f"has no variable '{NAMES[role]}' and not exactly one gridded data "
                                f"variable to use as {role}; variables: {sorted(ds.data_vars)}")


def _open(path, role: str) -> tuple[xr.DataArray, xr.Dataset]:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, f"{role} file does not exist")
    try:
        ds = xr.open_dataset(path, cache=False)
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad input file
        raise DataError(path, None, f"cannot be read as NetCDF ({err})") from None
    rename = {old: new for old, new in (("latitude", "lat"), ("longitude", "lon"),
                                        ("valid_time", "time")) if old in ds.variables}
    ds = ds.rename(rename)
    for need in ("lat", "lon"):
        if need not in ds.dims:
            ds.close()
            raise DataError(path, None, f"has no '{need}' dimension (expected latitude/longitude or "
                                        f"lat/lon coordinates of a regular grid); dims: {dict(ds.sizes)}")
    try:
        return _pick_variable(ds, path, role), ds
    except DataError:
        ds.close()
        raise


def _squeeze(var: xr.DataArray, path: Path, keep: tuple[str, ...]) -> xr.DataArray:
    extra = [d for d in var.dims if d not in keep]
    too_long = [d for d in extra if var.sizes[d] != 1]
    if too_long:
        raise DataError(path, f"variable '{var.name}'",
                        f"has dims {dict(var.sizes)}, expected {keep} (extra dims only of length 1)")
    return var.isel({d: 0 for d in extra}, drop=True).transpose(*keep)


def _vectors(var: xr.DataArray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    lat = np.asarray(var["lat"].values, dtype=np.float64)
    lon = np.asarray(var["lon"].values, dtype=np.float64)
    for name, vec in (("latitude", lat), ("longitude", lon)):
        steps = np.diff(vec)
        if vec.size > 1 and not (np.all(steps > 0) or np.all(steps < 0)):
            raise DataError(path, f"coordinate '{name}'", "is not strictly monotonic (expected a "
                                                          "regular lat/lon grid)")
    return lat, lon


def _units(var: xr.DataArray, path: Path, table, role: str):
    units = str(var.attrs.get("units", "")).strip()
    key = units.lower()
    if key not in table:
        expected = {"temperature": "K or °C", "precipitation": "m (or mm)"}[role]
        raise DataError(path, f"variable '{var.name}'",
                        f"has units '{units}', expected {expected}")
    return table[key]


def _open_series(path, role: str) -> _Series:
    var, ds = _open(path, role)
    path = Path(path)
    try:
        if "time" not in var.dims:
            raise DataError(path, f"variable '{var.name}'", "has no time (or valid_time) dimension")
        var = _squeeze(var, path, ("time", "lat", "lon"))
        times = var["time"].values
        if not np.issubdtype(times.dtype, np.datetime64):
            raise DataError(path, "coordinate 'time'", "is not a standard-calendar time axis")
        if role == "temperature":
            scale, offset = 1.0, _units(var, path, TEMPERATURE_UNITS, role)
        else:
            scale, offset = _units(var, path, PRECIPITATION_UNITS, role), 0.0
        lat, lon = _vectors(var, path)
    except DataError:
        ds.close()
        raise
    return _Series(path, var, times.astype("datetime64[ns]"), lat, lon, scale, offset, ds)


def _time_step(series: _Series) -> str:
    t = series.times
    if t.size < 2:
        raise DataError(series.path, "coordinate 'time'", "has fewer than 2 steps")
    steps = np.unique(np.diff(t))
    if steps.size == 1 and steps[0] == np.timedelta64(1, "h"):
        return "hourly"
    if steps.size == 1 and steps[0] == np.timedelta64(1, "D"):
        return "daily"
    months = t.astype("datetime64[M]")
    if np.all(np.diff(months) == np.timedelta64(1, "M")):
        return "monthly"
    raise DataError(series.path, "coordinate 'time'",
                    f"steps {sorted({str(s.astype('timedelta64[h]')) for s in steps})[:4]} are not "
                    "hourly, daily or monthly without gaps")


def _covered_days(series: _Series, step: str, role: str) -> tuple[np.datetime64, np.datetime64]:
    """First and last day that can be computed completely from ``series``."""
    t = series.times
    day = np.timedelta64(1, "D")
    if step == "daily":
        return t[0].astype("datetime64[D]"), t[-1].astype("datetime64[D]")
    if step == "monthly":
        first = t[0].astype("datetime64[M]").astype("datetime64[D]")
        last = (t[-1].astype("datetime64[M]") + 1).astype("datetime64[D]") - day
        return first, last
    # Hourly: temperature needs 00..23 UTC of the day; precipitation 01 UTC .. 00 UTC next day.
    start = t[0] if role == "temperature" else t[0] - np.timedelta64(1, "h")
    end = t[-1] + np.timedelta64(1, "h") if role == "temperature" else t[-1]
    first = (start + (day - np.timedelta64(1, "ns"))).astype("datetime64[D]")  # ceil to a day
    last = end.astype("datetime64[D]") - day
    return first, last


def _read_orography(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    var, ds = _open(path, "orography")
    path = Path(path)
    try:
        var = _squeeze(var, path, ("lat", "lon"))
        units = str(var.attrs.get("units", "")).strip()
        if units.lower() in GEOPOTENTIAL_UNITS or var.attrs.get("standard_name") == "geopotential":
            factor = 1.0 / G
        elif units.lower() in HEIGHT_UNITS:
            factor = 1.0
        else:
            raise DataError(path, f"variable '{var.name}'", f"has units '{units}', expected "
                                                            "geopotential (m**2 s**-2) or height (m)")
        lat, lon = _vectors(var, path)
        return np.asarray(var.values, dtype=np.float64) * factor, lat, lon
    finally:
        ds.close()


def open_climate(temperature, precipitation, orography, monthly: bool = False) -> Climate:
    """Open the three climate sources lazily and check units, grids and time steps.

    Args:
        temperature: NetCDF of 2 m temperature (``t2m`` or the single gridded variable), units
            K or °C.
        precipitation: NetCDF of total precipitation (``tp``…), units m (or mm).
        orography: NetCDF of the reanalysis surface, geopotential (m² s⁻²) or height (m).
        monthly: accept monthly means (disaggregated to days when written); prints a warning.

    Raises:
        DataError: unreadable file, unknown units, no lat/lon grid, irregular time axis, temperature
            and precipitation of different time steps, monthly data without ``monthly=True`` or
            ``monthly=True`` with daily/hourly data.
    """
    t = _open_series(temperature, "temperature")
    try:
        p = _open_series(precipitation, "precipitation")
    except DataError:
        t.close()
        raise
    try:
        step = _time_step(t)
        if _time_step(p) != step:
            raise DataError(p.path, "coordinate 'time'",
                            f"is {_time_step(p)} but the temperature file {t.path} is {step}")
        if step == "monthly" and not monthly:
            raise DataError(t.path, "coordinate 'time'", "holds monthly means; pass "
                                                         "--monthly_climate to disaggregate them to days")
        if monthly and step != "monthly":
            raise DataError(t.path, "coordinate 'time'", f"is {step}, not monthly: drop "
                                                         "--monthly_climate")
        orog, olat, olon = _read_orography(orography)
    except DataError:
        t.close()
        p.close()
        raise
    t_first, t_last = _covered_days(t, step, "temperature")
    p_first, p_last = _covered_days(p, step, "precipitation")
    if monthly:
        print(MONTHLY_WARNING, file=sys.stderr)
    return Climate(t, p, orog, olat, olon, step, max(t_first, p_first), min(t_last, p_last),
                   t.lon, t.lat, {"temperature": t.path, "precipitation": p.path,
                                  "orography": Path(orography)})


# ---------------------------------------------------------------------------------------------
# Space: nearest reanalysis cell of every grid cell

def _to_convention(lon: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """Longitudes expressed in the convention of ``vector`` (0…360 or −180…180)."""
    if vector.max() > 180.0:
        return np.mod(lon, 360.0)
    return np.mod(lon + 180.0, 360.0) - 180.0


def _nearest(vector: np.ndarray, values: np.ndarray, path: Path, name: str) -> np.ndarray:
    """Index of the nearest entry of a monotonic ``vector``; error beyond half a cell of its ends."""
    flat = values.ravel()
    half = 0.5 * (np.abs(np.diff(vector)).max() if vector.size > 1 else 0.0)
    low, high = vector.min() - half, vector.max() + half
    outside = (flat < low) | (flat > high)
    if outside.any():
        bad = flat[outside][0]
        raise DataError(path, f"coordinate '{name}'",
                        f"spans {vector.min():.4f}…{vector.max():.4f}; the glacier grid reaches "
                        f"{bad:.4f}, more than half a cell beyond (climate does not cover the glacier)")
    # pandas' nearest lookup is the one xarray's sel(method='nearest') uses.
    index = pd.Index(vector).get_indexer(flat, method="nearest")
    return index.reshape(values.shape)


def nearest_cells(climate: Climate, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) indices into ``climate.lat`` and ``climate.lon`` of the reanalysis cell nearest to
    each grid-cell centre (``lon``, ``lat``: (H, W) degrees, EPSG:4326).

    Raises:
        DataError: a cell centre lies more than half a reanalysis cell beyond the climate grid.
    """
    path = climate.paths["temperature"]
    rows = _nearest(climate.lat, np.asarray(lat, dtype=np.float64), path, "latitude")
    cols = _nearest(climate.lon, _to_convention(np.asarray(lon, dtype=np.float64), climate.lon),
                    path, "longitude")
    return rows, cols


def _match(lat: np.ndarray, lon: np.ndarray, rows: np.ndarray, cols: np.ndarray,
           other_lat: np.ndarray, other_lon: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Indices in another file's grid of the same cells (coordinates equal within 1e-4°)."""
    cell_lat, cell_lon = lat[rows], _to_convention(lon[cols], other_lon)
    out = []
    for vector, values, name in ((other_lat, cell_lat, "latitude"), (other_lon, cell_lon, "longitude")):
        index = pd.Index(vector).get_indexer(values.ravel(), method="nearest")
        if np.any(np.abs(vector[index] - values.ravel()) > 1e-4):
            raise DataError(path, f"coordinate '{name}'",
                            "does not contain the cells of the temperature grid (expected the same "
                            "reanalysis grid)")
        out.append(index.reshape(values.shape))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# Time: daily values of days [day0, day0 + n) from each kind of source

class _BoxReader:
    """Reads time windows of the box of source cells that ``rows``/``cols`` (H, W) use and
    expands them to (n, H, W)."""

    def __init__(self, series: _Series, rows: np.ndarray, cols: np.ndarray):
        self.series = series
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        self.box = series.data.isel(lat=slice(r0, r1), lon=slice(c0, c1))
        self.rows, self.cols = rows - r0, cols - c0

    def raw(self, t0: int, t1: int) -> np.ndarray:
        """Source steps [t0, t1) of the box in target units, (t1 - t0, box_h, box_w) float64."""
        values = np.asarray(self.box.isel(time=slice(t0, t1)).values, dtype=np.float64)
        return values * self.series.scale + self.series.offset

    def expand(self, daily: np.ndarray, day0: np.datetime64) -> np.ndarray:
        out = daily[:, self.rows, self.cols]
        bad = ~np.isfinite(out)
        if bad.any():
            d, i, j = np.argwhere(bad)[0]
            cell_lat = float(self.box["lat"].values[self.rows[i, j]])
            cell_lon = float(self.box["lon"].values[self.cols[i, j]])
            raise DataError(self.series.path, f"variable '{self.series.data.name}'",
                            f"is missing (NaN) on {day0 + int(d)} at the reanalysis cell lat "
                            f"{cell_lat:.3f}, lon {cell_lon:.3f} used by the glacier (a sea cell of "
                            "a land-only reanalysis?)")
        return out


def _read_days(reader: _BoxReader, step: str, role: str, day0: np.datetime64, n: int) -> np.ndarray:
    """Daily values (n, box_h, box_w) of days day0 … day0 + n − 1 (°C or m w.e. per day)."""
    s = reader.series
    if step == "daily":
        t0 = int((day0 - s.times[0].astype("datetime64[D]")).astype(int))
        return reader.raw(t0, t0 + n)
    if step == "hourly":
        hour = np.timedelta64(1, "h")
        # Temperature: 00 … 23 UTC of each day; precipitation: 01 UTC … 00 UTC of the next day.
        start = day0.astype("datetime64[h]") + (1 if role == "precipitation" else 0)
        t0 = int((start - s.times[0]) // hour)
        hours = reader.raw(t0, t0 + 24 * n).reshape(n, 24, *reader.box.shape[1:])
        if role == "temperature":
            return hours.mean(axis=1)
        # Accumulated from 00 UTC: hours 01 … 24 of a day never decrease; the last is the total.
        drop = np.diff(hours, axis=1, prepend=0.0).min()
        if drop < -ACCUMULATION_TOLERANCE:
            raise DataError(s.path, f"variable '{s.data.name}'",
                            f"decreases by {-drop:.4g} m within a day around {day0}: expected "
                            "ERA5-Land hourly precipitation accumulated from 00 UTC")
        return hours[:, -1]
    return _monthly_days(reader, role, day0, n)


def _month_start(month: np.datetime64) -> np.datetime64:
    return month.astype("datetime64[D]")


def _between_mid_months(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                        days: np.ndarray, origin: np.datetime64) -> np.ndarray:
    """Daily values (days, bh, bw) linear in time between the months' mid-points; the first
    (last) value holds before (after) the first (last) mid-point."""
    mids = (starts - origin).astype(float) + lengths / 2.0
    centres = (days - origin).astype(float) + 0.5
    if mids.size == 1:
        return np.repeat(values, days.size, axis=0)
    k = np.clip(np.searchsorted(mids, centres) - 1, 0, mids.size - 2)
    w = np.clip((centres - mids[k]) / (mids[k + 1] - mids[k]), 0.0, 1.0)[:, None, None]
    return (1.0 - w) * values[k] + w * values[k + 1]


def _monthly_days(reader: _BoxReader, role: str, day0: np.datetime64, n: int) -> np.ndarray:
    s = reader.series
    months = s.times.astype("datetime64[M]")
    first_m = day0.astype("datetime64[M]")
    last_m = (day0 + n - 1).astype("datetime64[M]")
    m0 = int((first_m - months[0]).astype(int))
    m1 = int((last_m - months[0]).astype(int))
    # Temperature interpolates towards the neighbouring months' mid-points.
    lo = max(m0 - 1, 0) if role == "temperature" else m0
    hi = min(m1 + 1, months.size - 1) if role == "temperature" else m1
    values = reader.raw(lo, hi + 1)  # (months, bh, bw)
    month_list = months[lo:hi + 1]
    starts = np.array([_month_start(m) for m in month_list])
    ends = np.array([_month_start(m + 1) for m in month_list])
    lengths = (ends - starts).astype(int)
    span_start = _month_start(first_m)
    span_end = _month_start(last_m + 1)
    days = np.arange(span_start, span_end)  # whole months m0 … m1
    month_of_day = np.searchsorted(starts, days, side="right") - 1
    if role == "precipitation":
        daily = values[month_of_day]
    else:
        # A fixed origin keeps the values independent of where chunks start.
        daily = _between_mid_months(values, starts, lengths, days, _month_start(months[0]))
        # Shift each month so its mean is exactly the monthly value.
        for m in np.unique(month_of_day):
            in_month = month_of_day == m
            daily[in_month] += values[m] - daily[in_month].mean(axis=0)
    offset = int((day0 - span_start).astype(int))
    return daily[offset:offset + n]


# ---------------------------------------------------------------------------------------------
# Writing

TEMPERATURE_ATTRS = {"units": "degC", "long_name": "daily mean 2 m air temperature at orography height"}
PRECIPITATION_ATTRS = {"units": "m", "long_name": "daily total precipitation (m water equivalent per day)"}
OROGRAPHY_ATTRS = {"units": "m", "long_name": "reanalysis model orography height"}


def _slab(reader: _BoxReader, step: str, role: str, first_date: np.datetime64, chunk_days: int):
    """``slab(d0, d1)`` for :func:`layout.write_daily`, reading the source ``chunk_days`` at a time."""
    def slab(d0: int, d1: int) -> np.ndarray:
        parts = []
        for a in range(d0, d1, chunk_days):
            b = min(a + chunk_days, d1)
            day = first_date + a
            daily = reader.expand(_read_days(reader, step, role, day, b - a), day)
            if role == "precipitation":
                daily = np.maximum(daily, 0.0)  # reanalysis packing leaves tiny negative totals
            parts.append(daily.astype(np.float32))
        return np.concatenate(parts)
    return slab


def write_climate(folder, climate: Climate, x: np.ndarray, y: np.ndarray, epsg: int,
                  lon: np.ndarray, lat: np.ndarray, first_date, last_date,
                  chunk_days: int = 366) -> dict:
    """Write ``temperature.nc``, ``precipitation.nc`` and ``orography.nc`` into ``folder``.

    Args:
        folder: existing output folder.
        climate: from :func:`open_climate`.
        x, y: (W,), (H,) cell-centre coordinates (m) of the glacier grid in ``epsg``.
        lon, lat: (H, W) the same cell centres in EPSG:4326.
        first_date, last_date: first and last day written (inclusive).
        chunk_days: days read from a source at a time (bounds memory; the files do not depend on it).

    Returns:
        JSON-ready diagnostics: time step, disaggregation method, the distinct reanalysis cells
        used (lon, lat, orography height), the period written.

    Raises:
        DataError: the climate does not cover the grid or [first_date, last_date]; grids of the
            three files differ; NaN at a cell used.
    """
    folder = Path(folder)
    first_date = np.datetime64(first_date, "D")
    last_date = np.datetime64(last_date, "D")
    if last_date < first_date:
        raise ValueError(f"last_date {last_date} is before first_date {first_date}")
    for role in ("temperature", "precipitation"):
        series = getattr(climate, role)
        first, last = _covered_days(series, climate.step, role)
        if first > first_date or last < last_date:
            raise DataError(series.path, None,
                            f"covers {first} … {last}, expected at least {first_date} … {last_date}")
    rows, cols = nearest_cells(climate, lon, lat)
    p = climate.precipitation
    p_rows, p_cols = _match(climate.lat, climate.lon, rows, cols, p.lat, p.lon, p.path)
    o_rows, o_cols = _match(climate.lat, climate.lon, rows, cols, climate.orography_lat,
                            climate.orography_lon, climate.paths["orography"])
    elevation = climate.orography[o_rows, o_cols]
    if not np.all(np.isfinite(elevation)):
        raise DataError(climate.paths["orography"], None, "is NaN at a reanalysis cell the glacier uses")

    n_days = int((last_date - first_date).astype(int)) + 1
    grid = (np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), int(epsg))
    write_daily(folder / "temperature.nc", "temperature_2m", TEMPERATURE_ATTRS, *grid, first_date,
                n_days, _slab(_BoxReader(climate.temperature, rows, cols), climate.step,
                              "temperature", first_date, chunk_days))
    write_daily(folder / "precipitation.nc", "total_precipitation_sum", PRECIPITATION_ATTRS, *grid,
                first_date, n_days, _slab(_BoxReader(p, p_rows, p_cols), climate.step,
                                          "precipitation", first_date, chunk_days))
    write_static(folder / "orography.nc", "elevation", OROGRAPHY_ATTRS, elevation, *grid)

    flat = (rows * climate.lon.size + cols).ravel()
    _, first_cell, counts = np.unique(flat, return_index=True, return_counts=True)
    cells = [{"lat": round(float(climate.lat[rows.flat[k]]), 4),
              "lon": round(float(_to_convention(climate.lon[cols.flat[k]], np.zeros(1))), 4),
              "orography_m": round(float(elevation.flat[k]), 1), "grid_cells": int(count)}
             for k, count in zip(first_cell, counts)]
    return {
        "time_step": climate.step,
        "disaggregation": (
            "precipitation: monthly daily rate every day; temperature: linear between mid-month "
            "values, shifted per month to preserve monthly means" if climate.step == "monthly"
            else "hourly -> daily: mean T of 00-23 UTC, P = accumulation at 00 UTC next day"
            if climate.step == "hourly" else None),
        "n_reanalysis_cells": len(cells),
        "reanalysis_cells": cells,
        "first_date": str(first_date),
        "last_date": str(last_date),
        "n_days": n_days,
        "sources": {k: str(v) for k, v in climate.paths.items()},
    }
