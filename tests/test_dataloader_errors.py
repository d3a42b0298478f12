"""Bad input: a copy of the tiny dataset, broken in one place, must raise DataError naming the
file and the field."""

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from dataloader import DataError, Dataset

GLACIER = "Synth Ferner"


@pytest.fixture
def data(tiny_reference_copy) -> Path:
    return tiny_reference_copy


def edit_netcdf(path: Path, change) -> None:
    """Rewrite a NetCDF file with `change(dataset) -> dataset` applied."""
    with xr.open_dataset(path) as ds:
        ds = change(ds.load())
    path.unlink()
    ds.to_netcdf(path)


def edit_text(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def drop_csv_line(path: Path, start: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if not line.startswith(start)))


def set_value(var: str, index: tuple, value: float):
    def change(ds):
        values = ds[var].values.copy()
        values[index] = value
        ds[var] = (ds[var].dims, values, ds[var].attrs)
        return ds
    return change


def drop_day(ds):
    return ds.isel(time=np.r_[0:100, 101 : ds.sizes["time"]])


CASES = {
    "missing file": (
        lambda g: (g / "dem.nc").unlink(), ["dem.nc", "missing"]),
    "missing variable": (
        lambda g: edit_netcdf(g / "dem.nc", lambda ds: ds.rename_vars(zstddev="zstd")),
        ["dem.nc", "variable 'zstddev'", "missing"]),
    "dimension order": (
        lambda g: edit_netcdf(g / "temperature.nc", lambda ds: ds.transpose("x", "y", "time")),
        ["temperature.nc", "variable 'temperature_2m'", "dims ('x', 'y', 'time'), expected ('time', 'y', 'x')"]),
    "shifted coordinates": (
        lambda g: edit_netcdf(g / "orography.nc", lambda ds: ds.assign_coords(x=ds.x + 0.001)),
        ["orography.nc", "coordinate 'x'", "bit-identical"]),
    "cropped raster": (
        lambda g: edit_netcdf(g / "dem.nc", lambda ds: ds.isel(y=slice(0, 11))),
        ["dem.nc", "coordinate 'y'", "11 values, expected 12"]),
    "index size": (
        lambda g: edit_text(g.parent / "index.csv", "0,ALP,1998,12,17", "0,ALP,1998,13,17"),
        ["outlines.nc", "13 × 17", "index.csv"]),
    "NaN in climate": (
        lambda g: edit_netcdf(g / "precipitation.nc", set_value("total_precipitation_sum", (400, 2, 3), np.nan)),
        ["precipitation.nc", "variable 'total_precipitation_sum'", "NaN", "1990-11-05"]),
    "Kelvin": (
        lambda g: edit_netcdf(g / "temperature.nc", lambda ds: ds.assign(temperature_2m=ds.temperature_2m + 273.15)),
        ["temperature.nc", "variable 'temperature_2m'", "Kelvin"]),
    "year missing in total_smb": (
        lambda g: drop_csv_line(g / "total_smb.csv", "1993,"),
        ["total_smb.csv", "column 'year'", "lacks [1993]"]),
    "year repeated in total_smb": (
        lambda g: edit_text(g / "total_smb.csv", "1994,1993-", "1993,1993-"),
        ["total_smb.csv", "column 'year'", "repeats [1993]"]),
    "year missing in dem": (
        lambda g: edit_netcdf(g / "dem.nc", lambda ds: ds.drop_sel(year=1991)),
        ["dem.nc", "coordinate 'year'", "lacks [1991]"]),
    "year missing in outlines": (
        lambda g: edit_netcdf(g / "outlines.nc", lambda ds: ds.drop_sel(year=1998)),
        ["outlines.nc", "coordinate 'year'", "lacks [1998]"]),
    "unparsable date": (
        lambda g: edit_text(g / "total_smb.csv", "1995,1994-09-27", "1995,27.09.1994"),
        ["total_smb.csv", "column 'begin_date', line 7", "'27.09.1994'"]),
    "midseason outside the year": (
        lambda g: edit_text(g / "total_smb.csv", "1995-05-04", "1995-11-04"),
        ["total_smb.csv", "column 'midseason_date', line 7", "expected within [1994-09-27, 1995-10-04]"]),
    "season outside climate": (
        lambda g: edit_text(g / "total_smb.csv", "1990,1989-10-01", "1990,1989-09-01"),
        ["total_smb.csv", "year 1990", "outside the climate series"]),
    "gap in climate": (
        lambda g: [edit_netcdf(g / f, drop_day) for f in ("temperature.nc", "precipitation.nc")],
        ["temperature.nc", "coordinate 'time'", "not consecutive", "1990-01-08 is followed by 1990-01-10"]),
    "stake outside the grid": (
        lambda g: edit_text(g / "point_smb.csv", "1995,SF03,winter,1994-09-27,1995-05-01,46.8119127",
                            "1995,SF03,winter,1994-09-27,1995-05-01,46.9119127"),
        ["point_smb.csv", "point 'SF03', line 22", "outside the grid"]),
    "unknown balance code": (
        lambda g: edit_text(g / "point_smb.csv", "1996,SF01,annual", "1996,SF01,yearly"),
        ["point_smb.csv", "column 'balance_code'", "'yearly'"]),
    "missing CRS": (
        lambda g: edit_netcdf(g / "outlines.nc", lambda ds: ds.drop_vars("spatial_ref")),
        ["outlines.nc", "variable 'spatial_ref'", "missing"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_data_error(data, case):
    breaks, expected = CASES[case]
    breaks(data / GLACIER)
    with pytest.raises(DataError) as error:
        Dataset(data, use_cache=False).glacier(GLACIER)
    for text in expected:
        assert text in str(error.value)


def test_missing_index_column(data):
    edit_text(data / "index.csv", "max_year", "last_year")
    with pytest.raises(DataError, match=r"index.csv: columns \['max_year'\] are missing"):
        Dataset(data)


def test_bad_normalisation_factors(data):
    import pickle
    (data / "normalisation_factors.pkl").write_bytes(pickle.dumps({"t_monthly": 1.0}))
    with pytest.raises(DataError, match=r"normalisation_factors.pkl: key 'elevation'"):
        Dataset(data)


@pytest.mark.parametrize("prefetch", [False, True])
def test_streaming_error_names_the_glacier(data, prefetch):
    (data / "Syntetbreen" / "outlines.nc").unlink()
    loaded = []
    with pytest.raises(DataError, match="Syntetbreen/outlines.nc") as error:
        for glacier in Dataset(data, use_cache=False).iter_glaciers(prefetch=prefetch):
            loaded.append(glacier.name)
    assert loaded == ["Synth Ferner"]  # the error surfaces in order, not swallowed
    assert any("'Syntetbreen'" in note for note in error.value.__notes__)
