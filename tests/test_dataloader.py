"""Prepared tensors of the tiny reference dataset against values derived by hand from the raw
files (read here with xarray/pandas/pyproj, not with the loader), plus folds and data-folder
resolution."""

import gc
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pyproj
import pytest
import xarray as xr

import constants
from conftest import REFERENCE
from constants import stake_codes as STAKE_CODES
from dataloader import DataError, Dataset, resolve_data_folder

TINY = REFERENCE / "tiny_dataset"
T_MONTHLY = 45.744850158691406
P_MONTHLY = 0.16851751506328583


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return Dataset(TINY, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def ferner(dataset):
    return dataset.glacier("Synth Ferner")


@pytest.fixture(scope="module")
def syntet(dataset):
    return dataset.glacier("Syntetbreen")


@pytest.fixture(scope="module")
def gletscher(dataset):
    return dataset.glacier("Synthgletscher")


def day(date: str) -> int:
    """Climate-day index of a date; the climate of the tiny dataset starts 1989-10-01."""
    return int((np.datetime64(date) - np.datetime64("1989-10-01")).astype(int))


def k_of(year: int) -> int:
    return year - 1990


# --- years, flags, grid ---------------------------------------------------------------------


def test_years_study_and_grid(ferner, syntet, gletscher):
    for g, (h, w) in ((ferner, (12, 17)), (syntet, (16, 11)), (gletscher, (9, 13))):
        np.testing.assert_array_equal(g.years, np.arange(1990, 1999))
        np.testing.assert_array_equal(g.study, g.years >= 1995)
        assert g.first_date == np.datetime64("1989-10-01")
        assert g.climate_cell.shape == (h, w) and g.n_days == 3379
        n_columns = int(g.climate_cell.max()) + 1
        assert g.temperature_2m.shape == g.precipitation.shape == (3379, n_columns)
        assert g.outlines.shape == g.lapse_offset.shape == (9, h, w)
        assert g.facies.shape == (9, 9, h, w)
        assert g.block_length == 384
    assert ferner.x[0] == 633250.0 and ferner.y[0] == 5186350.0  # docs/data_format.md §10 corner + ½ cell
    assert (ferner.fold, ferner.region, ferner.max_year) == (0, "ALP", 1998)
    np.testing.assert_array_equal(ferner.seasonal, True)
    np.testing.assert_array_equal(gletscher.seasonal, False)
    np.testing.assert_array_equal(
        syntet.seasonal, [y not in (1992, 1994, 1997) for y in range(1990, 1999)]
    )


# --- day blocks -------------------------------------------------------------------------------


def test_seasonal_block_synth_ferner_1995(ferner):
    k = k_of(1995)
    begin, mid, end = day("1994-09-27"), day("1995-05-04"), day("1995-10-04")
    assert (ferner.begin_day[k], ferner.mid_day[k], ferner.end_day[k]) == (begin, mid, end)
    n_winter, n_summer = 220, 154  # 1994-09-27 … 1995-05-04 and 1995-05-04 … 1995-10-04
    assert mid - begin + 1 == n_winter and end - mid + 1 == n_summer
    n = n_winter + n_summer
    np.testing.assert_array_equal(ferner.day_valid[k], np.arange(384) < n)
    np.testing.assert_array_equal(ferner.day_index[k, :n_winter], np.arange(begin, mid + 1))
    np.testing.assert_array_equal(ferner.day_index[k, n_winter:n], np.arange(mid, end + 1))
    np.testing.assert_array_equal(ferner.day_index[k, n:], 0)

    weight = np.zeros(384, np.float32)
    weight[:n] = 1
    weight[[0, n_winter - 1, n_winter, n - 1]] = 0.5
    np.testing.assert_array_equal(ferner.day_weight[k], weight)
    np.testing.assert_array_equal(ferner.day_season[k, :n_winter], 0)
    np.testing.assert_array_equal(ferner.day_season[k, n_winter:n], 1)
    assert np.flatnonzero(ferner.day_period_start[k]).tolist() == [0, n_winter]

    dates = ferner.dates(k)
    assert dates[0] == np.datetime64("1994-09-27")
    assert dates[n_winter - 1] == dates[n_winter] == np.datetime64("1995-05-04")
    assert dates[n - 1] == np.datetime64("1995-10-04")
    assert np.isnat(dates[n:]).all()


def test_annual_blocks(gletscher, syntet):
    k = k_of(1996)  # 1995-10-01 … 1996-09-30, a leap year: 366 days
    assert gletscher.mid_day[k] == -1
    assert gletscher.day_valid[k].sum() == 366
    np.testing.assert_array_equal(
        gletscher.day_index[k, :366], np.arange(day("1995-10-01"), day("1996-09-30") + 1)
    )
    assert gletscher.day_weight[k, [0, 365]].tolist() == [0.5, 0.5]
    assert (gletscher.day_weight[k, 1:365] == 1).all() and (gletscher.day_weight[k, 366:] == 0).all()
    assert np.flatnonzero(gletscher.day_period_start[k]).tolist() == [0]
    assert (gletscher.day_season[k] == 0).all()
    # Syntetbreen 1997 is annual-only: 1996-10-02 … 1997-10-09.
    k = k_of(1997)
    assert syntet.mid_day[k] == -1
    assert syntet.day_valid[k].sum() == day("1997-10-09") - day("1996-10-02") + 1


def test_season_days_match_total_smb(syntet):
    table = pd.read_csv(TINY / "Syntetbreen" / "total_smb.csv", parse_dates=[1, 2, 3])
    first = pd.Timestamp("1989-10-01")
    np.testing.assert_array_equal(syntet.begin_day, (table.begin_date - first).dt.days)
    np.testing.assert_array_equal(syntet.end_day, (table.end_date - first).dt.days)
    mid = ((table.midseason_date - first).dt.days).fillna(-1).astype(int)
    np.testing.assert_array_equal(syntet.mid_day, mid)


# --- lapse rate and monthly predictors ----------------------------------------------------------


def test_lapse_rate_downscaling_uses_dem_of_balance_year(ferner):
    folder = TINY / "Synth Ferner"
    with xr.open_dataset(folder / "temperature.nc") as t, xr.open_dataset(folder / "dem.nc") as dem, \
            xr.open_dataset(folder / "orography.nc") as oro:
        for year, date, row, col in ((1995, "1995-01-15", 3, 4), (1991, "1991-07-01", 0, 0),
                                     (1998, "1998-08-10", 11, 16)):
            z = float(dem.z.sel(year=year).values[row, col])
            orography = float(oro.elevation.values[row, col])
            t2m = float(t.temperature_2m.sel(time=date).values[row, col])
            expected = t2m - 0.0060 * (z - orography)
            d, k = day(date), k_of(year)
            column = ferner.climate_cell[row, col]
            assert ferner.temperature_2m[d, column] == np.float32(t2m)
            got = ferner.temperature_2m[d, column] + ferner.lapse_offset[k, row, col]
            assert got == pytest.approx(expected, rel=1e-6, abs=1e-5)
        # The geometry changes from year to year, so does the offset.
        assert not np.array_equal(ferner.lapse_offset[0], ferner.lapse_offset[8])


@pytest.mark.parametrize("name", ["Synth Ferner", "Syntetbreen", "Synthgletscher"])
def test_monthly_predictors_with_partial_months(dataset, name):
    g = dataset.glacier(name)
    folder = TINY / name
    smb = pd.read_csv(folder / "total_smb.csv")
    with xr.open_dataset(folder / "temperature.nc") as t, xr.open_dataset(folder / "precipitation.nc") as p, \
            xr.open_dataset(folder / "dem.nc") as dem, xr.open_dataset(folder / "orography.nc") as oro, \
            xr.open_dataset(folder / "outlines.nc") as outl:
        for k, row in smb.iterrows():
            window = slice(row.begin_date, row.end_date)
            surface = t.temperature_2m.sel(time=window) - 0.0060 * (dem.z.sel(year=row.year) - oro.elevation)
            mask = outl.outlines.sel(year=row.year)
            expected = []
            for series, norm in ((surface, T_MONTHLY), (p.total_precipitation_sum.sel(time=window), P_MONTHLY)):
                monthly = series.resample(time="1MS").mean()
                expected.append(((monthly * mask).sum(("y", "x")) / mask.sum() / norm).values)
            n = len(expected[0])
            assert g.n_months[k] == n
            # The loader does the float32 arithmetic of this plain xarray code (bit-identical today).
            np.testing.assert_allclose(g.climate_monthly[k, :, :n], np.stack(expected), rtol=1e-6, atol=0)
            np.testing.assert_array_equal(g.climate_monthly[k, :, n:], 0)


def test_month_counts(ferner, gletscher):
    # 1994-09-27 … 1995-10-04: Sep (4 days) + Oct … Sep + Oct (4 days) = 14 months.
    assert ferner.n_months[k_of(1995)] == 14
    # Fixed-date years 1 Oct … 30 Sep are exactly 12 months.
    np.testing.assert_array_equal(gletscher.n_months, 12)


# --- facies ---------------------------------------------------------------------------------------


def test_facies_by_balance_year(ferner, syntet):
    with xr.open_dataset(TINY / "Synth Ferner" / "facies.nc") as f:
        raw = {int(y): f.facies.sel(year=y).values for y in f.year.values}
    assert sorted(raw) == [1992, 1995, 1997]
    np.testing.assert_array_equal(ferner.has_facies, [y in raw for y in range(1990, 1999)])
    for year in (1992, 1995, 1997):  # 1992 is a spin-up year with a real map
        expected = np.where(np.isnan(raw[year]), 0, raw[year])
        np.testing.assert_array_equal(ferner.facies[k_of(year)], expected)
        assert np.isnan(raw[year]).any()  # off-glacier cells really were NaN
    for year in (1990, 1991, 1993, 1994, 1996, 1998):
        np.testing.assert_array_equal(ferner.facies[k_of(year)], -1)
    np.testing.assert_array_equal(syntet.facies, -1)  # no facies.nc
    assert not syntet.has_facies.any()


# --- glacier-wide observations --------------------------------------------------------------------


def test_glacier_wide(ferner, syntet, gletscher):
    raw = pd.read_csv(TINY / "Synthgletscher" / "total_smb.csv").set_index("year")
    assert raw.loc[1997, "winter_balance"] == 1.027  # present in the file …
    k = k_of(1997)
    assert np.isnan(gletscher.glacier_wide[k, 1])  # … but ignored: no midseason date
    assert gletscher.glacier_wide[k, 0] == np.float32(-1.049)
    assert np.isnan(gletscher.glacier_wide[:, 1:]).all()
    assert np.isnan(gletscher.glacier_wide[[k_of(1993), k_of(1996)], 0]).all()
    # Syntetbreen 1998: winter and summer missing, annual present.
    assert np.isnan(syntet.glacier_wide[k_of(1998), 1:]).all()
    assert syntet.glacier_wide[k_of(1998), 0] == np.float32(-0.866)
    # Synth Ferner 1995 has all three, ordered annual, winter, summer.
    np.testing.assert_array_equal(ferner.glacier_wide[k_of(1995)], np.float32([0.329, 1.253, -0.877]))
    assert np.isnan(ferner.glacier_wide[k_of(1990), 1:]).all()
    assert np.isnan(ferner.glacier_wide[k_of(1992)]).all()


# --- stakes -----------------------------------------------------------------------------------------


def expected_stakes(name: str, epsg: int, x_left: float, y_top: float) -> pd.DataFrame:
    """Stake rows with cell, day indices and date weight derived from the CSVs by hand."""
    points = pd.read_csv(TINY / name / "point_smb.csv", parse_dates=["begin_date", "end_date"])
    seasons = pd.read_csv(TINY / name / "total_smb.csv",
                          parse_dates=["begin_date", "midseason_date", "end_date"]).set_index("year")
    to_grid = pyproj.Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
    x, y = to_grid.transform(points.longitude.to_numpy(), points.latitude.to_numpy())
    points["col"] = np.floor((x - x_left) / 100).astype(int)
    points["row"] = np.floor((y_top - y) / 100).astype(int)
    tau = 6.355375070295649
    weights = []
    for _, p in points.iterrows():
        s = seasons.loc[p.year]
        run = {"annual": (s.begin_date, s.end_date), "winter": (s.begin_date, s.midseason_date),
               "summer": (s.midseason_date, s.end_date)}.get(p.balance_code)
        if run is None or pd.isna(run[0]) or pd.isna(run[1]):
            weights.append(0.0)  # index stakes, winter/summer stakes of annual-only years
            continue
        db, de = (p.begin_date - run[0]).days, (p.end_date - run[1]).days
        weights.append(np.exp(-((db / tau) ** 2)) * np.exp(-((de / tau) ** 2)))
    points["weight"] = weights
    first = pd.Timestamp("1989-10-01")
    points["begin_day"] = (points.begin_date - first).dt.days
    points["end_day"] = (points.end_date - first).dt.days
    return points


@pytest.mark.parametrize("name, epsg, corner", [
    ("Synth Ferner", 32632, (633200, 5186400)),  # docs/data_format.md §10
    ("Syntetbreen", 32633, (452300, 7399800)),
])
def test_stakes(dataset, name, epsg, corner):
    g = dataset.glacier(name)
    expected = expected_stakes(name, epsg, *corner)
    assert len(g.stake_id) == len(expected)  # every row is in 1990 … 1998 and has a balance
    np.testing.assert_array_equal(g.stake_id, expected.point_id)
    np.testing.assert_array_equal(g.stake_year, expected.year - 1990)
    np.testing.assert_array_equal(g.stake_code, [STAKE_CODES.index(c) for c in expected.balance_code])
    np.testing.assert_array_equal(g.stake_row, expected.row)
    np.testing.assert_array_equal(g.stake_col, expected.col)
    np.testing.assert_array_equal(g.stake_balance, expected.balance.to_numpy(np.float32))
    np.testing.assert_array_equal(g.stake_begin_day, expected.begin_day)
    np.testing.assert_array_equal(g.stake_end_day, expected.end_day)
    np.testing.assert_allclose(g.stake_weight, expected.weight, rtol=1e-6, atol=0)


def test_one_stake_cell_by_hand(ferner):
    # SF01 at 46.8146759 N, 10.7491468 E in UTM 32N.
    x, y = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:32632", always_xy=True).transform(10.7491468, 46.8146759)
    row, col = int((5186400 - y) // 100), int((x - 633200) // 100)
    first = np.flatnonzero(ferner.stake_id == "SF01")[0]
    assert (ferner.stake_row[first], ferner.stake_col[first]) == (row, col)


def test_zero_weight_stakes_are_kept(ferner, syntet):
    index = STAKE_CODES.index("index")
    for g in (ferner, syntet):
        is_index = g.stake_code == index
        assert is_index.sum() == 4  # 1995 and 1997, two stakes each
        assert (g.stake_weight[is_index] == 0).all()
    # Syntetbreen 1997 is annual-only: its winter/summer stakes are kept with weight 0.
    in_1997 = syntet.stake_year == k_of(1997)
    seasonal_codes = np.isin(syntet.stake_code, [STAKE_CODES.index("winter"), STAKE_CODES.index("summer")])
    assert (in_1997 & seasonal_codes).sum() == 8
    assert (syntet.stake_weight[in_1997 & seasonal_codes] == 0).all()
    annual_1997 = in_1997 & (syntet.stake_code == STAKE_CODES.index("annual"))
    assert (syntet.stake_weight[annual_1997] > 0).all()
    # Spin-up rows (1993) are carried too; the losses skip them through `study`.
    assert (syntet.stake_year == k_of(1993)).any()


def test_glacier_without_point_file(gletscher):
    assert gletscher.stake_id.shape == gletscher.stake_weight.shape == (0,)


# --- dataset: folds, names, data folder ---------------------------------------------------------------


def test_folds(dataset):
    assert dataset.names == ["Synth Ferner", "Syntetbreen", "Synthgletscher"]
    assert dataset.folds == {"Synth Ferner": 0, "Syntetbreen": 1, "Synthgletscher": 2}
    assert dataset.test_names == ["Synth Ferner"]
    assert dataset.val_names == ["Syntetbreen"]
    assert dataset.train_names == ["Synthgletscher"]
    assert dataset.normalisation["t_monthly"] == T_MONTHLY


def test_unknown_glacier_lists_available_names(dataset):
    with pytest.raises(DataError, match=r"'Nowhere'.*Synth Ferner.*Syntetbreen"):
        dataset.glacier("Nowhere")
    with pytest.raises(DataError, match="Nowhere"):
        dataset.iter_glaciers(["Synth Ferner", "Nowhere"])


def test_data_folder_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv("GLAUNTI_DATA_FOLDER", str(tmp_path / "from_env"))
    assert resolve_data_folder(tmp_path / "from_cli") == tmp_path / "from_cli"
    assert resolve_data_folder() == tmp_path / "from_env"
    monkeypatch.delenv("GLAUNTI_DATA_FOLDER")
    repository = Path(__file__).resolve().parents[1]
    assert resolve_data_folder() == repository / constants.data_folder
    monkeypatch.setenv("GLAUNTI_DATA_FOLDER", "")  # empty counts as unset
    assert resolve_data_folder() == repository / constants.data_folder


def test_iter_glaciers_streams_in_order(dataset):
    for prefetch in (False, True):
        names = [g.name for g in dataset.iter_glaciers(prefetch=prefetch)]
        assert names == dataset.names


@pytest.mark.parametrize("prefetch", [False, True])
def test_streaming_keeps_no_glacier_alive(dataset, prefetch):
    """Memory must not grow with the number of glaciers: once the caller moves on, neither the
    dataset nor the generator (nor its prefetch thread) holds an earlier glacier."""
    seen = []
    for glacier in dataset.iter_glaciers(prefetch=prefetch):
        seen.append(weakref.ref(glacier))
        gc.collect()
        assert all(ref() is None for ref in seen[:-1])
    assert len(seen) == 3
