"""run_region.py end to end on two small real Oetztal glaciers (bundled sources, balance years up
to 1996) and one outline moved off the DEM: the broken glacier is skipped with its reason, a
glacier of the region equals the same glacier through prepare_glacier.py + infer_and_evaluate.py,
two Dask workers give the same product as one process, a run killed mid-way and rerun gives the
same product, a changed option is refused, and the outputs open in xarray, rioxarray and GDAL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio
import shapely
import xarray as xr

import infer_and_evaluate
import prepare_glacier
import run_region

REPO = Path(__file__).resolve().parents[1]
SOURCES = REPO / "examples" / "oetztal" / "sources"
SMALL = ("RGI50-11.00674", "RGI50-11.00684")  # 0.94 and 0.34 km²
BROKEN = "MOVED-OFF-THE-DEM"
LAST_YEAR = "1996"


def climate_argv() -> list[str]:
    return ["--dem", str(SOURCES / "srtm_oetztal.tif"),
            "--temperature", str(SOURCES / "sel_era5_land_monthly_t2m_1981-2018.nc"),
            "--precipitation", str(SOURCES / "sel_era5_land_monthly_prcp_1981-2018.nc"),
            "--orography", str(SOURCES / "sel_era5_land_invariant.nc"), "--monthly_climate",
            "--last_year", LAST_YEAR]


@pytest.fixture(scope="module")
def outlines(tmp_path_factory) -> Path:
    """The two small RGI outlines and a third one, a copy of the first moved 1° east (off the
    SRTM tile and the climate): a GeoPackage."""
    frame = pyogrio.read_dataframe(SOURCES / "rgi_oetztal.shp")
    frame = frame[frame["RGIId"].isin(SMALL)].copy()
    moved = frame.iloc[[0]].copy()
    moved["RGIId"] = BROKEN
    moved["geometry"] = shapely.transform(moved.geometry.to_numpy(), lambda xy: xy + [1.0, 0.0])
    path = tmp_path_factory.mktemp("outlines") / "outlines.gpkg"
    pyogrio.write_dataframe(pd.concat([frame, moved]), path)
    return path


def region_argv(out_dir: Path, outlines: Path, *extra: str) -> list[str]:
    return [str(out_dir), "--outlines", str(outlines), *climate_argv(), "--quiet", *extra]


@pytest.fixture(scope="module")
def region(tmp_path_factory, outlines) -> Path:
    out = tmp_path_factory.mktemp("region") / "out"
    def ours():  # what steers this code (netCDF4's import sets HDF5_PLUGIN_PATH on its own)
        return {k: v for k, v in os.environ.items() if k.startswith(("GLAUNTI_", "JAX_", "XLA_"))}

    before = ours()
    assert run_region.main(region_argv(out, outlines)) == 0
    assert ours() == before, "the region's tasks, run in this process, changed its environment"
    return out


def values(out_dir: Path) -> dict[str, np.ndarray]:
    with xr.open_dataset(out_dir / "region.nc") as ds:
        return {k: ds[k].values for k in ("glacier", "time", "year", "smb", "annual_balance", "winter_balance",
                                          "summer_balance", "area", "regional_smb", "snowfall", "rainfall",
                                          "melt", "regional_melt_water_volume")}


def test_outputs_and_broken_glacier_skipped(region):
    table = pd.read_csv(region / "glaciers.csv").fillna({"reason": ""}).set_index("id")
    assert sorted(table.index) == sorted([*SMALL, BROKEN])
    assert set(table.loc[list(SMALL), "status"]) == {"done"}
    assert table.loc[BROKEN, "status"] == "skipped"
    assert "does not cover" in table.loc[BROKEN, "reason"] or "cover" in table.loc[BROKEN, "reason"]
    done = table.loc[list(SMALL)]
    # The 100 m masks against the RGI areas (the region's whole area within 2 %).
    assert abs(done["area_km2"].sum() / done["outline_area_km2"].sum() - 1) < 0.02
    assert "skipped" in (region / "summary.txt").read_text()

    with xr.open_dataset(region / "region.nc") as ds:
        assert dict(ds.sizes) == {"model": 1, "glacier": 2, "time": ds.sizes["time"], "year": 2}
        assert list(ds["glacier"].values) == sorted(SMALL)
        assert list(ds["year"].values) == [1995, 1996]
        assert str(ds["time"].values[0])[:10] == "1994-10-01"
        assert ds["smb"].attrs["units"] == "m d-1" and ds["annual_balance"].attrs["units"] == "m"
        assert np.isfinite(ds["smb"].values).all() and np.isfinite(ds["annual_balance"].values).all()
        # The annual balance is the sum of the year's days (shared boundary days split in two).
        np.testing.assert_allclose(ds["winter_balance"] + ds["summer_balance"], ds["annual_balance"], atol=1e-5)
        weights = ds["area"] / ds["area"].sum()
        np.testing.assert_allclose(ds["regional_annual_balance"][0], (ds["annual_balance"][0] * weights).sum("glacier"),
                                   rtol=1e-5)
        assert ds.attrs["Conventions"] == "CF-1.8" and len(ds.attrs["weights_d_sha256"]) == 64
        assert ds["lat"].attrs["units"] == "degrees_north" and "crs" in ds
        # The TI day terms: glacier-wide snowfall − melt is the glacier-wide SMB, every day.
        for term in ("snowfall", "rainfall", "melt"):
            assert ds[term].attrs["units"] == "m d-1" and np.isfinite(ds[term].values).all()
            assert (ds[term].values >= 0).all()
        assert float(ds["melt"].sum()) > 0 and float(ds["rainfall"].sum()) > 0
        np.testing.assert_allclose(ds["snowfall"] - ds["melt"], ds["smb"], atol=2e-6)
        volume = (ds["melt"][0] * ds["area"] * 1e6).sum("glacier")
        assert ds["regional_melt_water_volume"].attrs["units"] == "m3 d-1"
        np.testing.assert_allclose(ds["regional_melt_water_volume"][0], volume, rtol=1e-5)
    assert (region / "region.png").stat().st_size > 10_000
    assert not list(region.rglob("*.tmp")), "a temporary file was left behind"
    # The prepared glaciers in the published layout, as every other script reads them.
    index = pd.read_csv(region / "data" / "index.csv")
    assert sorted(index["name"]) == sorted(SMALL)
    assert not (region / "maps").exists()
    assert [p for p in region.rglob("*.nc") if p.relative_to(region).parts[0] != "data"] == [region / "region.nc"]


def test_mosaic_opens_in_rioxarray_and_gdal(region):
    import rioxarray

    with xr.open_dataset(region / "region.nc") as ds:
        area = float(ds["area"].sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)  # rioxarray's use of affine
        da = rioxarray.open_rasterio(region / "mean_annual_smb.tif", masked=True)
        assert da.rio.crs.to_epsg() == 32632
        assert da.rio.resolution() == (100.0, -100.0)
        transform = da.rio.transform()
    assert transform.c % 100 == 0 and transform.f % 100 == 0
    glacier = np.isfinite(da.values[0])
    assert abs(glacier.sum() * 0.01 - area) < 1e-6  # every glacier cell, only those
    with rasterio.open(region / "mean_annual_smb.tif") as src:  # GDAL, as QGIS reads it
        assert src.crs.to_epsg() == 32632 and src.nodata == -9999.0
        assert src.transform == transform
        np.testing.assert_array_equal(src.read(1) != src.nodata, glacier)


def test_region_glacier_equals_prepare_and_infer(region, tmp_path):
    """The same glacier through the single-glacier scripts: the same prepared files and, from
    its daily SMB reduced here independently, the same annual balances (float32 rounding: the
    region runs it in a padded shape class)."""
    name = SMALL[0]
    data = tmp_path / "data"
    assert prepare_glacier.main([str(data), name, "--outlines", str(SOURCES / "rgi_oetztal.shp"),
                                 "--outline_id", name, *climate_argv(), "--quiet"]) == 0
    assert infer_and_evaluate.main(["d", name, str(tmp_path / "smb.nc"), str(tmp_path / "eval.json"),
                                    "--data_folder", str(data), "--quiet"]) == 0
    for file in ("dem.nc", "outlines.nc", "temperature.nc", "precipitation.nc", "total_smb.csv"):
        with xr.open_dataset(data / name / file) if file.endswith(".nc") else open(data / name / file) as a, \
                xr.open_dataset(region / "data" / name / file) if file.endswith(".nc") else \
                open(region / "data" / name / file) as b:
            if file.endswith(".nc"):
                xr.testing.assert_identical(a, b)
            else:
                assert a.read() == b.read()

    years = pd.read_csv(data / name / "total_smb.csv", parse_dates=["begin_date", "end_date"])
    with xr.open_dataset(tmp_path / "smb.nc") as smb, xr.open_dataset(data / name / "outlines.nc") as o:
        mask = o["outlines"].isel(time=-1).values if "time" in o["outlines"].dims else o["outlines"][-1].values
        expected = []
        for _, row in years[years["year"] >= 1995].iterrows():
            total = smb["smb"].sel(time=slice(row["begin_date"], row["end_date"])).sum("time").values
            expected.append((total * mask).sum() / mask.sum())
    with xr.open_dataset(region / "region.nc") as ds:
        got = ds["annual_balance"].sel(model="D", glacier=name).values
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)


def test_two_dask_workers_give_the_same_product(region, outlines, tmp_path):
    import dask
    import distributed  # noqa: F401  (registers its configuration defaults)

    assert dask.config.get("distributed.worker.multiprocessing-method") == "spawn"
    out = tmp_path / "w2"
    assert run_region.main(region_argv(out, outlines, "--workers", "2")) == 0
    a, b = values(region), values(out)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_killed_run_resumes_to_the_same_product(region, outlines, tmp_path):
    """Killed while the inference writes its first daily maps (``--maps``: a temporary file,
    mid-way), the rerun ends with the product of the uninterrupted run and the maps."""
    out = tmp_path / "killed"
    argv = [sys.executable, str(REPO / "run_region.py"), *region_argv(out, outlines, "--maps")]
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    maps = out / "maps" / "d"
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if list(maps.glob(".*.tmp")) if maps.exists() else []:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "region.nc").exists()
    assert run_region.main(region_argv(out, outlines, "--maps")) == 0
    a, b = values(region), values(out)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not list(out.rglob("*.tmp")), "a temporary file was left behind"
    # The maps hold the daily SMB the product was reduced from.
    with xr.open_dataset(maps / f"{SMALL[0]}.nc") as smb, xr.open_dataset(out / "region.nc") as ds:
        assert {"smb", "snowfall", "rainfall", "melt"} <= set(smb.data_vars)
        np.testing.assert_array_equal(smb["melt"].values,
                                      ds["melt"].sel(model="D", glacier=SMALL[0], time=smb["time"]).values)

    # A rerun of the finished product reuses everything; a changed option is refused.
    started = time.perf_counter()
    assert run_region.main(region_argv(out, outlines, "--maps")) == 0
    assert time.perf_counter() - started < 60
    changed = subprocess.run([*argv, "--margin_m", "600"], cwd=REPO, capture_output=True, text=True)
    assert changed.returncode == 2
    lines = changed.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "margin_m" in lines[-1] and "new OUT_DIR" in lines[-1]


def test_bad_shared_input_stops_at_once(outlines, tmp_path):
    argv = region_argv(tmp_path / "out", outlines)
    argv[argv.index("--temperature") + 1] = str(SOURCES / "srtm_oetztal.tif")
    result = subprocess.run([sys.executable, str(REPO / "run_region.py"), *argv], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "srtm_oetztal.tif" in last
    assert not (tmp_path / "out" / "data").exists()


def test_selection_within_the_rofental_and_wgms_links():
    from core.apps.region import RegionOptions, oetztal_sources, select_outlines

    everything = select_outlines(oetztal_sources(), RegionOptions())
    assert len(everything) == 20
    rofental = {o["id"]: o for o in select_outlines(oetztal_sources(within_rofental=True), RegionOptions())}
    assert len(rofental) == 9  # the catchment's README: 9 centroids inside, 36 km² of glacier
    assert abs(sum(o["outline_area_km2"] for o in rofental.values()) - 36) < 1
    assert {"RGI50-11.00897", "RGI50-11.00787", "RGI50-11.00719_d01", "RGI50-11.00719_d02"} <= set(rofental)
    hintereis = rofental["RGI50-11.00897"]
    assert hintereis["wgms_id"] == 491 and hintereis["glacier_wide"].endswith("mbdata_WGMS-00491.csv")
    assert hintereis["profile"].endswith("profile_WGMS-00491.csv")
    # Vernagtferner: one WGMS glacier (489), two RGI 5 outlines, compared as their area-weighted sum.
    for part in ("RGI50-11.00719_d01", "RGI50-11.00719_d02"):
        assert rofental[part]["wgms_part_of"] == "RGI50-11.00719" and "glacier_wide" not in rofental[part]
    small = select_outlines(oetztal_sources(), RegionOptions(min_area_km2=5.0))
    assert all(o["outline_area_km2"] >= 5.0 for o in small) and 0 < len(small) < 20


def test_help_and_conflicting_options(outlines, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_help:
        run_region.main(["--help"])
    assert exit_help.value.code == 0 and "--within" in capsys.readouterr().out
    argv = region_argv(tmp_path / "out", outlines, "--workers", "2", "--scheduler", "tcp://127.0.0.1:1")
    assert run_region.main(argv) == 2
    assert "not both" in capsys.readouterr().err
    assert run_region.main(region_argv(tmp_path / "out", outlines, "--models", "dx")) == 2
    assert "--models" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_glacier_summary_streams_whatever_the_pieces():
    """A glacier's summary is the same whichever pieces its days arrive in: years sharing a
    boundary day, a gap of days no year models (zeros on the calendar), pieces that end at a year's
    end, inside the gap or anywhere; against the sums over the whole series at once."""
    from types import SimpleNamespace

    from core.apps.region import GlacierSummary

    rng = np.random.default_rng(3)
    begin, end = np.array([0, 364, 735]), np.array([364, 728, 1099])  # a shared day, then a 6-day gap
    n_days, shape = 1100, (3, 4)
    outlines = (rng.random((3, *shape)) > 0.4).astype(np.float32)
    outlines[:, 0, 0] = 1
    tensors = SimpleNamespace(
        name="fake", study=np.ones(3, bool), years=np.array([2001, 2002, 2003]), begin_day=begin, end_day=end,
        mid_day=(begin + end) // 2, seasonal=np.zeros(3, bool), outlines=outlines,
        elevation=rng.uniform(2500, 3500, (3, *shape)).astype(np.float32), first_date=np.datetime64("2000-10-01"),
        x=np.arange(4) * 100.0, y=np.arange(3)[::-1] * 100.0, crs_wkt="")
    smb = rng.normal(0, 0.01, (n_days, *shape)).astype(np.float32)
    smb[729:735] = 0
    terms = rng.random((n_days, 3)).astype(np.float32)

    # Pieces end where years end, inside the gap and at random.
    cuts = sorted({1, 364, 365, 729, 731, 735, 1099, *rng.integers(1, n_days, 12).tolist(), n_days})
    summary = GlacierSummary(tensors, 46.8)
    for d0, d1 in zip([0, *cuts[:-1]], cuts):
        summary.add(d0, smb[d0:d1], terms[d0:d1])
    got = summary.result()

    daily = np.full(n_days, np.nan)
    totals = np.zeros(shape)
    for k in range(3):
        block, mask = smb[begin[k]:end[k] + 1], outlines[k]
        area = mask.sum()
        daily[begin[k]:end[k] + 1] = np.tensordot(block, mask, axes=2) / area
        np.testing.assert_allclose(got["annual"][k], (block.sum(axis=0) * mask).sum() / area, rtol=1e-6)
        totals += block.sum(axis=0, dtype=np.float64)
    np.testing.assert_allclose(got["winter"] + got["summer"], got["annual"], atol=1e-6)
    np.testing.assert_allclose(got["daily"], daily, rtol=1e-6)
    assert np.isnan(got["daily"][729:735]).all() and not np.isnan(got["daily"][735:]).any()
    last = outlines[-1] >= 0.5
    np.testing.assert_allclose(got["mean_map"][last], (totals / 3)[last], rtol=1e-6)
    assert np.isnan(got["mean_map"][~last]).all()
    np.testing.assert_array_equal(got["terms"], terms)
    assert got["first_date"] == np.datetime64("2000-10-01")
