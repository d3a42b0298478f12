"""Mass-balance observations -> ``total_smb.csv`` and ``point_smb.csv`` rows of the published layout
(docs/data_format.md §7).

Inputs, all optional for a glacier (without any it is an inference-only glacier):

* glacier-wide balances, either the published ``total_smb.csv`` (m w.e., with dates) or the
  WGMS/OGGM ``mbdata`` CSV (``YEAR``, ``WINTER_BALANCE``, ``SUMMER_BALANCE``, ``ANNUAL_BALANCE`` in
  mm w.e., no dates; the dates come from :func:`balance_year_dates`);
* stakes as the published ``point_smb.csv``;
* WGMS elevation-band profiles (rows = years, columns = band-centre elevations in m, values =
  annual balance in mm w.e.), turned into pseudo-stakes by :func:`profile_pseudo_stakes`.

Dates default to the hydrological year of the hemisphere. North: 1 October of Y−1 … 30 September
of Y, end of winter 1 May (the WGMS convention of the Alps and Scandinavia). South: the analogue
shifted by six months, 1 April of Y−1 … 31 March of Y, end of winter 1 October of Y−1.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

import constants
from dataloader.errors import DataError

DEFAULT_DATES = {"north": "10-01,05-01,09-30", "south": "04-01,10-01,03-31"}
PUBLISHED_GLACIER_WIDE = ("year", "begin_date", "midseason_date", "end_date", "winter_balance",
                          "summer_balance", "annual_balance")
WGMS_GLACIER_WIDE = {"WINTER_BALANCE": "winter_balance", "SUMMER_BALANCE": "summer_balance",
                     "ANNUAL_BALANCE": "annual_balance"}
POINT_REQUIRED = ("year", "point_id", "balance_code", "latitude", "longitude", "balance")
POINT_COLUMNS = ("year", "point_id", "balance_code", "begin_date", "end_date", "latitude",
                 "longitude", "elevation", "balance")
DATE_FORMAT = "%Y-%m-%d"
OPTION = "--balance_year_dates"


# ---------------------------------------------------------------------------------------------
# Dates of the balance years

def _parse_dates(dates: str) -> list[tuple[int, int]]:
    match = re.fullmatch(r"\s*(\d\d)-(\d\d)\s*,\s*(\d\d)-(\d\d)\s*,\s*(\d\d)-(\d\d)\s*", dates)
    problem = (f"'{dates}' is not MM-DD,MM-DD,MM-DD (begin, midseason, end of the balance year), "
               "e.g. 10-01,05-01,09-30")
    if not match:
        raise DataError(None, OPTION, problem)
    parts = [(int(match[i]), int(match[i + 1])) for i in (1, 3, 5)]
    for month, day in parts:
        # 29 February exists only in leap years, so it cannot be a date of every year.
        if (month, day) == (2, 29) or not _valid(month, day):
            raise DataError(None, OPTION, problem + f" ({month:02d}-{day:02d} is not a date of every year)")
    return parts


def _valid(month: int, day: int) -> bool:
    try:
        np.datetime64(f"2001-{month:02d}-{day:02d}")
    except ValueError:
        return False
    return True


def _year_offsets(parts: list[tuple[int, int]], dates: str) -> tuple[int, int]:
    """Years (0 or −1) relative to the end year Y in which the begin and the midseason fall."""
    begin, mid, end = parts
    begin_offset = -1 if begin >= end else 0  # a begin after the end means it starts in Y−1
    mid_offset = 0 if mid <= end else -1
    if (mid_offset, mid) <= (begin_offset, begin) or (mid_offset, mid) >= (0, end):
        raise DataError(None, OPTION, f"'{dates}': the midseason date must lie strictly between the "
                                      "begin and the end of the balance year")
    return begin_offset, mid_offset


def balance_year_dates(years, latitude: float, dates: str | None = None,
                       seasonal=None) -> pd.DataFrame:
    """Begin, midseason and end date of each balance year.

    Args:
        years: (Y,) balance-year labels (the calendar year in which each year ends).
        latitude: of the glacier (degrees); picks the hemisphere's hydrological year by default.
        dates: ``"MM-DD,MM-DD,MM-DD"`` (begin, midseason, end), overriding the default. A begin
            on or after the end in the calendar means the year starts in Y−1; the midseason is
            placed in Y−1 or Y so that it lies between them.
        seasonal: (Y,) bool, the years that get a midseason date (the others are annual-only,
            docs/data_format.md §7.1); default all.

    Returns:
        DataFrame with columns ``year`` (int), ``begin_date``, ``midseason_date`` (NaT where not
        seasonal), ``end_date`` (datetime64).

    Raises:
        DataError: ``dates`` does not parse or its midseason is not inside the year.
    """
    years = np.asarray(years, dtype=int)
    if dates is None:
        dates = DEFAULT_DATES["north" if latitude >= 0 else "south"]
    parts = _parse_dates(dates)
    begin_offset, mid_offset = _year_offsets(parts, dates)
    seasonal = np.ones(years.size, bool) if seasonal is None else np.asarray(seasonal, bool)
    if seasonal.shape != years.shape:
        raise ValueError(f"seasonal has shape {seasonal.shape}, expected {years.shape}")

    def on(year_offset: int, month_day: tuple[int, int]) -> np.ndarray:
        month, day = month_day
        return np.array([np.datetime64(f"{y + year_offset:04d}-{month:02d}-{day:02d}") for y in years],
                        dtype="datetime64[D]")

    mid = on(mid_offset, parts[1])
    mid[~seasonal] = np.datetime64("NaT")
    return pd.DataFrame({"year": years, "begin_date": on(begin_offset, parts[0]).astype("datetime64[ns]"),
                         "midseason_date": mid.astype("datetime64[ns]"),
                         "end_date": on(0, parts[2]).astype("datetime64[ns]")})


def _day(value) -> np.datetime64 | None:
    """A pandas/numpy date as datetime64[D], or None when missing."""
    return None if pd.isna(value) else np.datetime64(pd.Timestamp(value).date(), "D")


def _dates_of(dates_frame: pd.DataFrame, year: int) -> pd.Series:
    match = dates_frame.loc[dates_frame["year"] == year]
    if match.empty:
        raise ValueError(f"dates_frame has no row for year {year}")
    return match.iloc[0]


# ---------------------------------------------------------------------------------------------
# Reading CSV files

def _read_csv(path, **kw) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "does not exist")
    try:
        return pd.read_csv(path, **kw)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(path, None, f"cannot be read as CSV ({str(err).splitlines()[0]})") from None


def _numbers(frame: pd.DataFrame, column: str, path: Path, integer: bool = False) -> np.ndarray:
    """Column as floats (NaN where empty); an error naming the first line that is not a number."""
    text = frame[column].astype(str).str.strip()
    empty = frame[column].isna() | text.isin(["", "nan", "NaN"])
    values = pd.to_numeric(text.where(~empty), errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(np.isnan(values) & ~empty.to_numpy())
    if integer:
        bad = np.union1d(bad, np.flatnonzero(empty.to_numpy() | (values != np.round(values))))
    if bad.size:
        line = int(bad[0]) + 2  # header is line 1
        kind = "an integer" if integer else "a number or empty"
        raise DataError(path, f"column '{column}', line {line}",
                        f"is '{frame[column].iloc[bad[0]]}', expected {kind}")
    return values


def _dates(frame: pd.DataFrame, column: str, path: Path, required: bool) -> np.ndarray:
    """Column of ISO dates as datetime64[ns] (NaT where empty and not ``required``)."""
    text = frame[column].astype(str).str.strip()
    empty = frame[column].isna() | text.isin(["", "nan", "NaN"])
    values = pd.to_datetime(text.where(~empty), format=DATE_FORMAT, errors="coerce")
    bad = np.flatnonzero(values.isna().to_numpy() & (~empty.to_numpy() | required))
    if bad.size:
        raise DataError(path, f"column '{column}', line {int(bad[0]) + 2}",
                        f"is '{frame[column].iloc[bad[0]]}', expected a date YYYY-MM-DD")
    return values.to_numpy(dtype="datetime64[ns]")


def _years_error(path, years: np.ndarray, first_year: int, last_year: int) -> DataError:
    span = f"{int(years.min())}…{int(years.max())}" if years.size else "none"
    return DataError(path, None, f"has observation years {span}, none within the balance years "
                                 f"{first_year}…{last_year} that the climate covers")


def read_glacier_wide(path, first_year: int, last_year: int) -> tuple[pd.DataFrame, dict]:
    """Glacier-wide balances from a published ``total_smb.csv`` or a WGMS/OGGM ``mbdata`` CSV.

    The format is told by the header: ``year, begin_date, …`` (published, m w.e., with dates) or
    ``YEAR, …, ANNUAL_BALANCE`` (WGMS, mm w.e., no dates; ``WINTER_BALANCE``/``SUMMER_BALANCE``
    optional). Rows outside ``first_year … last_year`` are left out and counted.

    Returns:
        (frame, diagnostics). frame: one row per kept year with columns ``year``, ``begin_date``,
        ``midseason_date``, ``end_date`` (datetime64, NaT for WGMS), ``winter_balance``,
        ``summer_balance``, ``annual_balance`` (m w.e., NaN where missing).

    Raises:
        DataError: unknown columns, a value that is not a number/date, a repeated year, or no
            year inside ``first_year … last_year``.
    """
    path = Path(path)
    raw = _read_csv(path, dtype=str, keep_default_na=False)
    columns = [c.strip() for c in raw.columns]
    raw.columns = columns
    if "year" in columns and "begin_date" in columns:
        missing = [c for c in PUBLISHED_GLACIER_WIDE if c not in columns]
        if missing:
            raise DataError(path, None, f"lacks the total_smb.csv columns {missing}")
        kind = "published total_smb.csv"
        frame = pd.DataFrame({"year": _numbers(raw, "year", path, integer=True).astype(int)})
        for column in ("begin_date", "midseason_date", "end_date"):
            frame[column] = _dates(raw, column, path, required=column != "midseason_date")
        for column in PUBLISHED_GLACIER_WIDE[4:]:
            frame[column] = _numbers(raw, column, path)
        late = np.flatnonzero(frame["end_date"].to_numpy() <= frame["begin_date"].to_numpy())
        if late.size:
            raise DataError(path, f"line {int(late[0]) + 2}", "has an end_date not after its begin_date")
    elif "YEAR" in columns and "ANNUAL_BALANCE" in columns:
        kind = "WGMS mbdata (mm w.e.)"
        frame = pd.DataFrame({"year": _numbers(raw, "YEAR", path, integer=True).astype(int)})
        for column in ("begin_date", "midseason_date", "end_date"):
            frame[column] = np.full(len(raw), np.datetime64("NaT"), dtype="datetime64[ns]")
        for source, column in WGMS_GLACIER_WIDE.items():
            frame[column] = (_numbers(raw, source, path) / 1000.0 if source in columns
                             else np.full(len(raw), np.nan))
    else:
        raise DataError(path, None, f"has columns {columns}; expected those of total_smb.csv "
                                    f"({', '.join(PUBLISHED_GLACIER_WIDE)}) or of a WGMS mbdata "
                                    "file (YEAR, WINTER_BALANCE, SUMMER_BALANCE, ANNUAL_BALANCE)")
    repeated = frame["year"][frame["year"].duplicated()]
    if not repeated.empty:
        raise DataError(path, "column 'year'", f"repeats year {int(repeated.iloc[0])}")
    inside = frame["year"].between(first_year, last_year)
    if not inside.any():
        raise _years_error(path, frame["year"].to_numpy(), first_year, last_year)
    kept = frame[inside].reset_index(drop=True)
    diagnostics = {
        "file": str(path), "format": kind,
        "years_in_file": [int(frame["year"].min()), int(frame["year"].max())],
        "years_kept": [int(kept["year"].min()), int(kept["year"].max())],
        "n_years_kept": len(kept), "n_years_left_out": int((~inside).sum()),
        "n_annual": int(kept["annual_balance"].notna().sum()),
        "n_seasonal": int((kept["winter_balance"].notna() | kept["summer_balance"].notna()).sum()),
    }
    return kept, diagnostics


def _balance(value) -> float | None:
    return None if pd.isna(value) else float(value)


def total_smb_table(years, dates_frame: pd.DataFrame, glacier_wide: pd.DataFrame | None) -> list[dict]:
    """Rows of ``total_smb.csv``: one per year of ``years`` (docs/data_format.md §7.1).

    Dates: those of the published file where it gives them; otherwise ``dates_frame``'s, and
    then a year is seasonal (gets its midseason date) exactly when it has a winter or a summer
    balance, so that a year with only an annual balance is modelled as one window. Years
    without observations get empty balances.

    Args:
        years: (Y,) every balance year first … last.
        dates_frame: from :func:`balance_year_dates` for those years.
        glacier_wide: from :func:`read_glacier_wide`, or None.
    """
    observed = {} if glacier_wide is None else {int(r.year): r for r in glacier_wide.itertuples()}
    rows = []
    for year in np.asarray(years, dtype=int):
        default = _dates_of(dates_frame, int(year))
        obs = observed.get(int(year))
        balances = {c: None if obs is None else _balance(getattr(obs, c))
                    for c in ("winter_balance", "summer_balance", "annual_balance")}
        if obs is not None and not pd.isna(obs.begin_date):
            begin, mid, end = _day(obs.begin_date), _day(obs.midseason_date), _day(obs.end_date)
        else:
            seasonal = balances["winter_balance"] is not None or balances["summer_balance"] is not None
            begin, end = _day(default["begin_date"]), _day(default["end_date"])
            mid = _day(default["midseason_date"]) if seasonal else None
        rows.append({"year": int(year), "begin_date": begin, "midseason_date": mid, "end_date": end,
                     **balances})
    return rows


def read_points(path, first_year: int, last_year: int,
                dates_frame: pd.DataFrame) -> tuple[list[dict], dict]:
    """Point balances from a published ``point_smb.csv`` (docs/data_format.md §7.2).

    Rows outside ``first_year … last_year`` and rows without a balance are left out and counted.
    Empty ``begin_date``/``end_date`` are filled with the balance year's dates from
    ``dates_frame`` (annual: begin–end, winter: begin–midseason, summer: midseason–end);
    ``elevation`` may be empty or absent.

    Returns:
        (rows for ``layout.write_csv`` with the columns of ``POINT_COLUMNS``, diagnostics).

    Raises:
        DataError: a missing column, an unknown balance code, a value that is not a number/date,
            coordinates off the globe, dates that cannot be filled, or no row in the period.
    """
    path = Path(path)
    raw = _read_csv(path, dtype=str, keep_default_na=False)
    raw.columns = [c.strip() for c in raw.columns]
    missing = [c for c in POINT_REQUIRED if c not in raw.columns]
    if missing:
        raise DataError(path, None, f"has columns {list(raw.columns)}; lacks the point_smb.csv "
                                    f"columns {missing}")
    for optional in ("begin_date", "end_date", "elevation"):
        if optional not in raw.columns:
            raw[optional] = ""
    year = _numbers(raw, "year", path, integer=True).astype(int)
    latitude, longitude = _numbers(raw, "latitude", path), _numbers(raw, "longitude", path)
    balance, elevation = _numbers(raw, "balance", path), _numbers(raw, "elevation", path)
    begin, end = _dates(raw, "begin_date", path, False), _dates(raw, "end_date", path, False)
    codes = raw["balance_code"].str.strip().str.lower()
    for k in range(len(raw)):
        if codes.iloc[k] not in constants.stake_codes:
            raise DataError(path, f"column 'balance_code', line {k + 2}",
                            f"is '{raw['balance_code'].iloc[k]}', expected one of {constants.stake_codes}")
        if not (-90 <= latitude[k] <= 90 and -180 <= longitude[k] <= 360):
            raise DataError(path, f"line {k + 2}", f"has latitude {latitude[k]}, longitude "
                                                   f"{longitude[k]}: expected WGS 84 degrees")
    inside = (year >= first_year) & (year <= last_year)
    if len(raw) and not inside.any():
        raise _years_error(path, year, first_year, last_year)
    window = {"annual": ("begin_date", "end_date"), "winter": ("begin_date", "midseason_date"),
              "summer": ("midseason_date", "end_date")}
    rows = []
    for k in np.flatnonzero(inside & np.isfinite(balance)):
        code = codes.iloc[k]
        first, last = _day(begin[k]), _day(end[k])
        if first is None or last is None:
            defaults = _dates_of(dates_frame, int(year[k]))
            fill = window.get(code)
            first = first if first is not None or fill is None else _day(defaults[fill[0]])
            last = last if last is not None or fill is None else _day(defaults[fill[1]])
            if first is None or last is None:
                raise DataError(path, f"line {k + 2}", f"has no dates and none can be taken from the "
                                                       f"{code} window of balance year {year[k]}")
        rows.append({"year": int(year[k]), "point_id": str(raw["point_id"].iloc[k]).strip(),
                     "balance_code": code, "begin_date": first, "end_date": last,
                     "latitude": float(latitude[k]),
                     "longitude": float(np.mod(longitude[k] + 180.0, 360.0) - 180.0),
                     "elevation": _balance(elevation[k]), "balance": float(balance[k])})
    diagnostics = {"file": str(path), "n_rows": len(raw), "n_kept": len(rows),
                   "n_outside_years": int((~inside).sum()),
                   "n_without_balance": int((inside & ~np.isfinite(balance)).sum()),
                   "codes": {c: sum(r["balance_code"] == c for r in rows) for c in constants.stake_codes}}
    return rows, diagnostics


# ---------------------------------------------------------------------------------------------
# Elevation-band profiles -> pseudo-stakes

def _read_profile(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(years (n,), band centres (b,) m, balances (n, b) m w.e. with NaN)."""
    raw = _read_csv(path, dtype=str, keep_default_na=False, index_col=0)
    centres = []
    for column in raw.columns:
        try:
            centres.append(float(column))
        except ValueError:
            raise DataError(path, f"column '{column}'", "is not a band-centre elevation in m (expected "
                                                        "a WGMS profile: first column the year, then "
                                                        "one column per band)") from None
    frame = raw.reset_index()
    year_column = frame.columns[0]
    years = _numbers(frame, year_column, path, integer=True).astype(int)
    values = np.column_stack([_numbers(frame, c, path) for c in raw.columns]) / 1000.0
    return years, np.asarray(centres), values


