"""What the twin's observers record: season dates, glacier-wide balances, stake readings and
end-of-summer facies maps, all derived from the truth plus measurement noise and the gaps and
irregularities of real monitoring programmes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from dataloader.synthetic.geometry import CELL, Geometry, smooth_noise, to_lonlat
from dataloader.synthetic.regions import Region
from dataloader.synthetic.truth import Truth, period_weights

# Measurement noise (m w.e.): glacier-wide winter/summer/annual, stakes per balance code.
GLACIER_WIDE_NOISE = {"winter": 0.08, "summer": 0.1, "annual": 0.1}
STAKE_NOISE = {"annual": 0.15, "winter": 0.1, "summer": 0.15, "index": 0.1}

# SWE (m w.e.) above which a cell counts as snow or firn covered. The TI state never drops
# below ~0.035 m (its softplus keeps it positive), so the threshold sits clearly above that.
SNOW_COVER = 0.1
FACIES_CLASSES = ("ice", "snow", "debris", "firn", "shadow", "superimposed-ice", "cloud", "water")
ICE, SNOW, DEBRIS, FIRN, SHADOW, SUPERIMPOSED, CLOUD, WATER = range(8)


@dataclass(frozen=True)
class Seasons:
    begin: np.ndarray     # (Y,) datetime64[D]
    mid: np.ndarray       # (Y,) datetime64[D]; internal midseason, also for annual-only years
    end: np.ndarray       # (Y,) datetime64[D]
    seasonal: np.ndarray  # (Y,) bool: the midseason date is published


def _date(year: int, month: int, day: int) -> np.datetime64:
    return np.datetime64(f"{year:04d}-{month:02d}-{day:02d}")


def season_dates(years: np.ndarray, region: Region, boundary: str, seasonal: str,
                 rng: np.random.Generator) -> Seasons:
    """``boundary``: 'shared' (the end day of a year is the next begin day), 'next' (the next
    year begins the day after), 'mixed' (either, by chance) or 'fixed' (1 Oct - 30 Sep).
    ``seasonal``: 'all', 'none' or 'mixed' years with a published midseason date."""
    n = years.size
    begin = np.empty(n, dtype="datetime64[D]")
    mid = np.empty(n, dtype="datetime64[D]")
    end = np.empty(n, dtype="datetime64[D]")
    for k, year in enumerate(years):
        if boundary == "fixed":
            end[k] = _date(year, 9, 30)
            begin[k] = _date(year - 1, 10, 1)
        else:
            # Surveys happen within a few days of 1 October, as weather and logistics allow.
            end[k] = _date(year, 10, 1) + rng.integers(-8, 10)
            if k == 0:
                begin[k] = _date(year - 1, 10, 1) + rng.integers(0, 4)
            else:
                shared = boundary == "shared" or (boundary == "mixed" and rng.random() < 0.5)
                begin[k] = end[k - 1] if shared else end[k - 1] + 1
        month, day = region.midseason
        mid[k] = _date(year, month, day) + rng.integers(-10, 11)
    if seasonal == "all":
        flags = np.ones(n, dtype=bool)
    elif seasonal == "none":
        flags = np.zeros(n, dtype=bool)
    else:
        flags = rng.random(n) < 0.65
    return Seasons(begin=begin, mid=mid, end=end, seasonal=flags)


def glacier_wide_rows(years: np.ndarray, study_start: int, seasons: Seasons, truth: Truth,
                      geometry: Geometry, rng: np.random.Generator) -> list[dict]:
    """One row per year with noisy outline-mean balances and realistic gaps."""
    rows = []
    missing_rate = rng.uniform(0.03, 0.12)
    for k, year in enumerate(years):
        mask = geometry.mask[k]
        annual, winter, summer = (float(truth.fields[k, w][mask].mean()) for w in range(3))
        spin_up = year < study_start
        gap = 0.35 if spin_up else missing_rate
        whole_year_missing = rng.random() < (0.15 if spin_up else 0.3 * missing_rate)
        noisy = {c: v + rng.normal(0.0, GLACIER_WIDE_NOISE[c])
                 for c, v in (("winter", winter), ("summer", summer), ("annual", annual))}
        values = {"winter": None, "summer": None, "annual": None}
        if not whole_year_missing:
            if seasons.seasonal[k]:
                values["winter"] = noisy["winter"] if rng.random() >= gap else None
                values["summer"] = noisy["summer"] if rng.random() >= gap else None
                if rng.random() >= gap:
                    # Observers report annual = winter + summer when both are measured.
                    both = values["winter"] is not None and values["summer"] is not None
                    values["annual"] = values["winter"] + values["summer"] if both else noisy["annual"]
            else:
                values["annual"] = noisy["annual"] if rng.random() >= gap else None
                if rng.random() < 0.08:
                    # A winter sounding without a published midseason date: carried, not used.
                    values["winter"] = noisy["winter"]
        rows.append({
            "year": int(year), "begin_date": seasons.begin[k],
            "midseason_date": seasons.mid[k] if seasons.seasonal[k] else None,
            "end_date": seasons.end[k],
            "winter_balance": values["winter"], "summer_balance": values["summer"],
            "annual_balance": values["annual"],
        })
    return rows


def _jitter(rng: np.random.Generator) -> int:
    """Days between a stake reading and the glacier's season date: mostly a couple of days,
    sometimes up to two weeks."""
    if rng.random() < 0.1:
        return int(rng.choice([-1, 1]) * rng.integers(5, 15))
    return int(np.round(rng.normal(0.0, 2.0)))


def stake_rows(years: np.ndarray, study_start: int, seasons: Seasons, truth: Truth,
               geometry: Geometry, cells: np.ndarray, ids: list[str], internal_start: np.datetime64,
               rng: np.random.Generator) -> list[dict]:
    """Stake readings at ``cells`` (flat indices): truth over the stake's own dates + noise."""
    height, width = geometry.mask.shape[1:]
    rows_idx, cols_idx = np.unravel_index(cells, (height, width))
    # A stake stands somewhere inside its 100 m cell (kept 15 m away from the cell edges).
    east = geometry.x[cols_idx] + rng.uniform(-35, 35, cells.size)
    north = geometry.y[rows_idx] + rng.uniform(-35, 35, cells.size)
    lon, lat = to_lonlat(geometry.epsg, east, north)
    spot_offset = rng.normal(0.0, 2.0, cells.size)
    assert np.all(np.abs(east - geometry.x[cols_idx]) < CELL / 2)

    n_days = truth.stake_daily.shape[0]
    day_numbers = np.arange(n_days)

    def balance(stake: int, first: np.datetime64, last: np.datetime64) -> float:
        a = int((first - internal_start).astype(int))
        b = int((last - internal_start).astype(int))
        lo, hi = max(a, 0), min(b, n_days - 1) + 1
        return float(period_weights(day_numbers[lo:hi], a, b) @ truth.stake_daily[lo:hi, stake])

    first_year = int(rng.choice([years[0], years[0] + 2, years[0] + 3, study_start]))
    rows = []
    for k, year in enumerate(years):
        if year < first_year or (year > study_start and rng.random() < 0.12):
            continue  # programme not started yet, or no field campaign that year
        begin, mid, end = seasons.begin[k], seasons.mid[k], seasons.end[k]
        if seasons.seasonal[k]:
            chances = {"annual": 0.85, "winter": 0.85, "summer": 0.8}
        else:
            # Occasional seasonal readings in annual-only years: carried but not calibrated on.
            chances = {"annual": 0.9, "winter": 0.08, "summer": 0.08}
        periods = {"annual": (begin, end), "winter": (begin, mid), "summer": (mid, end)}
        # Surveyed stake heights: the DEM of the year plus a fixed offset of the stake's spot.
        elevation = geometry.z[k].ravel()[cells] + spot_offset
        for s in range(cells.size):
            for code in ("annual", "winter", "summer"):
                if rng.random() >= chances[code]:
                    continue
                first = periods[code][0] + _jitter(rng)
                last = periods[code][1] + _jitter(rng)
                rows.append(_stake_row(year, ids[s], code, first, last, lat[s], lon[s],
                                       elevation[s],
                                       balance(s, first, last) + rng.normal(0, STAKE_NOISE[code])))
        if rng.random() < 0.25:
            # Spring probing of a few stakes: intermediate 'index' readings.
            for s in rng.choice(cells.size, size=min(2, cells.size), replace=False):
                first = begin + _jitter(rng)
                last = _date(int(year), 3, 15) + int(rng.integers(0, 27))
                rows.append(_stake_row(year, ids[s], "index", first, last, lat[s], lon[s],
                                       elevation[s],
                                       balance(s, first, last) + rng.normal(0, STAKE_NOISE["index"])))
    return rows


