"""The daily climate is stored as its distinct cell series (`temperature_2m`, `precipitation`
(D, C)) plus one shared map `climate_cell` (H, W): expanding the columns must give the files'
(D, H, W) arrays bit for bit, read here directly with xarray, for any data and whichever path
the reader takes (one pass, several windows, second pass, hash collisions)."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import xarray as xr

import dataloader.climate_columns as climate_columns
from dataloader import Dataset

GLACIER = "Synth Ferner"


def raw_climate(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(D, H, W) float32 temperature and precipitation as stored in the files."""
    with xr.open_dataset(folder / "temperature.nc") as t, xr.open_dataset(folder / "precipitation.nc") as p:
        return (t["temperature_2m"].values.astype(np.float32),
                p["total_precipitation_sum"].values.astype(np.float32))


def check_columns(glacier, folder: Path) -> int:
    """Assert the column contract against the raw files; returns C."""
    temperature, precipitation = raw_climate(folder)
    cell = glacier.climate_cell
    n_columns = glacier.temperature_2m.shape[1]
    assert cell.dtype == np.int32 and cell.shape == temperature.shape[1:]
    assert glacier.temperature_2m.dtype == glacier.precipitation.dtype == np.float32
    assert glacier.temperature_2m.shape == glacier.precipitation.shape == (len(temperature), n_columns)
    assert glacier.n_days == len(temperature)
    # Bit for bit (0.0 and -0.0 differ, so compare the bits, not the values).
    for columns, raw in ((glacier.temperature_2m, temperature), (glacier.precipitation, precipitation)):
        np.testing.assert_array_equal(np.asarray(columns)[:, cell].view(np.uint32), raw.view(np.uint32))
    # Every column is used and columns are numbered by their first cell in row-major order.
    used, first = np.unique(cell.ravel(), return_index=True)
    np.testing.assert_array_equal(used, np.arange(n_columns))
    assert (np.diff(first) > 0).all()
    # No two columns are identical in both variables: C is the number of distinct cell series.
    both = np.concatenate([glacier.temperature_2m, glacier.precipitation]).view(np.uint32).T
    assert len(np.unique(both, axis=0)) == n_columns
    return n_columns


@pytest.fixture(scope="module")
def reference(tiny_reference_dataset):
    return tiny_reference_dataset


@pytest.fixture
def data(tiny_reference_copy) -> Path:
    """A writable copy of the tiny reference dataset."""
    return tiny_reference_copy


def edit_variable(path: Path, variable: str, change) -> None:
    """Rewrite `variable` of a NetCDF file with `change(values)` applied in place."""
    with xr.open_dataset(path) as ds:
        ds = ds.load()
    values = ds[variable].values.copy()
    change(values)
    ds[variable] = (ds[variable].dims, values, ds[variable].attrs)
    path.unlink()
    ds.to_netcdf(path)


def small_windows(monkeypatch, days: int = 250) -> None:
    """Read the climate in windows of `days` days (the tiny files are one HDF5 chunk)."""
    monkeypatch.setattr(climate_columns, "_day_windows", lambda variables, n_days, n_cells: [
        (start, min(start + days, n_days)) for start in range(0, n_days, days)])


# Each path of `read_climate` must give the same columns.
PATHS = {
    "one pass": lambda mp: None,
    "small windows": lambda mp: small_windows(mp),
    "second pass": lambda mp: (small_windows(mp), mp.setattr(climate_columns, "CLIMATE_KEEP_VALUES", 0)),
    "hash collisions": lambda mp: (small_windows(mp), mp.setattr(
        climate_columns, "_column_hash", lambda bits, seed: np.zeros(bits.shape[1], np.uint64))),
}


# --- the datasets as they are -------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [("Synth Ferner", 4), ("Syntetbreen", 2), ("Synthgletscher", 2)])
def test_reference_columns_reproduce_the_files(reference, name, expected):
    glacier = reference.glacier(name)
    assert check_columns(glacier, reference.folder / name) == expected  # blocks of the reanalysis
    assert isinstance(glacier.temperature_2m, np.memmap)


def test_twin_columns_reproduce_the_files(tiny_twin):
    dataset = Dataset(tiny_twin, use_cache=False)
    for name in dataset.names:
        glacier = dataset.glacier(name)
        assert check_columns(glacier, tiny_twin / name) < glacier.climate_cell.size / 10


@pytest.mark.parametrize("name", ["Synth Ferner", "Syntetbreen", "Synthgletscher"])
def test_monthly_climate_bit_identical_to_the_full_grid(reference, name):
    """climate_monthly as computed before on the (D, H, W) arrays: same float32 operations,
    same order, same bits (the golden numbers depend on it)."""
    glacier = reference.glacier(name)
    temperature, precipitation = raw_climate(reference.folder / name)
    t_norm, p_norm = reference.normalisation["t_monthly"], reference.normalisation["p_monthly"]
    for k in range(len(glacier.years)):
        begin, end = int(glacier.begin_day[k]), int(glacier.end_day[k])
        months = (glacier.first_date + np.arange(begin, end + 1)).astype("datetime64[M]")
        starts = begin + np.flatnonzero(np.r_[True, months[1:] != months[:-1]])
        stops = np.r_[starts[1:], end + 1]
        lapse, outlines = glacier.lapse_offset[k], glacier.outlines[k]
        expected = np.empty((2, len(starts)), np.float32)
        for m, (a, b) in enumerate(zip(starts, stops)):
            t_cells = (temperature[a:b] + lapse).mean(axis=0)
            p_cells = precipitation[a:b].mean(axis=0)
            expected[0, m] = (t_cells * outlines).sum() / outlines.sum() / np.float32(t_norm)
            expected[1, m] = (p_cells * outlines).sum() / outlines.sum() / np.float32(p_norm)
        assert glacier.n_months[k] == len(starts)
        np.testing.assert_array_equal(glacier.climate_monthly[k, :, : len(starts)], expected)


