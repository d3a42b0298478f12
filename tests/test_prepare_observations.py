"""Observations -> total_smb.csv / point_smb.csv rows: balance-year dates, glacier-wide balances
(published and WGMS formats), stakes, and WGMS elevation-band profiles as pseudo-stakes, on small
known inputs and on the real WGMS files of Hintereisferner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import EXAMPLE_SOURCES
from dataloader.errors import DataError
from dataloader.layout import write_csv
from dataloader.prepare.observations import (
    POINT_COLUMNS,
    balance_year_dates,
    profile_pseudo_stakes,
    read_glacier_wide,
    read_points,
    total_smb_table,
)

D = np.datetime64


def real_source(name: str) -> Path:
    return EXAMPLE_SOURCES / name


def dates_of(frame: pd.DataFrame, year: int) -> tuple:
    row = frame.set_index("year").loc[year]
    return tuple(None if pd.isna(v) else D(pd.Timestamp(v).date(), "D")
                 for v in (row.begin_date, row.midseason_date, row.end_date))


def test_hydrological_year_of_each_hemisphere():
    north = balance_year_dates([1990, 2003], latitude=46.8)
    assert dates_of(north, 2003) == (D("2002-10-01"), D("2003-05-01"), D("2003-09-30"))
    south = balance_year_dates([2003], latitude=-41.0)
    assert dates_of(south, 2003) == (D("2002-04-01"), D("2002-10-01"), D("2003-03-31"))


def test_balance_year_dates_override_and_annual_only_years():
    calendar = balance_year_dates([2001], 60.0, dates="01-01,05-15,12-31")
    assert dates_of(calendar, 2001) == (D("2001-01-01"), D("2001-05-15"), D("2001-12-31"))
    # The midseason falls after the end in the calendar: it belongs to Y-1, like the begin.
    late = balance_year_dates([2001], 60.0, dates="09-25,11-30,09-20")
    assert dates_of(late, 2001) == (D("2000-09-25"), D("2000-11-30"), D("2001-09-20"))
    # A shared boundary day: begin MM-DD equal to the end MM-DD starts in Y-1.
    shared = balance_year_dates([1995, 1996], 46.0, dates="10-01,04-30,10-01",
                                seasonal=[True, False])
    assert dates_of(shared, 1995) == (D("1994-10-01"), D("1995-04-30"), D("1995-10-01"))
    assert dates_of(shared, 1996) == (D("1995-10-01"), None, D("1996-10-01"))


@pytest.mark.parametrize("dates", ["10-01,05-01", "13-01,05-01,09-30", "10-01,02-29,09-30",
                                   "10-01,05-01,09-31", "1-10,05-01,09-30", "10-01,10-01,09-30",
                                   "01-01,12-31,06-30"])
def test_balance_year_dates_that_do_not_parse(dates):
    with pytest.raises(DataError, match=f"--balance_year_dates '{dates}'"):
        balance_year_dates([2000], 46.0, dates=dates)


MBDATA = """YEAR,WGMS_ID,NAME,AREA,WINTER_BALANCE,SUMMER_BALANCE,ANNUAL_BALANCE,REMARKS
1988,1,X,,,,-945.0,
1991,1,X,8.8,,,-1325.0,
1992,1,X,8.8,1200.0,-2000.0,-800.0,"a remark, with a comma"
1993,1,X,8.8,,,,
2021,1,X,8.8,1000.0,-1500.0,-500.0,
"""


def test_wgms_mbdata_in_mm_and_years_outside(tmp_path):
    path = tmp_path / "mbdata.csv"
    path.write_text(MBDATA)
    frame, diag = read_glacier_wide(path, 1990, 2000)
    assert frame["year"].tolist() == [1991, 1992, 1993]
    np.testing.assert_allclose(frame["annual_balance"].to_numpy(), [-1.325, -0.8, np.nan])
    np.testing.assert_allclose(frame["winter_balance"].to_numpy(), [np.nan, 1.2, np.nan])
    assert frame["begin_date"].isna().all()
    assert diag["n_years_left_out"] == 2 and diag["n_seasonal"] == 1
    assert diag["years_in_file"] == [1988, 2021]


def test_total_smb_table_rows_and_csv(tmp_path):
    path = tmp_path / "mbdata.csv"
    path.write_text(MBDATA)
    frame, _ = read_glacier_wide(path, 1990, 2000)
    years = np.arange(1990, 1994)
    rows = total_smb_table(years, balance_year_dates(years, 46.8), frame)
    assert [r["year"] for r in rows] == [1990, 1991, 1992, 1993]
    # 1990 has no observation; 1991 only an annual balance: both annual-only (no midseason).
    assert rows[0]["annual_balance"] is None and rows[0]["midseason_date"] is None
    assert rows[1]["midseason_date"] is None and rows[1]["annual_balance"] == pytest.approx(-1.325)
    # 1992 has winter and summer balances: seasonal.
    assert rows[2]["midseason_date"] == D("1992-05-01")
    columns = (("year", None), ("begin_date", None), ("midseason_date", None), ("end_date", None),
               ("winter_balance", 3), ("summer_balance", 3), ("annual_balance", 3))
    write_csv(tmp_path / "total_smb.csv", columns, rows)
    lines = (tmp_path / "total_smb.csv").read_text().splitlines()
    assert lines[2] == "1991,1990-10-01,,1991-09-30,,,-1.325"
    assert lines[3] == "1992,1991-10-01,1992-05-01,1992-09-30,1.200,-2.000,-0.800"


def test_published_total_smb_keeps_its_dates(tmp_path):
    path = tmp_path / "total_smb.csv"
    path.write_text("year,begin_date,midseason_date,end_date,winter_balance,summer_balance,annual_balance\n"
                    "1990,1989-10-02,1990-05-16,1990-09-26,1.5,-1.844,-0.311\n"
                    "1991,1990-09-26,,1991-09-26,,,\n")
    frame, diag = read_glacier_wide(path, 1990, 1992)
    assert diag["format"] == "published total_smb.csv"
    rows = total_smb_table([1990, 1991, 1992], balance_year_dates([1990, 1991, 1992], 46.0), frame)
    assert (rows[0]["begin_date"], rows[0]["midseason_date"], rows[0]["end_date"]) == \
        (D("1989-10-02"), D("1990-05-16"), D("1990-09-26"))
    assert rows[0]["annual_balance"] == pytest.approx(-0.311)  # already m w.e.
    assert rows[1]["midseason_date"] is None and rows[1]["end_date"] == D("1991-09-26")
    assert rows[2]["begin_date"] == D("1991-10-01")  # no row: the default dates


def test_real_wgms_mbdata_hintereisferner():
    frame, diag = read_glacier_wide(real_source("mbdata_WGMS-00491.csv"), 1990, 2018)
    annual = frame.set_index("year")["annual_balance"]
    assert annual[2003] == pytest.approx(-1.796)
    assert annual[2018] == pytest.approx(-1.963)
    assert diag["n_years_kept"] == 29 and diag["years_in_file"] == [1953, 2020]
    # Seasonal balances exist from 2013 on.
    assert diag["n_seasonal"] == 6


def test_glacier_wide_bad_inputs(tmp_path):
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("jahr,bilanz\n2000,-1.0\n")
    with pytest.raises(DataError, match=r"unknown\.csv: has columns \['jahr', 'bilanz'\]; expected"):
        read_glacier_wide(unknown, 1990, 2018)
    with pytest.raises(DataError, match=r"mbdata_WGMS-00491\.csv: has observation years 1953…2020, "
                                        r"none within the balance years 1930…1950"):
        read_glacier_wide(real_source("mbdata_WGMS-00491.csv"), 1930, 1950)
    text = tmp_path / "text.csv"
    text.write_text("YEAR,ANNUAL_BALANCE\n2000,-100\n2001,minus\n")
    with pytest.raises(DataError, match=r"column 'ANNUAL_BALANCE', line 3 is 'minus'"):
        read_glacier_wide(text, 1990, 2018)
    twice = tmp_path / "twice.csv"
    twice.write_text("YEAR,ANNUAL_BALANCE\n2000,-100\n2000,-200\n")
    with pytest.raises(DataError, match="repeats year 2000"):
        read_glacier_wide(twice, 1990, 2018)
    baddate = tmp_path / "baddate.csv"
    baddate.write_text("year,begin_date,midseason_date,end_date,winter_balance,summer_balance,"
                       "annual_balance\n2000,01.10.1999,,2000-09-30,,,-1\n")
    with pytest.raises(DataError, match=r"column 'begin_date', line 2 is '01.10.1999', expected a date"):
        read_glacier_wide(baddate, 1990, 2018)


POINTS = """year,point_id,balance_code,begin_date,end_date,latitude,longitude,elevation,balance
1989,S1,annual,1988-10-01,1989-09-30,46.8,10.76,3000,-1.0
1993,S1,annual,1992-10-04,1993-09-22,46.8146759,10.7491468,3351.8,0.582
1993,S1,winter,,,46.8146759,10.7491468,,1.083
1993,S2,summer,,,46.81,349.25,3100,-0.5
1993,S3,annual,,,46.81,10.75,3100,
"""


def test_read_points_fills_dates_and_counts_left_out(tmp_path):
    path = tmp_path / "point_smb.csv"
    path.write_text(POINTS)
    rows, diag = read_points(path, 1990, 1998, balance_year_dates(np.arange(1990, 1999), 46.8))
    assert [(r["point_id"], r["balance_code"]) for r in rows] == [("S1", "annual"), ("S1", "winter"),
                                                                  ("S2", "summer")]
    assert (rows[0]["begin_date"], rows[0]["end_date"]) == (D("1992-10-04"), D("1993-09-22"))
    assert (rows[1]["begin_date"], rows[1]["end_date"]) == (D("1992-10-01"), D("1993-05-01"))
    assert (rows[2]["begin_date"], rows[2]["end_date"]) == (D("1993-05-01"), D("1993-09-30"))
    assert rows[1]["elevation"] is None
    assert rows[2]["longitude"] == pytest.approx(-10.75)  # 0-360 folded to -180..180
    assert diag["n_outside_years"] == 1 and diag["n_without_balance"] == 1
    write_csv(tmp_path / "out.csv", [(c, 3) for c in POINT_COLUMNS], rows)
    assert (tmp_path / "out.csv").read_text().splitlines()[2] == \
        "1993,S1,winter,1992-10-01,1993-05-01,46.815,10.749,,1.083"


def test_read_points_bad_inputs(tmp_path):
    dates = balance_year_dates(np.arange(1990, 1999), 46.8)
    path = tmp_path / "point_smb.csv"
    path.write_text(POINTS.replace("1993,S2,summer", "1993,S2,spring"))
    with pytest.raises(DataError, match=r"column 'balance_code', line 5 is 'spring'"):
        read_points(path, 1990, 1998, dates)
    path.write_text(POINTS)
    with pytest.raises(DataError, match=r"point_smb\.csv: has observation years 1989…1993, none "
                                        r"within the balance years 2000…2010"):
        read_points(path, 2000, 2010, balance_year_dates(np.arange(2000, 2011), 46.8))
    short = tmp_path / "short.csv"
    short.write_text("year,point_id,balance\n1993,S1,0.5\n")
    with pytest.raises(DataError, match="lacks the point_smb.csv columns"):
        read_points(short, 1990, 1998, dates)


def synthetic_profile(tmp_path: Path) -> Path:
    # Bands 2476 (irregular, as in the WGMS file) and 2475 compete for one cell; 2575 is empty;
    # 2775 and 3025 have no glacier cell within 25 m. Values in mm w.e.
    path = tmp_path / "profile.csv"
    path.write_text(",2425,2475,2476,2525,2575,2625,2725,2775,3025\n"
                    "1999,-1,-2,-3,-4,-5,-6,-7,-8,-9\n"
                    "2003,-6000,-5500,-5400,-5000,,-4000,-3000,-2500,500\n")
    return path


Z = np.array([[[2410.0, 2460.0, 2500.0, 2540.0],
               [2600.0, 2700.0, 2810.0, 3000.0]]])
MASK = np.array([[[1, 1, 1, 1], [1, 1, 1, 0]]])
LON = 10.0 + 0.001 * np.arange(4)[None, :].repeat(2, axis=0)
LAT = 46.0 + 0.001 * np.arange(2)[:, None].repeat(4, axis=1)


def test_profile_pseudo_stakes_on_known_field(tmp_path):
    dates = balance_year_dates([2003], 46.0)
    rows, diag = profile_pseudo_stakes(synthetic_profile(tmp_path), [2003], dates, Z, MASK, LON, LAT)
    got = {r["point_id"]: (r["latitude"], r["longitude"], r["elevation"], r["balance"]) for r in rows}
    assert got == {
        "band_2425": (46.0, 10.0, 2410.0, -6.0),
        "band_2475": (46.0, 10.001, 2460.0, -5.5),  # 15 m away; 2476 is 16 m away and loses the cell
        "band_2525": (46.0, 10.003, 2540.0, -5.0),
        "band_2625": (46.001, 10.0, 2600.0, -4.0),  # exactly half a band width: kept
        "band_2725": (46.001, 10.001, 2700.0, -3.0),
    }
    assert all(r["balance_code"] == "annual" and r["begin_date"] == D("2002-10-01")
               and r["end_date"] == D("2003-09-30") for r in rows)
    assert diag["n_bands_sharing_a_cell"] == 1 and diag["n_bands_without_cell"] == 2
    assert diag["n_years_left_out"] == 1
    # A wider band takes the 2775 band to the 2810 m cell (35 m away).
    wide, _ = profile_pseudo_stakes(synthetic_profile(tmp_path), [2003], dates, Z, MASK, LON, LAT,
                                    band_width=80.0)
    assert "band_2775" in {r["point_id"] for r in wide}


def test_profile_bad_inputs(tmp_path):
    dates = balance_year_dates([2003], 46.0)
    bad = tmp_path / "bad.csv"
    bad.write_text(",2425,top\n2003,-1,-2\n")
    with pytest.raises(DataError, match=r"bad\.csv: column 'top' is not a band-centre elevation"):
        profile_pseudo_stakes(bad, [2003], dates, Z, MASK, LON, LAT)
    with pytest.raises(DataError, match="has observation years 1999…2003, none within the balance "
                                        "years 2010…2010"):
        profile_pseudo_stakes(synthetic_profile(tmp_path), [2010], balance_year_dates([2010], 46.0),
                              Z, MASK, LON, LAT)


def test_real_profile_pseudo_stakes_on_a_synthetic_field():
    path = real_source("profile_WGMS-00491.csv")
    years = np.arange(1990, 2019)
    # A smooth field 2400 … 3800 m (steps of ~1.2 m): every band of the file finds a cell.
    z = np.broadcast_to(np.linspace(2400.0, 3800.0, 1200).reshape(30, 40), (years.size, 30, 40))
    mask = np.ones_like(z)
    lon, lat = np.zeros((30, 40)), np.zeros((30, 40))
    rows, diag = profile_pseudo_stakes(path, years, balance_year_dates(years, 46.8), z, mask, lon, lat)
    profile = pd.read_csv(path, index_col=0)
    assert diag["pseudo_stakes_per_year"]["2003"] == int(profile.loc[2003].notna().sum()) == 27
    band_2003 = {r["point_id"]: r["balance"] for r in rows if r["year"] == 2003}
    assert band_2003["band_2425"] == pytest.approx(-7.214)
    assert band_2003["band_3725"] == pytest.approx(-0.75)
    assert diag["n_years_used"] == 29