def _stake_row(year, point_id, code, first, last, lat, lon, elevation, value) -> dict:
    return {"year": int(year), "point_id": point_id, "balance_code": code, "begin_date": first,
            "end_date": last, "latitude": float(lat), "longitude": float(lon),
            "elevation": float(elevation), "balance": float(value)}


def facies_maps(years: np.ndarray, map_years: list[int], truth: Truth, geometry: Geometry,
                region: Region, rng: np.random.Generator) -> np.ndarray:
    """(len(map_years), 9, H, W) float32 class probabilities + confidence of the late-summer
    surface, NaN off the glacier of that year."""
    height, width = geometry.mask.shape[1:]
    maps = np.full((len(map_years), 9, height, width), np.nan, dtype=np.float32)
    for m, year in enumerate(map_years):
        k = int(np.flatnonzero(years == year)[0])
        swe = truth.swe_late_summer[k]
        previous = truth.swe_late_summer[k - 1] if k > 0 else swe
        recent = truth.swe_late_summer[max(k - 3, 0):k + 1].max(axis=0)
        # Snow: this year's snow survived the summer (net gain). Firn: older snow exposed, or
        # snow-covered at the end of one of the last summers. Ice elsewhere.
        snow = (swe > SNOW_COVER) & (swe >= previous - 0.005)
        firn = ~snow & ((swe > SNOW_COVER) | (recent > SNOW_COVER))
        surface = np.where(snow, SNOW, np.where(firn, FIRN, ICE))
        surface = np.where((surface != SNOW) & (geometry.debris > 0.35), DEBRIS, surface)
        if region.code in ("SVAL", "ICL") and (surface == ICE).any():
            # Refrozen melt water just below the firn line on cold glaciers.
            z = geometry.z[k]
            upper = z[(surface == SNOW) | (surface == FIRN)]
            line = upper.min() if upper.size else z[geometry.mask[k]].max()
            surface = np.where((surface == ICE) & (z > line - 40.0), SUPERIMPOSED, surface)
        low_ice = (surface == ICE) & (geometry.relative_elevation < 0.15)
        ponds = low_ice & (rng.random(surface.shape) < 0.03)
        surface = np.where(ponds, WATER, surface)

        label = np.where((geometry.shade > 0.55) & (rng.random(surface.shape) < 0.8), SHADOW, surface)
        if rng.random() < 0.35:
            rows, cols = np.mgrid[0:height, 0:width]
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            radius = rng.uniform(0.1, 0.3) * max(height, width)
            label = np.where(np.hypot(rows - cy, cols - cx) < radius, CLOUD, label)

        # Soft probabilities: the dominant class takes most, the easily confused class
        # (snow<->firn, ice<->debris, shadow/cloud<->the surface below) a good part of the rest.
        dominant = np.clip(0.75 + 0.12 * smooth_noise(rng, (height, width), 1.5), 0.5, 0.97)
        partner_of = np.array([DEBRIS, FIRN, ICE, SNOW, ICE, ICE, SNOW, ICE])
        partner = np.where((label == SHADOW) | (label == CLOUD), surface, partner_of[label])
        partner = np.where(partner == label, partner_of[label], partner)
        background = rng.random((8, height, width)) + 0.05
        probabilities = np.zeros((8, height, width))
        for c in range(8):
            others = (label != c) & (partner != c)
            probabilities[c] = np.where(others, background[c], 0.0)
        probabilities *= (0.35 * (1 - dominant) / probabilities.sum(axis=0))[None]
        np.put_along_axis(probabilities, label[None], dominant[None], axis=0)
        partner_share = np.take_along_axis(probabilities, partner[None], axis=0)[0]
        partner_share = partner_share + 0.65 * (1 - dominant)
        np.put_along_axis(probabilities, partner[None], partner_share[None], axis=0)
        probabilities /= probabilities.sum(axis=0, keepdims=True)
        confidence = dominant * rng.uniform(0.9, 1.05, (height, width))
        confidence = np.where((label == CLOUD) | (label == SHADOW), 0.6 * confidence, confidence)
        confidence = gaussian_filter(np.clip(confidence, 0, 1), 0.5)

        glacier = geometry.mask[k]
        maps[m, :8] = np.where(glacier[None], probabilities, np.nan)
        maps[m, 8] = np.where(glacier, confidence, np.nan)
    return maps
