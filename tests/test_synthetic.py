"""The synthetic twin (dataloader/synthetic/): published layout, determinism, plausibility,
and that the project's own loader reads it."""

from __future__ import annotations

import math
import pickle
import shutil
from pathlib import Path

import netCDF4
import numpy as np
import pandas as pd
import pyproj
import pytest
import xarray as xr

import constants
from dataloader import synthetic
from dataloader.synthetic import generate
from dataloader.synthetic.truth import PREC_PER_METRE

REQUIRED_FILES = ("temperature.nc", "precipitation.nc", "orography.nc", "dem.nc", "outlines.nc",
                  "total_smb.csv")
INDEX_COLUMNS = ["name", "wgms_name", "fold", "region", "max_year", "height", "width"]
TOTAL_COLUMNS = ["year", "begin_date", "midseason_date", "end_date", "winter_balance",
                 "summer_balance", "annual_balance"]
POINT_COLUMNS = ["year", "point_id", "balance_code", "begin_date", "end_date", "latitude",
                 "longitude", "elevation", "balance"]
FACIES_BANDS = ["ice", "snow", "debris", "firn", "shadow", "superimposed-ice", "cloud", "water",
                "confidence"]
NORMALISATION = {"elevation": 4341.383118842848, "elevation_std": 5699.1201273232155,
                 "t_monthly": 45.744850158691406, "p_monthly": 0.16851751506328583,
                 "delta_z": 2471.570922600618}
