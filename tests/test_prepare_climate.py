"""Reanalysis climate -> the daily climate files of the published layout, on small synthetic
NetCDFs whose answer is known (units, nearest neighbour, hourly and monthly time steps, coverage,
chunked reading) and on the real ERA5-Land monthly files around Hintereisferner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import dataloader.prepare.climate as climate_module
from conftest import EXAMPLE_SOURCES
from dataloader.errors import DataError
from dataloader.prepare.climate import G, nearest_cells, open_climate, write_climate

EPSG = 32632
# A 2 x 3 glacier grid whose cell centres straddle the boundary 10.75 E between two reanalysis
# columns and the boundary 46.85 N between two rows (ERA5 order: latitude descending).
LON = np.array([[10.72, 10.76, 10.79], [10.72, 10.76, 10.79]])
LAT = np.array([[46.87, 46.87, 46.87], [46.83, 46.83, 46.83]])
X = 640050.0 + 100.0 * np.arange(3)
Y = 5190050.0 - 100.0 * np.arange(2)
CLIMATE_LAT = np.array([47.0, 46.9, 46.8])
CLIMATE_LON = np.array([10.6, 10.7, 10.8, 10.9])
# Expected nearest cell of each grid cell: rows into CLIMATE_LAT, columns into CLIMATE_LON.
ROWS = np.array([[1, 1, 1], [2, 2, 2]])
COLS = np.array([[1, 2, 2], [1, 2, 2]])


def cell_code(n_lat=3, n_lon=4) -> np.ndarray:
    """(lat, lon) value 10·row + col identifying each reanalysis cell."""
    return 10.0 * np.arange(n_lat)[:, None] + np.arange(n_lon)[None, :]


def dataset(name, values, times, units, lat=CLIMATE_LAT, lon=CLIMATE_LON, time_name="time",
            lat_name="latitude", lon_name="longitude", extra_dim=None) -> xr.Dataset:
    dims = (time_name, lat_name, lon_name)
    coords = {time_name: times, lat_name: lat, lon_name: lon}
    var = xr.DataArray(values, dims=dims, coords=coords, attrs={"units": units})
    if extra_dim:
        var = var.expand_dims(extra_dim, axis=1)
    return xr.Dataset({name: var})


def orography_file(path: Path, heights: np.ndarray, lat=CLIMATE_LAT, lon=CLIMATE_LON) -> Path:
    """Geopotential with a length-1 time dimension, as ERA5-Land's invariant file has it."""
    ds = dataset("z", (heights * G)[None], pd.to_datetime(["1981-01-01"]), "m**2 s**-2", lat, lon)
    ds.to_netcdf(path)
    return path


HEIGHTS = 2000.0 + 100.0 * cell_code()


def daily_files(tmp_path: Path, start="1990-01-01", n_days=40, t_units="K", **kw) -> tuple[Path, Path, Path]:
    """Daily T = code + day/100 (+273.15 in K), P = (code + day)/1000 m; known per cell and day."""
    times = pd.date_range(start, periods=n_days, freq="D")
    day = np.arange(n_days)[:, None, None]
    t = cell_code() + day / 100.0 + (273.15 if t_units == "K" else 0.0)
    p = (cell_code() + day) / 1000.0
    dataset("t2m", t, times, t_units, **kw).to_netcdf(tmp_path / "t.nc")
    dataset("tp", p, times, "m", **kw).to_netcdf(tmp_path / "p.nc")
    return tmp_path / "t.nc", tmp_path / "p.nc", orography_file(tmp_path / "z.nc", HEIGHTS)


def read(folder: Path, file: str, name: str) -> np.ndarray:
    with xr.open_dataset(folder / file) as ds:
        return ds[name].values


def write(tmp_path, files, first, last, monthly=False, lon=LON, lat=LAT, **kw):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    with open_climate(*files, monthly=monthly) as climate:
        diag = write_climate(out, climate, X, Y, EPSG, lon, lat, first, last, **kw)
    return out, diag


