"""prepare_glacier.py end to end: the bundled real Hintereisferner sources, and ICEmapper outlines
with facies on small synthetic inputs whose answer is known; the files load with the project's
reader, the index row is added or replaced, bad input stops with one line and writes nothing."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import netCDF4
import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.transform import from_origin

import constants
import prepare_glacier
from conftest import EXAMPLE_SOURCES as SOURCES
from dataloader import Dataset
from dataloader.layout import NORMALISATION_FACTORS
from georeferencing import assert_georeferenced

UTM32 = "EPSG:32632"


def hintereisferner_argv(data: Path, name: str = "Hintereisferner", *extra: str) -> list[str]:
    return [str(data), name,
            "--outlines", str(SOURCES / "rgi_oetztal.shp"), "--outline_id", "RGI50-11.00897",
            "--dem", str(SOURCES / "srtm_oetztal.tif"),
            "--temperature", str(SOURCES / "sel_era5_land_monthly_t2m_1981-2018.nc"),
            "--precipitation", str(SOURCES / "sel_era5_land_monthly_prcp_1981-2018.nc"),
            "--orography", str(SOURCES / "sel_era5_land_invariant.nc"), "--monthly_climate",
            "--glacier_wide", str(SOURCES / "mbdata_WGMS-00491.csv"), "--quiet", *extra]


@pytest.fixture(scope="module")
def hintereisferner(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("real")
    assert prepare_glacier.main(hintereisferner_argv(
        data, "Hintereisferner", "--profile", str(SOURCES / "profile_WGMS-00491.csv"))) == 0
    return data


def test_hintereisferner_from_bundled_sources(hintereisferner, tmp_path):
    data = hintereisferner
    folder = data / "Hintereisferner"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["temperature.nc", "precipitation.nc", "orography.nc", "dem.nc", "outlines.nc", "total_smb.csv",
         "point_smb.csv", "provenance.json"])
    assert not [p for p in data.iterdir() if p.name.startswith(".") and p.name != ".glaunti_cache"]
    index = pd.read_csv(data / "index.csv")
    row = index.set_index("name").loc["Hintereisferner"]
    assert (row["fold"], row["region"], row["max_year"]) == (0, "ALP", 2018)
    with open(data / "normalisation_factors.pkl", "rb") as f:
        assert pickle.load(f) == NORMALISATION_FACTORS

    tensors = Dataset(data, cache_dir=tmp_path / "cache").glacier("Hintereisferner")
    assert tensors.years[0] == constants.initialisation_period_start_year and tensors.years[-1] == 2018
    assert (row["height"], row["width"]) == tensors.outlines.shape[1:]
    # Glacier area of the mask within 2 % of the RGI outline (8.04 km²).
    provenance = json.loads((folder / "provenance.json").read_text())
    area = provenance["diagnostics"]["glacier_area_km2"]
    assert area["mask_last_year"] == pytest.approx(float(tensors.outlines[-1].sum()) * 0.01)
    assert area["mask_last_year"] == pytest.approx(area["outline"], rel=0.02)
    assert all(len(v["sha256"]) == 64 for v in provenance["inputs"].values())
    glacier = tensors.outlines[-1] > 0.5
    z = tensors.elevation[-1][glacier]
    assert 2350 < z.min() < 2600 and 3500 < z.max() < 3800
    # WGMS: 2003 annual −1.796 m w.e.; seasonal balances from 2013 on (1 May split).
    k2003 = int(np.flatnonzero(tensors.years == 2003)[0])
    assert tensors.glacier_wide[k2003, 0] == pytest.approx(-1.796, abs=1e-6)
    assert not tensors.seasonal[k2003] and tensors.seasonal[tensors.years == 2015].all()
    # Climate: the two ERA5-Land cells nearest the glacier, °C, a whole hydrological year per year.
    assert tensors.temperature_2m.shape[1] == 2
    assert -12 < float(np.mean(tensors.temperature_2m)) < 5
    yearly = float(np.sum(tensors.precipitation[:, 0])) / 29
    assert 0.8 < yearly < 2.0
    # Every raster is placed on the map by rioxarray and GDAL (UTM 32N, the grid of provenance.json).
    grid = provenance["grid"]
    assert grid["epsg"] == 32632
    for file, variable in (("temperature.nc", "temperature_2m"), ("precipitation.nc", "total_precipitation_sum"),
                           ("orography.nc", "elevation"), ("dem.nc", "z"), ("dem.nc", "zstddev"),
                           ("outlines.nc", "outlines")):
        assert_georeferenced(folder / file, variable, tensors.x, tensors.y, grid["epsg"])
    assert tensors.x[0] == grid["x_left"] + 50 and tensors.y[0] == grid["y_top"] - 50
    # WGMS profile bands became annual pseudo-stakes on glacier cells.
    assert len(tensors.stake_code) > 100 and set(tensors.stake_code.tolist()) == {0}
    assert glacier[tensors.stake_row, tensors.stake_col].all()


def test_published_model_runs_on_prepared_glacier(hintereisferner, tmp_path, capsys):
    import infer_and_evaluate

    smb, evaluation = tmp_path / "smb.nc", tmp_path / "eval.json"
    assert infer_and_evaluate.main(["a", "Hintereisferner", str(smb), str(evaluation),
                                    "--data_folder", str(hintereisferner)]) == 0
    out = capsys.readouterr().out
    assert "published" in out  # says which weights were used
    result = json.loads(evaluation.read_text())
    annual = result["metrics"]["glacier-wide"]["overall"]["annual"]
    assert annual["n"] == 24  # WGMS annual balances 1995–2018
    assert annual["pearson_r"] > 0.6 and annual["rmse"] < 0.8
    with netCDF4.Dataset(smb) as nc:
        assert nc.variables["smb"].shape[1:] == (49, 70)


def test_index_row_added_or_replaced_by_name(hintereisferner, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(hintereisferner, data)
    before = sorted(p.name for p in (data / "Hintereisferner").iterdir())
    assert prepare_glacier.main(hintereisferner_argv(data, "Hintereisferner", "--fold", "3",
                                                     "--region", "XYZ")) == 0
    index = pd.read_csv(data / "index.csv")
    assert index["name"].tolist() == ["Hintereisferner"]
    assert (index["fold"][0], index["region"][0]) == (3, "XYZ")
    # Replaced whole: the profile was not given this time, so no point file is left from before.
    assert "point_smb.csv" in before and not (data / "Hintereisferner" / "point_smb.csv").exists()
    assert prepare_glacier.main(hintereisferner_argv(data, "Vernagtferner") [:4] + [
        "--outline_id", "RGI50-11.00719_d01", "--outline_id", "RGI50-11.00719_d02"]
        + hintereisferner_argv(data)[6:]) == 0
    assert pd.read_csv(data / "index.csv")["name"].tolist() == ["Hintereisferner", "Vernagtferner"]


@pytest.mark.parametrize("change, expected", [
    (("--outline_id", "RGI50-11.99999"), "RGI50-11.99999"),
    (("--last_year", "2030"), "sel_era5_land_monthly_t2m_1981-2018.nc"),
    (("--balance_year_dates", "10-01,13-01,09-30"), "--balance_year_dates"),
])
def test_bad_input_one_line_and_nothing_written(hintereisferner, tmp_path, capsys, change, expected):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(hintereisferner, data)
    index_before = (data / "index.csv").read_bytes()
    argv = hintereisferner_argv(data, "Hintereisferner")
    if change[0] == "--outline_id":
        argv[argv.index("--outline_id") + 1] = change[1]
    else:
        argv += list(change)
    assert prepare_glacier.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the monthly-climate warning
    assert err.startswith("error: ") and expected in err
    assert (data / "index.csv").read_bytes() == index_before
    assert not [p for p in data.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert (data / "Hintereisferner" / "point_smb.csv").exists()  # the earlier glacier is untouched


def test_monthly_climate_needs_the_flag(tmp_path, capsys):
    argv = [a for a in hintereisferner_argv(tmp_path / "d") if a != "--monthly_climate"]
    assert prepare_glacier.main(argv) == 2
    assert "--monthly_climate" in capsys.readouterr().err
    assert not (tmp_path / "d" / "Hintereisferner").exists()


# ---------------------------------------------------------------------------------------------
# ICEmapper outlines and facies maps, on synthetic rasters with a known answer

X0, Y0 = 633000.0, 5186000.0  # north-west corner of the synthetic scene (UTM 32N, near 10.76 E 46.8 N)


def _tif(path: Path, bands: np.ndarray, pixel: float, crs=UTM32, nodata=None, dtype=None) -> Path:
    bands = np.asarray(bands)
    with rasterio.open(path, "w", driver="GTiff", height=bands.shape[1], width=bands.shape[2],
                       count=bands.shape[0], dtype=dtype or bands.dtype, crs=crs, nodata=nodata,
                       transform=from_origin(X0, Y0, pixel, pixel)) as dst:
        dst.write(bands)
    return path


def _icemapper(path: Path, rows: slice, cols: slice) -> Path:
    """A 2 km square scene of 20 m pixels whose glacier probability is 0.9 in the given pixel box."""
    glacier = np.full((100, 100), 0.1, np.float32)
    glacier[rows, cols] = 0.9
    return _tif(path, np.stack([1 - glacier, glacier]), 20.0)


def _climate(folder: Path) -> tuple[Path, Path, Path]:
    """Daily ERA5-Land-like files (K, m) on a 3 × 3 grid of 0.1° around the scene, 1989-10-01 …
    1996-12-31, and an orography in m."""
    folder.mkdir()
    days = np.arange(np.datetime64("1989-10-01"), np.datetime64("1997-01-01"))
    lat, lon = np.array([46.9, 46.8, 46.7]), np.array([10.7, 10.8, 10.9])
    season = np.cos(2 * np.pi * (days - np.datetime64("1990-07-20")).astype(float) / 365.25)
    t = (273.15 - 2 + 8 * season)[:, None, None] * np.ones((1, 3, 3))
    p = np.full((days.size, 3, 3), 0.004)
    paths = []
    for name, var, values, units in (("t2m.nc", "t2m", t, "K"), ("tp.nc", "tp", p, "m")):
        with netCDF4.Dataset(folder / name, "w") as ds:
            ds.createDimension("time", days.size)
            ds.createDimension("latitude", 3)
            ds.createDimension("longitude", 3)
            time = ds.createVariable("time", "i4", ("time",))
            time.units, time.calendar = "days since 1989-10-01", "proleptic_gregorian"
            time[:] = np.arange(days.size)
            ds.createVariable("latitude", "f8", ("latitude",))[:] = lat
            ds.createVariable("longitude", "f8", ("longitude",))[:] = lon
            v = ds.createVariable(var, "f4", ("time", "latitude", "longitude"))
            v.units = units
            v[:] = values
        paths.append(folder / name)
    with netCDF4.Dataset(folder / "orography.nc", "w") as ds:
        ds.createDimension("latitude", 3)
        ds.createDimension("longitude", 3)
        ds.createVariable("latitude", "f8", ("latitude",))[:] = lat
        ds.createVariable("longitude", "f8", ("longitude",))[:] = lon
        v = ds.createVariable("height", "f4", ("latitude", "longitude"))
        v.units = "m"
        v[:] = 2500.0
    return paths[0], paths[1], folder / "orography.nc"


def test_icemapper_outlines_and_facies_end_to_end(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    # 1993: glacier pixels rows 20–69, cols 20–79 (1 km × 1.2 km); 1995: the tongue has gone
    # (rows 20–59). Cells are 5 × 5 pixels, so whole cells: 10 × 12 and 8 × 12 cells.
    ice93 = _icemapper(src / "ice1993.tif", slice(20, 70), slice(20, 80))
    ice95 = _icemapper(src / "ice1995.tif", slice(20, 60), slice(20, 80))
    # DEM: 10 m pixels, 3200 m at the northern edge falling 0.25 m per m southwards.
    rows = np.arange(400)[:, None] * np.ones((1, 400))
    dem = _tif(src / "dem.tif", (3200 - 0.25 * 10 * (rows + 0.5))[None].astype(np.float32), 10.0)
    # Facies of 1995-09-10: ice in the western half of the scene, snow in the eastern half.
    classes = np.where(np.arange(100)[None, :] < 50, 0, 1) * np.ones((100, 1))
    facies = _tif(src / "facies.tif", classes[None].astype(np.int16), 20.0, nodata=-9999)
    t2m, tp, orography = _climate(src / "climate")

    data = tmp_path / "data"
    argv = [str(data), "Synth Icemapper", "--outline_rasters", f"1993={ice93}", f"1995={ice95}",
            "--dem", str(dem), "--temperature", str(t2m), "--precipitation", str(tp),
            "--orography", str(orography), "--facies", f"1995-09-10={facies}", "--margin_m", "200",
            "--quiet"]
    assert prepare_glacier.main(argv) == 0
    tensors = Dataset(data, cache_dir=tmp_path / "cache").glacier("Synth Icemapper")
    assert list(tensors.years) == list(range(1990, 1997))  # the climate ends in 1996
    cells = tensors.outlines.reshape(len(tensors.years), -1).sum(axis=1)
    # Years up to 1994 take the 1993 map (the first), 1995 and 1996 the 1995 one.
    assert cells.tolist() == [120] * 5 + [96] * 2
    # Grid: the 1993 footprint (1 km × 1.2 km from x0 + 400 m, y0 − 400 m) plus 200 m each side.
    assert tensors.outlines.shape[1:] == (14, 16)
    assert tensors.x[0] == X0 + 400 - 200 + 50 and tensors.y[0] == Y0 - 400 + 200 - 50
    # DEM: each cell's mean is the plane at its centre; std of a 0.25 slope over ten 10 m rows.
    row_centre = (Y0 - tensors.y) / 1.0
    assert np.allclose(tensors.elevation[0][:, 0], 3200 - 0.25 * row_centre, atol=1e-3)
    expected_std = 0.25 * 10 * np.sqrt((10**2 - 1) / 12)
    assert np.allclose(tensors.elevation_std[0], expected_std, rtol=1e-4)
    # Facies: only 1995 has a map; western glacier cells are ice, eastern ones snow.
    k95 = int(np.flatnonzero(tensors.years == 1995)[0])
    assert tensors.has_facies.tolist() == [y == 1995 for y in tensors.years]
    on = tensors.outlines[k95] > 0.5
    ice, snow = tensors.facies[k95, 0], tensors.facies[k95, 1]
    west = tensors.x < X0 + 1000
    assert np.all(ice[on & west[None, :]] == 1) and np.all(snow[on & ~west[None, :]] == 1)
    assert np.all(tensors.facies[k95, 8][on] == 1)  # no confidence file: full confidence
    assert np.all(tensors.facies[k95][:, ~on] == 0)  # off-glacier NaN, read as 0
    assert_georeferenced(data / "Synth Icemapper" / "facies.nc", "facies", tensors.x, tensors.y, 32632)
    # No observations: an inference-only glacier with empty balances.
    assert np.isnan(tensors.glacier_wide).all() and len(tensors.stake_code) == 0


def test_icemapper_bad_band_count(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    bad = _tif(src / "three.tif", np.full((3, 50, 50), 0.5, np.float32), 20.0)
    t2m, tp, orography = _climate(src / "climate")
    argv = [str(tmp_path / "data"), "X", "--outline_rasters", f"2000={bad}", "--dem", str(bad),
            "--temperature", str(t2m), "--precipitation", str(tp), "--orography", str(orography), "--quiet"]
    assert prepare_glacier.main(argv) == 2
    err = capsys.readouterr().err
    assert "three.tif" in err and "has 3 band(s), expected 2" in err
    assert not (tmp_path / "data" / "X").exists() and not (tmp_path / "data" / "index.csv").exists()