def test_climate_fields(reference):
    glacier = reference.glacier(GLACIER)
    temperature, precipitation = raw_climate(reference.folder / GLACIER)
    t, p = glacier.climate_fields(400, 430)  # inclusive
    assert t.shape == p.shape == (31, 12, 17) and t.dtype == p.dtype == np.float32
    assert type(t) is type(p) is np.ndarray  # plain arrays, not memmap-typed copies
    np.testing.assert_array_equal(t, temperature[400:431])
    np.testing.assert_array_equal(p, precipitation[400:431])
    t[0, 0, 0] = 99.0  # a new array: the cached columns are untouched
    assert glacier.temperature_2m[400, glacier.climate_cell[0, 0]] == temperature[400, 0, 0]
    last = glacier.n_days - 1
    np.testing.assert_array_equal(glacier.climate_fields(last, last)[1], precipitation[last:])
    for first, final in ((-1, 3), (5, 4), (0, glacier.n_days)):
        with pytest.raises(IndexError, match="outside"):
            glacier.climate_fields(first, final)


# --- edited data and every read path ------------------------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
def test_edited_cells_get_their_own_columns(data, monkeypatch, path):
    """Cells that leave their block in one variable only, late in the series, or by the sign of
    a zero, get their own column; the rest of the block keeps sharing one."""
    folder = data / GLACIER
    with xr.open_dataset(folder / "precipitation.nc") as ds:
        dry = int(np.flatnonzero((ds["total_precipitation_sum"].values == 0).all(axis=(1, 2)))[0])

    def temperature(values):
        values[3000, 5, 6] += np.float32(0.5)  # late: splits in the 13th window of 250 days

    def precipitation(values):
        values[10, 0, 1] += np.float32(1e-3)  # same temperature as its block, other precipitation
        values[dry, 11, 16] = -0.0  # bit-different from the 0.0 of its block

    edit_variable(folder / "temperature.nc", "temperature_2m", temperature)
    edit_variable(folder / "precipitation.nc", "total_precipitation_sum", precipitation)
    assert np.signbit(raw_climate(folder)[1][dry, 11, 16])  # the file really holds -0.0
    PATHS[path](monkeypatch)

    glacier = Dataset(data, use_cache=False).glacier(GLACIER)
    assert check_columns(glacier, folder) == 4 + 3
    cell = glacier.climate_cell
    assert cell[0, 1] == 1 and cell[0, 2] == 0 and cell[0, 9] == 2  # numbered by first cell
    assert (cell == cell[5, 6]).sum() == 1 and (cell == cell[11, 16]).sum() == 1


@pytest.mark.parametrize("path", list(PATHS))
def test_every_cell_distinct(data, monkeypatch, path):
    """The worst case, no two cells alike: C = H·W, columns in row-major cell order."""
    folder = data / GLACIER
    edit_variable(folder / "temperature.nc", "temperature_2m",
                  lambda v: v.__iadd__(np.float32(1e-3) * np.arange(v[0].size, dtype=np.float32).reshape(v[0].shape)))
    PATHS[path](monkeypatch)
    glacier = Dataset(data, use_cache=False).glacier(GLACIER)
    assert check_columns(glacier, folder) == 12 * 17
    np.testing.assert_array_equal(glacier.climate_cell.ravel(), np.arange(12 * 17))


def test_paths_agree_on_the_twin(tiny_twin, monkeypatch):
    dataset = Dataset(tiny_twin, use_cache=False)
    expected = {name: dataset.glacier(name) for name in dataset.names}
    for path in ("second pass", "hash collisions"):
        with monkeypatch.context() as mp:
            PATHS[path](mp)
            for name in dataset.names:
                glacier = dataset.glacier(name)
                for field in ("temperature_2m", "precipitation", "climate_cell", "climate_monthly"):
                    np.testing.assert_array_equal(getattr(glacier, field), getattr(expected[name], field))


def test_day_windows_follow_the_file_chunks(monkeypatch):
    monkeypatch.setattr(climate_columns, "CLIMATE_CHUNK_VALUES", 2 * 1000 * 100)  # 1000 days of 100 cells

    def windows(*chunks):
        variables = [SimpleNamespace(encoding={"chunksizes": (c, 10, 10)} if c else {}) for c in chunks]
        return climate_columns._day_windows(variables, 2500, 100)

    assert windows(133, 133)[:2] == [(0, 931), (931, 1862)]  # whole chunks of both files
    assert windows(100, 150)[0] == (0, 900)  # lcm 300
    assert windows(365, 366)[0] == (0, 732)  # lcm too long: whole chunks of the longer one
    assert windows(None, None)[-1] == (2000, 2500)
    assert windows(5000, 5000) == [(0, 2500)]  # never less than one file chunk
