"""The CSV tables of a glacier: season dates and glacier-wide balances (total_smb.csv), stake
and pit readings (point_smb.csv).

Fields are parsed as strings and converted one by one, so that a bad field raises `DataError`
naming the file, column and line (docs/data_format.md §7).
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyproj

import constants
from dataloader import tensors as T
from dataloader.errors import DataError
from dataloader.rasters import Grid

_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """All fields as strings ('' = missing), with the required columns checked."""
    if not path.is_file():
        raise DataError(path, None, "is missing (required file)")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as error:
        raise DataError(path, None, f"could not be read as CSV ({error})") from error
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(path, f"columns {missing}", f"are missing (found {list(table.columns)})")
    return table


def _line(row: int) -> str:
    """File line of a table row (the header is line 1)."""
    return f"line {row + 2}"


def _parse_int(path: Path, column: str, row: int, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(path, f"column {column!r}, {_line(row)},", f"is {text!r}, expected an integer") from None


def _parse_float(path: Path, column: str, row: int, text: str) -> float:
    """Float or NaN for an empty field."""
    if text == "":
        return np.nan
    try:
        return float(text)
    except ValueError:
        raise DataError(path, f"column {column!r}, {_line(row)},", f"is {text!r}, expected a number") from None


def _parse_date(path: Path, column: str, row: int, text: str) -> np.datetime64:
    """ISO YYYY-MM-DD date, or NaT for an empty field."""
    if text == "":
        return np.datetime64("NaT", "D")
    try:
        if not _ISO_DATE.match(text):
            raise ValueError(text)
        return np.datetime64(datetime.date.fromisoformat(text), "D")
    except ValueError:
        raise DataError(path, f"column {column!r}, {_line(row)},", f"is {text!r}, expected a "
                        "date YYYY-MM-DD") from None


@dataclasses.dataclass(frozen=True)
class Seasons:
    """Season dates and glacier-wide balances of total_smb.csv, one entry per balance year."""

    years: np.ndarray  # (Y,) int
    begin: np.ndarray  # (Y,) datetime64[D]
    mid: np.ndarray  # (Y,) datetime64[D], NaT for annual-only years
    end: np.ndarray  # (Y,) datetime64[D]
    balances: np.ndarray  # (Y, 3) float32 annual, winter, summer; NaN if missing


def read_total_smb(path: Path, years: np.ndarray) -> Seasons:
    """Season dates and balances of every balance year in `years`, validated."""
    dates = ("begin_date", "midseason_date", "end_date")
    balances = ("annual_balance", "winter_balance", "summer_balance")
    table = _read_csv(path, ("year", *dates, *balances))
    file_years = [_parse_int(path, "year", i, v) for i, v in enumerate(table["year"])]
    wanted = set(years.tolist())
    repeated = sorted({y for y in file_years if y in wanted and file_years.count(y) > 1})
    if repeated:
        raise DataError(path, "column 'year'", f"repeats {repeated}, expected one row per year")
    missing = sorted(wanted - set(file_years))
    if missing:
        raise DataError(path, "column 'year'", f"lacks {missing}, expected every year "
                        f"{years[0]} … {years[-1]}")
    row_of = {y: i for i, y in enumerate(file_years)}
    parsed = {c: [] for c in (*dates, *balances)}
    for year in years.tolist():
        i = row_of[year]
        begin, mid, end = (_parse_date(path, c, i, table[c].iloc[i]) for c in dates)
        for column, date in (("begin_date", begin), ("end_date", end)):
            if np.isnat(date):
                raise DataError(path, f"column {column!r}, {_line(i)},", "is empty, expected a date")
        if end < begin:
            raise DataError(path, f"year {year}, {_line(i)},", f"ends ({end}) before it begins ({begin})")
        if not np.isnat(mid) and not begin <= mid <= end:
            raise DataError(path, f"column 'midseason_date', {_line(i)},",
                            f"is {mid}, expected within [{begin}, {end}]")
        for column, date in zip(dates, (begin, mid, end)):
            parsed[column].append(date)
        for column in balances:
            parsed[column].append(_parse_float(path, column, i, table[column].iloc[i]))
    return Seasons(
        years=years,
        begin=np.array(parsed["begin_date"], "datetime64[D]"),
        mid=np.array(parsed["midseason_date"], "datetime64[D]"),
        end=np.array(parsed["end_date"], "datetime64[D]"),
        balances=np.array([parsed[c] for c in balances], np.float32).T.copy(),
    )


def read_point_smb(
    path: Path, seasons: Seasons, grid: Grid, first_date: np.datetime64
) -> dict[str, np.ndarray]:
    """Stake arrays of GlacierTensors, (N,) each; empty if the glacier has no point file.

    Rows of years outside 1990 … max_year cannot be modelled and are left out; rows without a
    balance carry no information and are left out too.
    """
    columns = ("year", "point_id", "balance_code", "begin_date", "end_date", "latitude",
               "longitude", "balance")
    kept = {c: [] for c in ("line", "k", "code", "begin", "end", "lat", "lon", "balance", "id")}
    if path.exists():
        table = _read_csv(path, columns)
        year_index = {int(y): k for k, y in enumerate(seasons.years)}
        for i, record in enumerate(table.to_dict("records")):
            year = _parse_int(path, "year", i, record["year"])
            code = record["balance_code"]
            if code not in constants.stake_codes:
                raise DataError(path, f"column 'balance_code', {_line(i)},",
                                f"is {code!r}, expected one of {constants.stake_codes}")
            begin = _parse_date(path, "begin_date", i, record["begin_date"])
            end = _parse_date(path, "end_date", i, record["end_date"])
            for column, date in (("begin_date", begin), ("end_date", end)):
                if np.isnat(date):
                    raise DataError(path, f"column {column!r}, {_line(i)},", "is empty, expected a date")
            if end < begin:
                raise DataError(path, f"{_line(i)}", f"ends ({end}) before it begins ({begin})")
            latitude = _parse_float(path, "latitude", i, record["latitude"])
            longitude = _parse_float(path, "longitude", i, record["longitude"])
            if not (np.isfinite(latitude) and np.isfinite(longitude)):
                raise DataError(path, f"{_line(i)}", "has no latitude/longitude, expected both")
            balance = _parse_float(path, "balance", i, record["balance"])
            if year not in year_index or not np.isfinite(balance):
                continue
            values = (i, year_index[year], constants.stake_codes.index(code), begin, end, latitude,
                      longitude, balance, record["point_id"])
            for column, value in zip(kept, values):
                kept[column].append(value)

    k = np.array(kept["k"], np.int32)
    code = np.array(kept["code"], np.int8)
    begin = np.array(kept["begin"], "datetime64[D]")
    end = np.array(kept["end"], "datetime64[D]")
    row, col = _stake_cells(path, grid, np.array(kept["lat"], float), np.array(kept["lon"], float),
                            kept["line"], kept["id"])
    return {
        "stake_year": k,
        "stake_code": code,
        "stake_row": row,
        "stake_col": col,
        "stake_balance": np.array(kept["balance"], np.float32),
        "stake_begin_day": (begin - first_date).astype(np.int32),
        "stake_end_day": (end - first_date).astype(np.int32),
        "stake_weight": _stake_weights(seasons, k, code, begin, end),
        "stake_id": np.array(kept["id"], str),
    }


def _stake_cells(
    path: Path, grid: Grid, lat: np.ndarray, lon: np.ndarray, line: list, point_id: list
) -> tuple[np.ndarray, np.ndarray]:
    """(N,) int32 row and column of each stake: WGS 84 → CRS of outlines.nc, then floor of the
    inverse corner-based transform (x_left = x[0] − dx/2, y_top = y[0] + dy/2)."""
    transformer = pyproj.Transformer.from_crs("EPSG:4326", grid.crs, always_xy=True)
    easting, northing = (np.asarray(v, float) for v in transformer.transform(lon, lat))
    x_left, y_top = grid.x[0] - grid.dx / 2, grid.y[0] + grid.dy / 2
    col = np.floor((easting - x_left) / grid.dx)
    row = np.floor((y_top - northing) / grid.dy)
    height, width = grid.shape
    outside = ~((row >= 0) & (row < height) & (col >= 0) & (col < width))
    if outside.any():
        i = int(np.argmax(outside))
        raise DataError(
            path, f"point {point_id[i]!r}, {_line(line[i])},",
            f"at latitude {lat[i]}, longitude {lon[i]} lies at ({easting[i]:.1f}, {northing[i]:.1f}) "
            f"in {grid.crs.name}, outside the grid (x {x_left:.1f} … {x_left + width * grid.dx:.1f}, "
            f"y {y_top - height * grid.dy:.1f} … {y_top:.1f}); expected a point inside it",
        )
    return row.astype(np.int32), col.astype(np.int32)


def _stake_weights(
    seasons: Seasons, k: np.ndarray, code: np.ndarray, begin: np.ndarray, end: np.ndarray
) -> np.ndarray:
    """(N,) float32 calibration date weights (docs/data_format.md §7.2, docs/model.md §5).

    Δ are whole days between the stake's dates and the dates of the season run: annual →
    (begin, end), winter → (begin, midseason), summer → (midseason, end). Index stakes and
    winter/summer stakes of annual-only years are no calibration targets: weight 0.
    """
    winter, summer = constants.stake_codes.index("winter"), constants.stake_codes.index("summer")
    run_begin = np.where(code == summer, seasons.mid[k], seasons.begin[k])
    run_end = np.where(code == winter, seasons.mid[k], seasons.end[k])
    one_day = np.timedelta64(1, "D")
    # Δ is NaN where the run date is NaT (annual-only years); those weights are zeroed below.
    weight = T.stake_date_weight((begin - run_begin) / one_day, (end - run_end) / one_day)
    seasonal_code = (code == winter) | (code == summer)
    not_target = (code == constants.index_stake_code) | (seasonal_code & np.isnat(seasons.mid[k]))
    return np.where(not_target, np.float32(0), weight).astype(np.float32)