def test_daily_kelvin_nearest_neighbour_and_layout(tmp_path):
    files = daily_files(tmp_path, extra_dim="expver")  # an extra length-1 dim is squeezed
    out, diag = write(tmp_path, files, "1990-01-03", "1990-01-12")
    temperature = read(out, "temperature.nc", "temperature_2m")
    code = cell_code()[ROWS, COLS]  # (2, 3)
    day = np.arange(2, 12)[:, None, None]
    np.testing.assert_allclose(temperature, code + day / 100.0, atol=1e-4)
    precipitation = read(out, "precipitation.nc", "total_precipitation_sum")
    np.testing.assert_allclose(precipitation, (code + day) / 1000.0, rtol=1e-6)
    np.testing.assert_allclose(read(out, "orography.nc", "elevation"), HEIGHTS[ROWS, COLS], atol=1e-3)
    with xr.open_dataset(out / "temperature.nc", decode_times=False) as ds:
        assert ds["time"].dtype == np.int32
        assert ds["time"].attrs["units"] == "days since 1990-01-03"
        assert ds["temperature_2m"].dims == ("time", "y", "x")
        np.testing.assert_array_equal(ds["x"].values, X)
        np.testing.assert_array_equal(ds["y"].values, Y)
    assert diag["time_step"] == "daily" and diag["n_days"] == 10
    assert diag["n_reanalysis_cells"] == 4
    assert sorted(c["grid_cells"] for c in diag["reanalysis_cells"]) == [1, 1, 2, 2]


def test_nearest_cells_celsius_and_lat_lon_names(tmp_path):
    files = daily_files(tmp_path, t_units="degC", lat_name="lat", lon_name="lon")
    with open_climate(*files) as climate:
        rows, cols = nearest_cells(climate, LON, LAT)
        assert climate.step == "daily"
        assert climate.first_day == np.datetime64("1990-01-01")
        assert climate.last_day == np.datetime64("1990-02-09")
    np.testing.assert_array_equal(rows, ROWS)
    np.testing.assert_array_equal(cols, COLS)
    out, _ = write(tmp_path, files, "1990-01-01", "1990-01-01")
    np.testing.assert_allclose(read(out, "temperature.nc", "temperature_2m")[0],
                               cell_code()[ROWS, COLS], atol=1e-5)


def hourly_files(tmp_path: Path, hourly_amount: np.ndarray, accumulated=True) -> tuple[Path, Path, Path]:
    """Hourly files with the CDS name 'valid_time', from 1990-01-01 00 UTC to 1990-01-04 00 UTC.

    ``hourly_amount``: (72,) precipitation of the hours ending 01 … 24 UTC of days 0–2 (m), the
    same in every cell. ERA5-Land stores the running total since 00 UTC, so the value at 01 UTC
    is the first hour's amount and the value at 00 UTC is the whole previous day.
    """
    times = pd.date_range("1990-01-01 00:00", "1990-01-04 00:00", freq="h")  # 73 values
    hours = np.arange(times.size)
    t = 273.15 + np.sin(hours / 3.0)[:, None, None] + cell_code()  # daily means known below
    per_hour = np.concatenate([[0.0], hourly_amount])  # amount of the hour ending at each time
    if accumulated:
        cumulative = np.zeros(times.size)
        for k in range(1, times.size):
            # The accumulation restarts after each 00 UTC value.
            cumulative[k] = per_hour[k] + (cumulative[k - 1] if (k - 1) % 24 != 0 else 0.0)
        p = cumulative
    else:
        p = per_hour
    p = np.broadcast_to(p[:, None, None], (times.size, 3, 4))
    dataset("t2m", t, times, "K", time_name="valid_time", extra_dim="number").to_netcdf(tmp_path / "t.nc")
    dataset("tp", p, times, "m", time_name="valid_time").to_netcdf(tmp_path / "p.nc")
    return tmp_path / "t.nc", tmp_path / "p.nc", orography_file(tmp_path / "z.nc", HEIGHTS)