def profile_pseudo_stakes(path, years, dates_frame: pd.DataFrame, z: np.ndarray, mask: np.ndarray,
                          lon: np.ndarray, lat: np.ndarray,
                          band_width: float = 50.0) -> tuple[list[dict], dict]:
    """Pseudo-stakes from a WGMS elevation-band profile of annual balances.

    Modelling choice: the value of a band (a mean over the band's area) is placed as one annual
    point balance at the single glacier cell of that year whose elevation is closest to the
    band centre, and only if that cell lies within half a band width of the centre; bands with
    no such cell are dropped. If two bands pick the same cell, the band whose centre is closer to
    the cell's elevation keeps it. This assumes the balance varies with elevation alone (no
    aspect or shading within a band), and it gives every band the weight of one stake, whatever
    its area. Dates are the balance year's begin and end from ``dates_frame``.

    Args:
        path: profile CSV, rows = years, columns = band centres (m), values mm w.e.
        years: (Y,) balance years of ``z`` and ``mask``.
        dates_frame: from :func:`balance_year_dates`.
        z, mask: (Y, H, W) surface elevation (m) and glacier mask (0/1) per year.
        lon, lat: (H, W) cell centres (degrees, EPSG:4326).
        band_width: m.

    Returns:
        (point rows with point_id ``band_<centre>`` and balance_code ``annual``, diagnostics).

    Raises:
        DataError: a column that is not an elevation, a non-numeric value, or no profile year
            among ``years``.
    """
    path = Path(path)
    file_years, centres, values = _read_profile(path)
    years = np.asarray(years, dtype=int)
    used = np.isin(file_years, years)
    if not used.any():
        raise _years_error(path, file_years, int(years.min()), int(years.max()))
    rows, per_year = [], {}
    no_cell = shared_cell = 0
    for i in np.flatnonzero(used):
        year = int(file_years[i])
        k = int(np.flatnonzero(years == year)[0])
        glacier = mask[k] > 0.5
        dates = _dates_of(dates_frame, year)
        chosen: dict[int, tuple[float, int]] = {}  # cell -> (distance, band)
        for b in np.flatnonzero(np.isfinite(values[i])):
            distance = np.where(glacier, np.abs(z[k] - centres[b]), np.inf)
            cell = int(np.argmin(distance))
            if distance.flat[cell] > band_width / 2:
                no_cell += 1
                continue
            if cell in chosen:
                shared_cell += 1
                if distance.flat[cell] >= chosen[cell][0]:
                    continue
            chosen[cell] = (float(distance.flat[cell]), int(b))
        for cell, (_, b) in sorted(chosen.items(), key=lambda item: centres[item[1][1]]):
            rows.append({"year": year, "point_id": f"band_{centres[b]:g}", "balance_code": "annual",
                         "begin_date": _day(dates["begin_date"]), "end_date": _day(dates["end_date"]),
                         "latitude": float(lat.flat[cell]), "longitude": float(lon.flat[cell]),
                         "elevation": float(z[k].flat[cell]), "balance": float(values[i, b])})
        per_year[str(year)] = len(chosen)
    diagnostics = {"file": str(path), "years_in_file": [int(file_years.min()), int(file_years.max())],
                   "n_years_used": int(used.sum()), "n_years_left_out": int((~used).sum()),
                   "n_pseudo_stakes": len(rows), "pseudo_stakes_per_year": per_year,
                   "n_bands_without_cell": no_cell, "n_bands_sharing_a_cell": shared_cell,
                   "band_width_m": float(band_width),
                   "method": "one annual pseudo-stake per band at the glacier cell closest in "
                             "elevation to the band centre, if within half a band width"}
    return rows, diagnostics