FIRST_YEAR = constants.initialisation_period_start_year
STUDY_START = constants.study_period_start_year


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A pristine tiny preset, seed 0, of this module's own: the session-wide ``tiny_twin`` also
    holds the tensor caches that other tests' runs leave in it."""
    return generate(tmp_path_factory.mktemp("pristine") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def index(tiny) -> pd.DataFrame:
    return pd.read_csv(tiny / "index.csv", keep_default_na=False)


@pytest.fixture(scope="module")
def demo_twins() -> list[synthetic.GlacierTwin]:
    """The demo preset simulated in memory (no files): more glaciers per region for statistics."""
    specs = synthetic.glacier_specs("demo", 0)
    weathers = synthetic.regional_weathers([s for _, s in specs], 0)
    return [synthetic.simulate_glacier(name, spec, i, 0, weathers[spec.region], 2003)
            for i, (name, spec) in enumerate(specs)]


def _dates(column: pd.Series) -> pd.Series:
    return pd.to_datetime(column, format="%Y-%m-%d")


# --------------------------------------------------------------------------------- layout


def test_index_and_normalisation(tiny, index):
    assert list(index.columns) == INDEX_COLUMNS
    assert index["name"].is_unique
    assert any(" " in n for n in index["name"])  # names with spaces are part of the format
    assert (index["wgms_name"] == index["name"].str.upper()).all()
    folds = index["fold"]
    assert (folds == 0).sum() >= 1 and (folds == 1).sum() >= 1 and (folds >= 2).sum() >= 2
    for fold, group in index.groupby("fold"):
        if len(group) > 1:
            assert group["region"].nunique() > 1, f"fold {fold} covers one region only"
    assert (index["height"] >= constants.min_grid_side).all()
    assert (index["width"] >= constants.min_grid_side).all()
    with open(tiny / "normalisation_factors.pkl", "rb") as f:
        factors = pickle.load(f)
    assert type(factors) is dict and factors == NORMALISATION
    assert sorted(p.name for p in tiny.iterdir() if p.is_dir()) == sorted(index["name"])
    assert not list(tiny.parent.glob(".tiny.*")), "temporary folders left behind"


def _check_grid(ds: netCDF4.Dataset, name: str, height: int, width: int, reference):
    x, y = ds["x"][:].data, ds["y"][:].data
    assert ds["x"].dtype == np.float64 and ds["y"].dtype == np.float64
    assert x.shape == (width,) and y.shape == (height,)
    assert np.allclose(np.diff(x), 100.0) and np.allclose(np.diff(y), -100.0)
    ref = ds["spatial_ref"]
    assert ref.dtype == np.int64 and ref.shape == ()
    assert ref.crs_wkt == ref.spatial_ref
    assert pyproj.CRS.from_wkt(ref.crs_wkt).to_epsg() in (32628, 32631, 32632, 32633)
    x_left, dx, rot1, y_top, rot2, dy = (float(v) for v in ref.GeoTransform.split())
    assert (dx, rot1, rot2, dy) == (100.0, 0.0, 0.0, -100.0)
    assert np.array_equal(x, x_left + (np.arange(width) + 0.5) * 100.0)
    assert np.array_equal(y, y_top - (np.arange(height) + 0.5) * 100.0)
    if reference:  # bit-identical coordinates and CRS in every file of a glacier
        assert np.array_equal(x, reference[0]) and np.array_equal(y, reference[1])
        assert ref.crs_wkt == reference[2]
    return x, y, ref.crs_wkt


def _check_data_variable(var: netCDF4.Variable, dims: tuple[str, ...]):
    assert var.dimensions == dims
    assert var.dtype == np.float32
    assert np.isnan(var._FillValue) and var.grid_mapping == "spatial_ref"
    filters = var.filters()
    assert filters["zlib"] and filters["shuffle"]


def test_netcdf_layout(tiny, index):
    for row in index.itertuples():
        folder = tiny / row.name
        for file in REQUIRED_FILES:
            assert (folder / file).is_file(), f"{row.name}: {file} missing"
        reference = None
        years = np.arange(FIRST_YEAR, row.max_year + 1)
        totals = pd.read_csv(folder / "total_smb.csv")
        for file, var_name in (("temperature.nc", "temperature_2m"),
                               ("precipitation.nc", "total_precipitation_sum")):
            with netCDF4.Dataset(folder / file) as ds:
                assert not ds.ncattrs(), "no global attributes (history, dates) may be written"
                reference = _check_grid(ds, row.name, row.height, row.width, reference)
                _check_data_variable(ds[var_name], ("time", "y", "x"))
                time = ds["time"]
                assert time.dtype == np.int32 and time.calendar == "proleptic_gregorian"
                assert time.units == "days since 1989-10-01"
                days = time[:].data
                assert np.array_equal(days, np.arange(days.size))
                first = np.datetime64("1989-10-01")
                last = first + int(days[-1])
                assert first <= np.datetime64(totals["begin_date"].min())
                assert last >= np.datetime64(totals["end_date"].max())
                data = ds[var_name][:].data
                assert data.shape == (days.size, row.height, row.width)
                assert np.isfinite(data).all()
        with netCDF4.Dataset(folder / "orography.nc") as ds:
            _check_grid(ds, row.name, row.height, row.width, reference)
            _check_data_variable(ds["elevation"], ("y", "x"))
        for file, names in (("dem.nc", ("z", "zstddev")), ("outlines.nc", ("outlines",))):
            with netCDF4.Dataset(folder / file) as ds:
                _check_grid(ds, row.name, row.height, row.width, reference)
                assert ds["year"].dtype == np.int32
                assert np.array_equal(ds["year"][:].data, years)
                for name in names:
                    _check_data_variable(ds[name], ("year", "y", "x"))
                    assert np.isfinite(ds[name][:].data).all()
                if file == "outlines.nc":
                    assert set(np.unique(ds["outlines"][:].data)) == {0.0, 1.0}
        if (folder / "facies.nc").exists():
            with netCDF4.Dataset(folder / "facies.nc") as ds:
                _check_grid(ds, row.name, row.height, row.width, reference)
                _check_data_variable(ds["facies"], ("year", "band", "y", "x"))
                assert list(ds["band"][:]) == FACIES_BANDS
                facies_years = ds["year"][:].data
                assert ds["year"].dtype == np.int32 and set(facies_years) <= set(years)
                maps = ds["facies"][:].data
            outlines = xr.open_dataset(folder / "outlines.nc")["outlines"]
            for k, year in enumerate(facies_years):
                glacier = outlines.sel(year=year).values == 1
                assert np.isnan(maps[k][:, ~glacier]).all()
                probabilities = maps[k][:8][:, glacier]
                assert (probabilities >= 0).all() and (probabilities <= 1).all()
                assert np.allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)
                confidence = maps[k][8][glacier]
                assert ((confidence >= 0) & (confidence <= 1)).all()


def test_xarray_decoding(tiny, index):
    """What a reader sees: decoded dates at 00:00, int32 years, string bands, dims order."""
    name = index["name"][0]
    with xr.open_dataset(tiny / name / "temperature.nc") as ds:
        assert ds["temperature_2m"].dims == ("time", "y", "x")
        assert ds["time"].values[0] == np.datetime64("1989-10-01T00:00")
        assert "spatial_ref" in ds.variables
    with xr.open_dataset(tiny / name / "dem.nc") as ds:
        assert ds["year"].dtype == np.int32 and ds["z"].dims == ("year", "y", "x")