def test_hourly_to_daily_means_and_next_day_totals(tmp_path):
    rng = np.random.default_rng(0)
    amount = rng.uniform(0.0, 0.002, 72)
    files = hourly_files(tmp_path, amount)
    with open_climate(*files) as climate:
        assert climate.step == "hourly"
        # Day 3 has no 00 UTC of day 4 for its precipitation total nor its 24 temperatures.
        assert (climate.first_day, climate.last_day) == (np.datetime64("1990-01-01"),
                                                         np.datetime64("1990-01-03"))
    out, diag = write(tmp_path, files, "1990-01-01", "1990-01-03", chunk_days=2)
    precipitation = read(out, "precipitation.nc", "total_precipitation_sum")
    np.testing.assert_allclose(precipitation[:, 0, 0], amount.reshape(3, 24).sum(axis=1), rtol=1e-6)
    temperature = read(out, "temperature.nc", "temperature_2m")
    expected = np.sin(np.arange(72) / 3.0).reshape(3, 24).mean(axis=1)
    np.testing.assert_allclose(temperature[:, 1, 2], expected + cell_code()[2, 2], atol=1e-5)
    assert diag["time_step"] == "hourly"
    with pytest.raises(DataError, match=r"t\.nc: covers 1990-01-01 … 1990-01-03"):
        write(tmp_path, files, "1990-01-01", "1990-01-04")


def test_hourly_per_hour_amounts_are_refused(tmp_path):
    # ERA5 (not -Land) stores each hour's amount: the "accumulation" drops within the day.
    amount = np.tile(np.r_[np.full(12, 0.002), np.zeros(12)], 3)
    files = hourly_files(tmp_path, amount, accumulated=False)
    with pytest.raises(DataError, match="p.nc: variable 'tp' decreases .* accumulated from 00 UTC"):
        write(tmp_path, files, "1990-01-01", "1990-01-03")


def monthly_files(tmp_path: Path, lon: np.ndarray, n_months=24) -> tuple[Path, Path, Path, np.ndarray, np.ndarray]:
    times = pd.date_range("1990-01-01", periods=n_months, freq="MS")
    months = np.arange(n_months)[:, None, None]
    rng = np.random.default_rng(1)
    t = 268.0 + 10.0 * np.sin(2 * np.pi * months / 12.0) + rng.normal(0, 1, (n_months, 3, lon.size))
    p = rng.uniform(0.001, 0.008, (n_months, 3, lon.size))  # m per day
    dataset("t2m", t, times, "K", lon=lon).to_netcdf(tmp_path / "t.nc")
    dataset("tp", p, times, "m", lon=lon).to_netcdf(tmp_path / "p.nc")
    heights = 2000.0 + np.zeros((3, lon.size))
    return (tmp_path / "t.nc", tmp_path / "p.nc", orography_file(tmp_path / "z.nc", heights, lon=lon),
            t - 273.15, p)


