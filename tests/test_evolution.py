"""Glacier evolution with OGGM (evolve_glacier.py, core/apps/): the SMB–elevation reduction on
fields whose answer is known, the OGGM mass-balance adapter's units and conventions, and a
short offline run on the bundled Hintereisferner sources (model A, a few years, then a short
projection with the bundled CMIP5 cell) with every network connection refused and a fresh
HOME that must stay empty; the clear error when the optional extra is missing."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import xarray as xr

import evolve_glacier
import prepare_glacier
from conftest import EXAMPLE_SOURCES as SOURCES
from conftest import REPO
from core.apps import oggm_offline
from core.apps.smb_elevation import monthly_sums, reduce_fields

# OGGM calls rasterio the old way on every raster operation (thousands of warnings per run).
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")

CMIP5 = REPO / "examples" / "cmip5"
# Stated in docs/evolution.md: the adapter's annual specific balance on OGGM's flowlines and
# GlaUnTI's glacier-wide balance on its grid differ by the hypsometry (OGGM's 50 m grid of the
# same DEM, its elevation bands) and the band interpolation; measured on Hintereisferner
# 2003–2018 with D: at most 0.023 m w.e., 0.019 on average.
BINNING_TOLERANCE_M_WE = 0.05


def _outline_args():
    return ["--outlines", str(SOURCES / "rgi_oetztal.shp"), "--outline_id", "RGI50-11.00897",
            "--dem", str(SOURCES / "srtm_oetztal.tif")]


# --- the reduction (no OGGM needed) ---

def test_reduction_reproduces_a_linear_profile_and_extrapolates_it():
    """SMB = a + b z on the glacier: every band, the extrapolation and the glacier-wide mean
    are exact; the annual relation is the sum of the monthly ones."""
    rng = np.random.default_rng(0)
    z = rng.uniform(2500.0, 3500.0, size=(1, 20, 30))
    weights = (rng.uniform(size=z.shape) > 0.3).astype(np.float32)
    gradient = np.linspace(0.1, 1.2, 12)[:, None, None] * 1e-3  # m w.e. per m, per month
    fields = (gradient * (z[0] - 3000.0))[None]  # (1, 12, H, W)
    relation = reduce_fields([2010], fields, weights, z)
    heights = np.array([2000.0, 2600.0, 3000.0, 3400.0, 4000.0])
    annual = relation.evaluate(heights, 0)
    np.testing.assert_allclose(annual, gradient.sum() * (heights - 3000.0), atol=1e-9)
    by_month = sum(relation.evaluate(heights, 0, months=i) for i in range(12))
    np.testing.assert_allclose(by_month, annual, atol=1e-12)
    expected = (fields[0].sum(0) * weights[0]).sum() / weights[0].sum()
    assert relation.glacier_wide[0] == pytest.approx(expected, abs=1e-12)


def test_monthly_sums_follow_the_balance_year():
    dates = np.arange(np.datetime64("2009-10-01"), np.datetime64("2011-10-01"))
    daily = np.ones((len(dates), 1, 1))
    sums = monthly_sums(daily, dates, [np.datetime64("2010-10-01")], [np.datetime64("2011-09-30")])
    assert sums[0, :, 0, 0].tolist() == [31, 30, 31, 31, 28, 31, 30, 31, 30, 31, 31, 30]  # Oct … Sep


# --- the optional extra ---

def test_missing_extra_is_one_clear_line(monkeypatch, capsys):
    real = oggm_offline.importlib.util.find_spec
    monkeypatch.setattr(oggm_offline.importlib.util, "find_spec",
                        lambda name, *a: None if name == "oggm" else real(name, *a))
    code = evolve_glacier.main(["data", "X", *_outline_args()])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "'oggm' is not installed" in err and "[oggm]" in err


def test_bad_reference_period_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        evolve_glacier.main(["data", "X", *_outline_args(), "--reference_period", "2010-1981"])
    assert exit_.value.code == 2
    assert "expected FIRST-LAST years" in capsys.readouterr().err


# --- offline OGGM runs on Hintereisferner ---

@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No connection may leave the process, and OGGM/salem get a HOME that must stay empty."""
    home = tmp_path_factory.mktemp("home")
    refused = []

    def connect(self, address, *args):
        refused.append(address)
        raise OSError(f"test: network connection to {address} refused")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setenv("HOME", str(home))
        yield home, refused


@pytest.fixture(scope="module")
def historical(offline, tmp_path_factory):
    data = tmp_path_factory.mktemp("real")
    assert prepare_glacier.main([
        str(data), "Hintereisferner", *_outline_args(),
        "--temperature", str(SOURCES / "sel_era5_land_monthly_t2m_1981-2018.nc"),
        "--precipitation", str(SOURCES / "sel_era5_land_monthly_prcp_1981-2018.nc"),
        "--orography", str(SOURCES / "sel_era5_land_invariant.nc"), "--monthly_climate",
        "--glacier_wide", str(SOURCES / "mbdata_WGMS-00491.csv"),
        "--last_year", "2006", "--quiet"]) == 0
    out = tmp_path_factory.mktemp("evolution")
    assert evolve_glacier.main([str(data), "Hintereisferner", *_outline_args(), "--model", "a",
                                "--out_dir", str(out), "--quiet"]) == 0
    return data, out