def _cell_of(lon, lat, outlines: xr.Dataset):
    crs = pyproj.CRS.from_wkt(outlines["spatial_ref"].attrs["crs_wkt"])
    east, north = pyproj.Transformer.from_crs(4326, crs, always_xy=True).transform(lon, lat)
    x_left, _, _, y_top, _, _ = (float(v) for v in outlines["spatial_ref"].attrs["GeoTransform"].split())
    return (np.floor((y_top - north) / 100.0).astype(int), np.floor((east - x_left) / 100.0).astype(int))


def test_csv_tables(tiny, index):
    for row in index.itertuples():
        folder = tiny / row.name
        text = (folder / "total_smb.csv").read_text()
        assert text.endswith("\n") and "\r" not in text
        totals = pd.read_csv(folder / "total_smb.csv", dtype={"midseason_date": str})
        assert list(totals.columns) == TOTAL_COLUMNS
        assert list(totals["year"]) == list(range(FIRST_YEAR, row.max_year + 1))
        begin, end = _dates(totals["begin_date"]), _dates(totals["end_date"])
        assert (begin.dt.year == totals["year"] - 1).all() and (end.dt.year == totals["year"]).all()
        gap = (begin.iloc[1:].values - end.iloc[:-1].values) / np.timedelta64(1, "D")
        assert set(gap) <= {0.0, 1.0}, "consecutive years share the day or follow it"
        seasonal = totals["midseason_date"].notna()
        mid = _dates(totals.loc[seasonal, "midseason_date"])
        assert ((mid > begin[seasonal]) & (mid < end[seasonal])).all()
        if (folder / "point_smb.csv").exists():
            points = pd.read_csv(folder / "point_smb.csv", dtype={"point_id": str})
            assert list(points.columns) == POINT_COLUMNS
            assert set(points["balance_code"]) <= {"annual", "winter", "summer", "index"}
            assert (_dates(points["end_date"]) > _dates(points["begin_date"])).all()
            assert points["balance"].notna().all()
            with xr.open_dataset(folder / "outlines.nc") as outlines:
                rows, cols = _cell_of(points["longitude"].values, points["latitude"].values, outlines)
                assert ((rows >= 0) & (rows < row.height) & (cols >= 0) & (cols < row.width)).all()
                mask = outlines["outlines"].values
                assert (mask[:, rows, cols] == 1).all(), "stakes lie on the glacier in every year"


def test_special_cases_covered(tiny, index):
    """tiny exercises the irregularities of real data that the loader and losses must handle."""
    seasonal, annual_only, shared, next_day, index_rows, spin_up_points = 0, 0, 0, 0, 0, 0
    with_points, with_facies, missing = 0, 0, 0
    for row in index.itertuples():
        folder = tiny / row.name
        totals = pd.read_csv(folder / "total_smb.csv")
        seasonal += totals["midseason_date"].notna().sum()
        annual_only += totals["midseason_date"].isna().sum()
        gap = (_dates(totals["begin_date"]).iloc[1:].values
               - _dates(totals["end_date"]).iloc[:-1].values) / np.timedelta64(1, "D")
        shared += (gap == 0).sum()
        next_day += (gap == 1).sum()
        study = totals[totals["year"] >= STUDY_START]
        missing += study[["annual_balance"]].isna().sum().sum()
        if (folder / "point_smb.csv").exists():
            with_points += 1
            points = pd.read_csv(folder / "point_smb.csv")
            index_rows += (points["balance_code"] == "index").sum()
            spin_up_points += (points["year"] < STUDY_START).sum()
        with_facies += (folder / "facies.nc").exists()
    assert seasonal and annual_only and shared and next_day and missing
    assert index_rows and spin_up_points
    assert 0 < with_points < len(index), "some glaciers have stakes, some do not"
    assert 0 < with_facies < len(index), "some glaciers have facies maps, some do not"


# ---------------------------------------------------------------------------- determinism