def test_monthly_disaggregation_preserves_means_with_0_360_longitudes(tmp_path, capsys):
    # A glacier at 120 W on a 0-360 grid: -119.97 E is nearest to 240.0.
    lon = np.array([239.9, 240.0, 240.1])
    *files, t_monthly, p_monthly = monthly_files(tmp_path, lon)
    glacier_lon = np.full((2, 3), -119.97)
    out, diag = write(tmp_path, files, "1990-01-01", "1991-12-31", monthly=True, lon=glacier_lon,
                      chunk_days=45)  # chunks end mid-month
    assert "WARNING" in capsys.readouterr().err
    assert diag["disaggregation"].startswith("precipitation: monthly daily rate")
    temperature = read(out, "temperature.nc", "temperature_2m")[:, 0, 0]  # cell (1, 1)
    precipitation = read(out, "precipitation.nc", "total_precipitation_sum")[:, 0, 0]
    month = pd.date_range("1990-01-01", "1991-12-31", freq="D").to_period("M")
    t_means = pd.Series(temperature, index=month).groupby(level=0).mean().values
    p_totals = pd.Series(precipitation, index=month).groupby(level=0).sum().values
    np.testing.assert_allclose(t_means, t_monthly[:, 1, 1], atol=1e-4)
    days_in_month = pd.period_range("1990-01", periods=24, freq="M").days_in_month.values
    np.testing.assert_allclose(p_totals, p_monthly[:, 1, 1] * days_in_month, rtol=1e-5)
    # The temperature follows a cycle within a month rather than a constant.
    assert np.ptp(temperature[:31]) > 0.5
    # Chunks that end mid-month give the same days as one chunk.
    (tmp_path / "one").mkdir()
    with open_climate(*files, monthly=True) as climate:
        write_climate(tmp_path / "one", climate, X, Y, EPSG, glacier_lon, LAT, "1990-01-01",
                      "1991-12-31", chunk_days=731)
    np.testing.assert_array_equal(read(tmp_path / "one", "temperature.nc", "temperature_2m")[:, 0, 0],
                                  temperature)


def test_monthly_needs_the_flag_and_daily_refuses_it(tmp_path):
    *files, _, _ = monthly_files(tmp_path, CLIMATE_LON)
    with pytest.raises(DataError, match="monthly means; pass --monthly_climate"):
        open_climate(*files)
    (tmp_path / "daily").mkdir()
    daily = daily_files(tmp_path / "daily")
    with pytest.raises(DataError, match="is daily, not monthly"):
        open_climate(*daily, monthly=True)


def test_chunked_reading_gives_identical_files_and_bounded_reads(tmp_path, monkeypatch):
    files = daily_files(tmp_path, n_days=40)
    whole, _ = write(tmp_path, files, "1990-01-01", "1990-02-09")
    reads = []
    original = climate_module._BoxReader.raw

    def spy(self, t0, t1):
        reads.append(t1 - t0)
        return original(self, t0, t1)

    monkeypatch.setattr(climate_module._BoxReader, "raw", spy)
    (tmp_path / "chunked").mkdir()
    with open_climate(*files) as climate:
        write_climate(tmp_path / "chunked", climate, X, Y, EPSG, LON, LAT, "1990-01-01",
                      "1990-02-09", chunk_days=7)
    assert max(reads) == 7 and sum(reads) == 2 * 40
    for file, name in (("temperature.nc", "temperature_2m"),
                       ("precipitation.nc", "total_precipitation_sum")):
        np.testing.assert_array_equal(read(whole, file, name), read(tmp_path / "chunked", file, name))


def test_coverage_errors_in_space_and_time(tmp_path):
    files = daily_files(tmp_path)
    with pytest.raises(DataError, match=r"t\.nc: covers 1990-01-01 … 1990-02-09, expected at least "
                                        r"1989-12-31 … 1990-01-05"):
        write(tmp_path, files, "1989-12-31", "1990-01-05")
    # 10.96 E is more than half a cell (0.05) beyond the last column 10.9.
    far = LON.copy()
    far[0, 0] = 10.96
    with pytest.raises(DataError, match="coordinate 'longitude' spans 10.6000…10.9000"):
        write(tmp_path, files, "1990-01-01", "1990-01-05", lon=far)
    # Within half a cell is still the edge cell.
    near = LON.copy()
    near[0, 0] = 10.94
    with open_climate(*files) as climate:
        assert nearest_cells(climate, near, LAT)[1][0, 0] == 3