def test_historical_run_matches_glaunti_balances(historical, offline):
    _, out = historical
    summary = json.loads((out / "summary.json").read_text())
    assert summary["historical_years"] == [2004, 2006]  # the RGI outline is of 2003
    binning = summary["binning"]
    diff = np.subtract(binning["adapter_on_flowlines_m_we"], binning["glacier_wide_on_grid_m_we"])
    assert np.all(np.abs(diff) <= BINNING_TOLERANCE_M_WE), diff
    mass = summary["mass_change"]
    # The dynamical run's mass change against the sum of GlaUnTI's balances on the fixed grid:
    # equal up to the binning and the geometry's change (docs/evolution.md), a few per cent.
    assert mass["as_m_we_over_mean_area"] == pytest.approx(
        mass["sum_of_glaunti_glacier_wide_balances_m_we"], rel=0.1)
    with xr.open_dataset(out / "evolution.nc") as ds:
        assert list(ds["model"].values) == ["glaunti", "oggm_ti"]
        assert ds["time"].values.tolist() == [2004, 2005, 2006, 2007]
        assert ds["volume_m3"].attrs["units"] == "m3" and ds["area_m2"].attrs["units"] == "m2"
        assert np.all(np.diff(ds["volume_m3"].values, axis=1) < 0)  # both lose ice every year
    assert (out / "evolution.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["oggm_ti_calibration"]["ref_mb_mm_we"] < 0


def test_adapter_units_and_conventions(historical, offline):
    """m of ice per second at OGGM's density, bias in mm w.e. a⁻¹, months of the balance year."""
    from oggm import cfg

    from core.apps.evolution import relation_from_smb
    from core.apps.smb_elevation import mass_balance_model_class

    data, out = historical
    relation = relation_from_smb(out / "smb" / "a.nc", data, "Hintereisferner")
    mb = mass_balance_model_class()(relation, hemisphere="nh")
    assert mb.rho == mb.ice_density == cfg.PARAMS["ice_density"]
    assert mb.hemisphere == "nh" and mb.valid_bounds[0] < relation.z_range[:, 0].min()
    assert mb.is_year_valid(2004.5) and not mb.is_year_valid(relation.years[-1] + 1)
    heights = np.linspace(2400.0, 3700.0, 14)
    annual = mb.get_annual_mb(heights, year=2004)
    k = relation.index(2004)
    np.testing.assert_allclose(annual * cfg.SEC_IN_YEAR * mb.rho / 1000.0, relation.evaluate(heights, k))
    months = [mb.get_monthly_mb(heights, year=2004 + i / 12) for i in range(12)]
    np.testing.assert_allclose(np.sum(months, axis=0) * cfg.SEC_IN_MONTH, annual * cfg.SEC_IN_YEAR, rtol=1e-10)
    # October (month 0 of the balance year) accumulates at the top; the melt is in summer.
    assert months[0][-1] > 0 and months[10][0] < months[0][0]
    biased = mass_balance_model_class()(relation, bias=365.0)
    np.testing.assert_allclose((annual - biased.get_annual_mb(heights, year=2004)) * cfg.SEC_IN_YEAR * mb.rho,
                               365.0)
    # OGGM's ELA search runs within valid_bounds.
    ela = float(np.atleast_1d(mb.get_ela(year=2004))[0])
    assert relation.z_range[k, 0] < ela < relation.z_range[k, 1] + 1000.0
    assert abs(float(mb.get_annual_mb([ela], year=2004)[0])) * cfg.SEC_IN_YEAR * mb.rho < 1.0  # mm w.e.
    with pytest.raises(ValueError, match="outside the GlaUnTI SMB"):
        mb.get_annual_mb(heights, year=relation.years[-1] + 1)


def test_short_projection_runs_offline(historical, offline, tmp_path):
    data, _ = historical
    code = evolve_glacier.main([str(data), "Hintereisferner", *_outline_args(), "--model", "a",
                                "--until", "2020", "--start_year", "2005",
                                "--gcm_temperature", str(CMIP5 / "tas_mon_CCSM4_rcp26_r1i1p1_g025.nc"),
                                "--gcm_precipitation", str(CMIP5 / "pr_mon_CCSM4_rcp26_r1i1p1_g025.nc"),
                                "--out_dir", str(tmp_path), "--quiet"])
    assert code == 0
    with xr.open_dataset(tmp_path / "evolution.nc") as ds:
        assert float(ds["time"][-1]) == 2021
        assert np.all(np.isfinite(ds["volume_m3"].values))
    with xr.open_dataset(tmp_path / "climate" / "oggm_custom_climate.nc") as ds:
        assert str(ds["time"].values[-1])[:7] == "2020-12" and ds["prcp"].attrs["units"] == "kg m-2"


def test_nothing_reached_for_the_network_or_home(historical, offline):
    home, refused = offline
    assert refused == []
    left = {p.name for p in home.iterdir()}
    assert not left & {".oggm", ".oggm_config", ".salem_cache", "OGGM"}, left


def test_script_has_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "evolve_glacier.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "--gcm_temperature" in out.stdout and "--reference_period" in out.stdout