def _same_dataset(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if files_a != files_b:
        return False
    for rel in files_a:
        if rel.suffix in (".csv", ".pkl"):
            if (a / rel).read_bytes() != (b / rel).read_bytes():
                return False
        else:
            with xr.open_dataset(a / rel) as da, xr.open_dataset(b / rel) as db:
                if not da.identical(db):
                    return False
    return True


def test_same_seed_same_data_other_seed_other_data(tiny, tmp_path):
    # Also in worker processes: every glacier has its own random stream.
    again = generate(tmp_path / "again", preset="tiny", seed=0, jobs=2)
    assert _same_dataset(tiny, again)
    other = generate(tmp_path / "other", preset="tiny", seed=1)
    assert (other / "index.csv").read_bytes() != (tiny / "index.csv").read_bytes()
    first = pd.read_csv(other / "index.csv")["name"][0]
    reference = pd.read_csv(tiny / "index.csv")["name"][0]
    with xr.open_dataset(other / first / "temperature.nc") as x, \
            xr.open_dataset(tiny / reference / "temperature.nc") as y:
        assert not np.array_equal(x["temperature_2m"].values, y["temperature_2m"].values)


def test_replaces_only_datasets(tiny, tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate(precious, preset="tiny")
    assert (precious / "thesis.txt").read_text() == "keep me"
    with pytest.raises(ValueError):
        generate(tmp_path / "x", preset="huge")
    target = tmp_path / "data"
    shutil.copytree(tiny, target)
    (target / "stale.txt").write_text("from an older dataset")
    assert synthetic.main([str(target), "--preset", "tiny", "--seed", "0", "--quiet"]) == 0
    assert not (target / "stale.txt").exists() and _same_dataset(tiny, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes"]


# --------------------------------------------------------------------------- plausibility

# Annual mean temperature (degC) at the glacier surface, lapse-rate corrected like the models do.
TEMPERATURE_RANGE = {"ALP": (-9, -2), "SCA": (-7, 0), "ICL": (-4, 3), "SVAL": (-10, -2), "PYR": (-7, 0)}
ELEVATION_RANGE = {"ALP": (1850, 3700), "SCA": (900, 2100), "ICL": (50, 1800), "SVAL": (30, 1200),
                   "PYR": (2700, 3450)}


def test_climate_and_geometry_plausible(tiny, index):
    for row in index.itertuples():
        folder = tiny / row.name
        with xr.open_dataset(folder / "temperature.nc") as t, \
                xr.open_dataset(folder / "precipitation.nc") as p, \
                xr.open_dataset(folder / "orography.nc") as o, \
                xr.open_dataset(folder / "dem.nc") as d, \
                xr.open_dataset(folder / "outlines.nc") as m:
            temperature = t["temperature_2m"].values
            precipitation = p["total_precipitation_sum"].values
            orography = o["elevation"].values
            z, zstd, mask = d["z"].values, d["zstddev"].values, m["outlines"].values == 1
        glacier = mask[0]
        surface = temperature.mean(axis=0) + constants.lapse_rate * (z[0] - orography)
        lo, hi = TEMPERATURE_RANGE[row.region]
        assert lo < surface[glacier].mean() < hi, f"{row.name}: {surface[glacier].mean():.1f} degC"
        assert (precipitation >= 0).all() and 0.3 < precipitation.mean() * 365.25 < 5.0
        wet = (precipitation[:, glacier] > 1e-4).mean()
        assert 0.25 < wet < 0.8, f"{row.name}: wet-day fraction {wet:.2f}"
        # Coarse reanalysis: climate and orography constant over blocks of the grid.
        blocks = np.unique(np.stack([orography, temperature[0], temperature[100]]).reshape(3, -1), axis=1)
        assert blocks.shape[1] <= row.height * row.width / 4
        below = z[0][glacier].mean() - orography[glacier].mean()
        assert 50 < below < 700, f"{row.name}: orography {below:.0f} m below the glacier"
        lo, hi = ELEVATION_RANGE[row.region]
        assert lo <= z[0][glacier].min() and z[0][glacier].max() <= hi
        area = mask.sum(axis=(1, 2))
        assert (np.diff(area) <= 0).all() and area[-1] < area[0], "outlines retreat"
        assert (mask[1:] <= mask[:-1]).all(), "no cell becomes glacier again"
        assert (z[-1][mask[-1]] < z[0][mask[-1]]).all(), "the glacier surface lowers"
        assert (zstd > 0).all() and zstd[0][~glacier].mean() > zstd[0][glacier].mean()


def _study_years(twin) -> np.ndarray:
    return twin.geometry.years >= STUDY_START


def test_balances_plausible(demo_twins):
    """Truth and observed glacier-wide balances per region resemble observed ones
    (docs/synthetic_twin.md, Statistics: winter +0.7..+2.5, summer -1..-3.5, annual mostly -0.3..-1.5)."""
    by_region: dict[str, list[np.ndarray]] = {}
    observed_error = []
    for twin in demo_twins:
        study = _study_years(twin)
        masks = twin.geometry.mask[study]
        fields = twin.truth.fields[study]
        wide = np.array([[fields[k, w][masks[k]].mean() for w in range(3)] for k in range(study.sum())])
        by_region.setdefault(twin.spec.region, []).append(wide)
        rows = pd.DataFrame(twin.glacier_wide)
        observed = rows.loc[study, "annual_balance"].to_numpy(dtype=float)
        observed_error.append(observed - wide[:, 0])
        assert wide[:, 0].std() > 0.2, f"{twin.name}: no interannual variability"
    for region, values in by_region.items():
        annual, winter, summer = np.concatenate(values).mean(axis=0)
        assert 0.5 < winter < 2.8, f"{region} winter {winter:.2f}"
        assert -3.8 < summer < -0.7, f"{region} summer {summer:.2f}"
        assert -2.0 < annual < 0.4, f"{region} annual {annual:.2f}"
    everything = np.concatenate([v for values in by_region.values() for v in values])
    assert -1.5 < everything[:, 0].mean() < -0.1
    error = np.concatenate(observed_error)
    error = error[np.isfinite(error)]
    assert 0.05 < error.std() < 0.25 and abs(error.mean()) < 0.05, "observations = truth + noise"


def test_equilibrium_line_within_glacier(demo_twins):
    """The zero of the mean annual balance-elevation profile lies on the glacier (ELA)."""
    for twin in demo_twins:
        glacier = twin.geometry.mask[0]
        z = twin.geometry.z[0][glacier]
        balance = twin.truth.fields[_study_years(twin), 0].mean(axis=0)[glacier]
        slope, intercept = np.polyfit(z, balance, 1)
        assert slope > 0, f"{twin.name}: balance must increase with elevation"
        ela = -intercept / slope
        span = z.max() - z.min()
        assert z.min() - 0.1 * span < ela < z.max() + 0.1 * span, f"{twin.name}: ELA {ela:.0f} m"


def test_truth_parameters_centred_and_spatially_varying(demo_twins):
    """A global TI model fits on average (parameters centred near the published values) while
    the parameters vary in space with visible predictors (a corrector has something to learn)."""
    values: dict[str, list[np.ndarray]] = {"prec_scale": [], "ddf_snow": [], "ddf_relative_ice": []}
    centres = []
    for twin in demo_twins:
        glacier = twin.geometry.mask[0]
        for name in values:
            values[name].append(getattr(twin.params, name)[0][glacier])
        centres.append(twin.params.snow_rain_centre)
        # Melt factors are higher low on the glacier.
        z = twin.geometry.z[0][glacier]
        ddf = twin.params.ddf_snow[0][glacier]
        assert np.corrcoef(z, ddf)[0, 1] < -0.5
    means = {name: np.concatenate(v).mean() for name, v in values.items()}
    assert means["prec_scale"] == pytest.approx(1.38, rel=0.15)
    assert means["ddf_snow"] == pytest.approx(0.00496, rel=0.15)
    assert means["ddf_relative_ice"] == pytest.approx(1.51, rel=0.15)
    assert np.mean(centres) == pytest.approx(0.99, abs=0.5)
    for name, v in values.items():
        spread = np.concatenate(v).std() / means[name]
        assert spread > 0.05, f"{name} hardly varies ({spread:.3f})"
    # Debris lowers the ice melt factor where it lies.
    debris = np.concatenate([t.geometry.debris[t.geometry.mask[0]] for t in demo_twins])
    relative_ice = np.concatenate(values["ddf_relative_ice"])
    assert debris.max() > 0.5
    assert relative_ice[debris > 0.5].mean() < relative_ice[debris == 0].mean() - 0.3


def test_avalanche_snow_below_rock_walls(demo_twins):
    """Avalanche feeding lies on the glacier only, raises the truth's precipitation factor where
    it lands, and is absent from ice caps (no rock walls above them)."""
    for twin in demo_twins:
        g = twin.geometry
        assert g.avalanche.min() >= 0 and g.avalanche.max() <= 1
        assert not g.avalanche[~g.mask[0]].any()
        if twin.spec.kind == "icecap":
            assert g.avalanche.max() == 0
    fed = [t for t in demo_twins if t.geometry.avalanche.max() > 0.5]
    assert len(fed) >= 3
    for twin in fed:
        g, glacier = twin.geometry, twin.geometry.mask[0]
        # With the rise of precipitation with height divided out, fed cells get more.
        z, feed = g.z[0][glacier], g.avalanche[glacier]
        prec = twin.params.prec_scale[0][glacier] * np.exp(-PREC_PER_METRE * (z - z.mean()))
        assert prec[feed > 0.5].mean() > 1.15 * prec[feed == 0].mean()


def test_science_preset_has_enough_training_glaciers():
    """The science check (README) needs many training glaciers on small, shared grid shapes;
    every fold mixes regions so that no region is seen only at test time."""
    specs = [spec for _, spec in synthetic.glacier_specs("science", 0)]
    folds = np.array([s.fold for s in specs])
    assert len(specs) == 36 and (folds == 0).sum() == 6 and (folds == 1).sum() == 6
    assert (folds >= 2).sum() == 24
    assert {s.shape for s in specs} <= {(16, 24), (24, 16), (24, 24)}
    for fold in range(6):
        assert len({s.region for s in specs if s.fold == fold}) >= 3
    trained = {s.region for s in specs if s.fold >= 2}
    assert trained == {"ALP", "SCA", "ICL", "SVAL", "PYR"}
    assert all(s.stakes >= 5 for s in specs)  # point RMSE pooled over every test glacier


def test_stakes_are_truth_plus_noise(demo_twins):
    from dataloader.synthetic.truth import period_weights

    for twin in demo_twins:
        if not twin.stakes:
            continue
        ids = sorted({r["point_id"] for r in twin.stakes})
        errors = []
        for row in twin.stakes:
            s = ids.index(row["point_id"])
            first = int((row["begin_date"] - synthetic.INTERNAL_START).astype(int))
            last = int((row["end_date"] - synthetic.INTERNAL_START).astype(int))
            days = np.arange(first, last + 1)
            truth = period_weights(days, first, last) @ twin.truth.stake_daily[days, s]
            errors.append(row["balance"] - truth)
        errors = np.array(errors)
        assert 0.05 < errors.std() < 0.25 and abs(errors.mean()) < 0.1, twin.name


def test_facies_follow_the_snow_line(tiny, index):
    """Snow lies above ice on average in every facies map (end-of-summer snow line)."""
    for row in index.itertuples():
        folder = tiny / row.name
        if not (folder / "facies.nc").exists():
            continue
        with xr.open_dataset(folder / "facies.nc") as f, xr.open_dataset(folder / "dem.nc") as d:
            for year in f["year"].values:
                maps = f["facies"].sel(year=year).values
                z = d["z"].sel(year=year).values
                label = np.nanargmax(np.where(np.isnan(maps[:8]), -1, maps[:8]), axis=0)
                glacier = np.isfinite(maps[0])
                snow, ice = glacier & (label == 1), glacier & (label == 0)
                if snow.any() and ice.any():
                    assert z[snow].mean() > z[ice].mean(), f"{row.name} {year}"


# ---------------------------------------------------------- year-to-year reanalysis errors


def test_year_errors_by_season_and_balance_year():
    """Summer temperature errors belong to the calendar year of the summer, winter precipitation
    errors to the balance year of the winter; both fade in and out without jumps."""
    from dataloader.synthetic.climate import DAYS_PER_YEAR, YearErrors, daily_year_errors, decimal_year
    from dataloader.synthetic.regions import REGIONS

    dates = np.arange(np.datetime64("2000-01-01"), np.datetime64("2003-01-01"))
    year = decimal_year(dates)
    peak = REGIONS["ALP"].t_peak_day  # 24 July
    cycle = np.cos(2 * np.pi * ((year - np.floor(year)) * DAYS_PER_YEAR - peak) / DAYS_PER_YEAR)
    errors = YearErrors(np.array([2000, 2001, 2002]), np.array([1.0, 2.0, 3.0]),
                        np.array([0.1, 0.2, 0.3]))
    temperature, log_factor = daily_year_errors(errors, dates, cycle)
    day = {d: int(np.flatnonzero(dates == np.datetime64(d))[0]) for d in
           ("2001-01-22", "2001-04-01", "2001-07-24", "2001-12-15", "2002-07-24")}
    assert cycle[day["2001-07-24"]] == pytest.approx(1.0, abs=1e-3)
    assert temperature[day["2001-07-24"]] == pytest.approx(2.0) and log_factor[day["2001-07-24"]] == 0
    assert temperature[day["2002-07-24"]] == pytest.approx(3.0)
    assert temperature[day["2001-01-22"]] == 0 and log_factor[day["2001-01-22"]] == pytest.approx(0.2)
    assert log_factor[day["2001-04-01"]] == pytest.approx(0.2)
    assert log_factor[day["2001-12-15"]] == pytest.approx(0.3)  # the winter of balance year 2002
    # Continuous: the weights ramp over about two months (at most 2 * 2pi/365 of the value a day).
    assert np.abs(np.diff(temperature)).max() < 3.0 * 4 * np.pi / 365
    assert np.abs(np.diff(log_factor)).max() < 0.3 * 4 * np.pi / 365


def test_year_errors_are_in_the_files_only(demo_twins):
    """The reanalysis of the files = the same reanalysis without year errors + those errors;
    the truth's climate is the same either way."""
    from dataloader.synthetic.climate import YEAR_P_SIGMA, block_climate, daily_year_errors
    from dataloader.synthetic.regions import REGIONS

    twin = demo_twins[0]
    region = REGIONS[twin.spec.region]
    weather = synthetic.regional_weathers([twin.spec], 0)[twin.spec.region]
    g = twin.geometry
    n = twin.climate.true_temperature.size
    weather = type(weather)(*(getattr(weather, f)[:n] for f in weather.__dataclass_fields__))
    args = (weather, region, region.areas[0], g.block_orography, 2500.0, 0.3, 1.1, 0.05, 1.02)
    files = block_climate(*args, rng=np.random.default_rng(7), year_errors=twin.year_errors)
    plain = block_climate(*args, rng=np.random.default_rng(7))
    t_error, p_error = daily_year_errors(twin.year_errors, weather.dates, weather.cycle)
    assert np.abs(t_error).max() > 1.0
    np.testing.assert_allclose(files.temperature - plain.temperature,
                               np.broadcast_to(t_error, plain.temperature.shape), atol=0.011)
    wet = plain.precipitation > 1e-3
    ratio = files.precipitation[wet] / plain.precipitation[wet]
    # The log-normal factor is corrected by -sigma^2 w^2 / 2 to keep the mean (w: winter weight).
    sigma2 = YEAR_P_SIGMA["region"] ** 2 + YEAR_P_SIGMA["glacier"] ** 2
    winter = np.clip(1 - 2 * weather.cycle, 0, 1)
    expected = np.broadcast_to(np.exp(p_error - 0.5 * sigma2 * winter**2), plain.precipitation.shape)
    np.testing.assert_allclose(ratio, expected[wet], rtol=2e-3)  # both stored to 1e-6 m, >= 1e-3 m
    assert np.array_equal(files.true_temperature, plain.true_temperature)
    assert np.array_equal(files.true_precipitation, plain.true_precipitation)


def test_year_errors_size_and_regional_share(demo_twins):
    """Summer temperature errors of 0.6 degC and winter precipitation errors of 25 % (seed 0:
    0.58 and 0.23 over the study years), partly shared within a region."""
    years = np.arange(STUDY_START, 2009)
    pick = lambda e, v: getattr(e, v)[np.isin(e.years, years)]  # noqa: E731
    t = np.array([pick(tw.year_errors, "temperature") for tw in demo_twins])
    p = np.array([pick(tw.year_errors, "precipitation") for tw in demo_twins])
    assert t.std() == pytest.approx(0.58, abs=0.01) and p.std() == pytest.approx(0.23, abs=0.01)
    assert abs(t.mean()) < 0.1 and abs(p.mean()) < 0.05
    regions = [tw.spec.region for tw in demo_twins]
    same = [np.corrcoef(t[i], t[j])[0, 1] for i in range(len(t)) for j in range(i)
            if regions[i] == regions[j]]
    other = [np.corrcoef(t[i], t[j])[0, 1] for i in range(len(t)) for j in range(i)
             if regions[i] != regions[j]]
    assert np.mean(same) > 0.15 > np.mean(other)


def _truth_as_the_files_say(twin) -> np.ndarray:
    """(Y, 3, H, W) balances of the truth run with the reanalysis's year errors added to its
    climate: what a model that reads the files would get right at best."""
    import dataclasses

    from dataloader.synthetic.climate import daily_year_errors
    from dataloader.synthetic.regions import REGIONS
    from dataloader.synthetic.truth import run_truth

    weather = synthetic.regional_weathers([twin.spec], 0)[twin.spec.region]
    n = twin.climate.true_temperature.size
    t_error, p_error = daily_year_errors(twin.year_errors, weather.dates[:n], weather.cycle[:n])
    climate = dataclasses.replace(twin.climate,
                                  true_temperature=twin.climate.true_temperature + t_error,
                                  true_precipitation=twin.climate.true_precipitation * np.exp(p_error))
    s, start = twin.seasons, synthetic.INTERNAL_START
    windows = np.stack([(s.begin - start).astype(int), (s.mid - start).astype(int),
                        (s.end - start).astype(int)], axis=1)
    late = np.array([(np.datetime64(f"{y}-08-01") - start).astype(int) for y in twin.geometry.years])
    return run_truth(climate, REGIONS[twin.spec.region].z_ref, twin.geometry, twin.params, windows,
                     late, np.zeros(0, np.int64)).fields


def test_maps_show_what_the_reanalysis_gets_wrong(demo_twins):
    """The year errors change the glacier-wide balance the files imply by ~0.5 m w.e. a year,
    warm summers making it too negative, while the facies maps follow the truth."""
    shown = [tw for tw in demo_twins if tw.facies is not None][:2]
    for twin in shown:
        g, study = twin.geometry, twin.geometry.years >= STUDY_START
        implied = _truth_as_the_files_say(twin)
        years = np.flatnonzero(study)
        error = np.array([(implied[k, 0] - twin.truth.fields[k, 0])[g.mask[k]].mean() for k in years])
        t_error = twin.year_errors.temperature[np.isin(twin.year_errors.years, g.years[study])]
        assert 0.35 < error.std() < 0.8, f"{twin.name}: {error.std():.2f}"
        assert np.corrcoef(error, t_error)[0, 1] < -0.4, twin.name
        # In map years the truth's snow (net gain this year) covers more of the glacier after a
        # summer the reanalysis makes too warm than the files imply, and less after a too cold one.
        for year, maps in zip(twin.facies_years, twin.facies):
            k = int(np.flatnonzero(g.years == year)[0])
            label = np.nanargmax(np.where(np.isnan(maps[:8]), -1, maps[:8]), axis=0)
            snow_map = (label == 1)[g.mask[k]].mean()
            gain = (implied[k, 0] > 0)[g.mask[k]].mean()
            truth_gain = (twin.truth.fields[k, 0] > 0)[g.mask[k]].mean()
            if abs(error[k - years[0]]) > 0.5:
                assert abs(snow_map - truth_gain) < abs(snow_map - gain), f"{twin.name} {year}"


# ------------------------------------------------------------------------ project loader


def test_loads_with_the_project_dataset(tiny, index):
    from dataloader import Dataset

    dataset = Dataset(tiny, use_cache=False)
    assert dataset.names == list(index["name"])
    for row in index.itertuples():
        glacier = dataset.glacier(row.name)
        folder = tiny / row.name
        years = row.max_year - FIRST_YEAR + 1
        assert glacier.outlines.shape == (years, row.height, row.width)
        temperature, precipitation = glacier.climate_fields(0, 29)
        with xr.open_dataset(folder / "temperature.nc") as t, \
                xr.open_dataset(folder / "precipitation.nc") as p:
            assert np.array_equal(temperature, t["temperature_2m"].values[:30])
            assert np.array_equal(precipitation, p["total_precipitation_sum"].values[:30])
        points = folder / "point_smb.csv"
        n_points = len(pd.read_csv(points)) if points.exists() else 0
        assert len(glacier.stake_balance) == n_points
        n_facies = 0
        if (folder / "facies.nc").exists():
            with xr.open_dataset(folder / "facies.nc") as facies:
                n_facies = facies.sizes["year"]
        assert int(np.sum(glacier.has_facies)) == n_facies
        totals = pd.read_csv(folder / "total_smb.csv")
        assert int(np.sum(glacier.seasonal)) == int(totals["midseason_date"].notna().sum())
        assert math.isclose(float(np.nanmean(glacier.glacier_wide[:, 0])),
                            float(totals["annual_balance"].mean()), abs_tol=1e-3)