def test_unknown_units_and_variables(tmp_path):
    t, p, z = daily_files(tmp_path)
    times = pd.date_range("1990-01-01", periods=3, freq="D")
    dataset("t2m", np.zeros((3, 3, 4)), times, "degF").to_netcdf(tmp_path / "f.nc")
    with pytest.raises(DataError, match=r"f\.nc: variable 't2m' has units 'degF', expected K or °C"):
        open_climate(tmp_path / "f.nc", p, z)
    ds = dataset("a", np.zeros((3, 3, 4)), times, "K")
    ds["b"] = ds["a"]
    ds.to_netcdf(tmp_path / "two.nc")
    with pytest.raises(DataError, match=r"two\.nc: has no variable 't2m' .*\['a', 'b'\]"):
        open_climate(tmp_path / "two.nc", p, z)
    dataset("z", np.zeros((1, 3, 4)), times[:1], "ft").to_netcdf(tmp_path / "zft.nc")
    with pytest.raises(DataError, match=r"zft\.nc: variable 'z' has units 'ft'"):
        open_climate(t, p, tmp_path / "zft.nc")


def test_sea_cell_nan_is_an_error(tmp_path):
    times = pd.date_range("1990-01-01", periods=5, freq="D")
    values = np.full((5, 3, 4), 270.0)
    values[:, 1, 1] = np.nan  # the land-only reanalysis has no value at a cell the glacier uses
    dataset("t2m", values, times, "K").to_netcdf(tmp_path / "t.nc")
    dataset("tp", np.zeros((5, 3, 4)), times, "m").to_netcdf(tmp_path / "p.nc")
    z = orography_file(tmp_path / "z.nc", HEIGHTS)
    with pytest.raises(DataError, match=r"t\.nc: variable 't2m' is missing \(NaN\) on 1990-01-01 "
                                        r"at the reanalysis cell lat 46.900, lon 10.700"):
        write(tmp_path, (tmp_path / "t.nc", tmp_path / "p.nc", z), "1990-01-01", "1990-01-05")


def real_source(name: str) -> Path:
    return EXAMPLE_SOURCES / name


def test_real_era5_land_monthly_around_hintereisferner(tmp_path):
    import pyproj

    files = [real_source(n) for n in ("sel_era5_land_monthly_t2m_1981-2018.nc",
                                      "sel_era5_land_monthly_prcp_1981-2018.nc",
                                      "sel_era5_land_invariant.nc")]
    # 30 x 40 cells of 100 m centred on Hintereisferner (10.76 E, 46.80 N), UTM 32N.
    east, north = pyproj.Transformer.from_crs(4326, EPSG, always_xy=True).transform(10.76, 46.80)
    x = round(east, -2) - 2000 + 50 + 100.0 * np.arange(40)
    y = round(north, -2) + 1500 - 50 - 100.0 * np.arange(30)
    lon, lat = pyproj.Transformer.from_crs(EPSG, 4326, always_xy=True).transform(*np.meshgrid(x, y))
    out = tmp_path / "hef"
    out.mkdir()
    with open_climate(*files, monthly=True) as climate:
        diag = write_climate(out, climate, x, y, EPSG, lon, lat, "1989-10-01", "2018-09-30")
    assert diag["n_days"] == 10592
    assert {(c["lon"], c["lat"]) for c in diag["reanalysis_cells"]} == {(10.7, 46.8), (10.8, 46.8)}
    orography = read(out, "orography.nc", "elevation")
    assert 2000 < orography.min() and orography.max() < 3000
    temperature = read(out, "temperature.nc", "temperature_2m")
    precipitation = read(out, "precipitation.nc", "total_precipitation_sum")
    # At ~2600-2800 m in the Oetztal Alps: mean annual T a few degrees below zero, about 1 m of
    # precipitation per year, summer (JJA) mean T above zero.
    assert -6.0 < temperature.mean() < -1.0
    annual = precipitation[:, 0, 0].sum() / 29.0
    assert 0.7 < annual < 1.8
    dates = pd.date_range("1989-10-01", "2018-09-30", freq="D")
    summer = dates.month.isin([6, 7, 8])
    assert temperature[summer].mean() > 2.0
    assert np.all(precipitation >= 0.0)
