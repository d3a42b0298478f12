"""Facies-classifier scenes → the yearly facies maps of ``facies.nc`` (docs/data_format.md).

The authors' classifier writes, per scene, an int16 GeoTIFF of class indices 0–7 (ice, snow,
debris, firn, shadow, superimposed ice, cloud, water; nodata −9999) at 10–30 m, and optionally
a float32 confidence GeoTIFF (0–1, nodata 0). Per 100 m cell we keep the fraction of the valid
pixels in each class (bands 0–7) and their mean confidence (band 8).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from rasterio.enums import Resampling
from rasterio.warp import reproject

from dataloader.errors import DataError
from dataloader.layout import FACIES_BANDS
from dataloader.prepare.grid import Grid, open_raster, window_of

N_CLASSES = len(FACIES_BANDS) - 1  # 8 classes, then the confidence band
CLASS_NODATA = -9999
# Without a confidence raster the confidence band is 1 ("take the classes as they are"): NaN
# would be read as 0 by the models, i.e. "no confidence", which no real map carries.
DEFAULT_CONFIDENCE = 1.0
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_date(text: str, what: str) -> np.datetime64:
    """'YYYY-MM-DD' → ``datetime64[D]``; anything else raises DataError naming ``what``."""
    text = str(text).strip()
    if _DATE.fullmatch(text):
        try:
            return np.datetime64(text, "D")
        except ValueError:
            pass
    raise DataError(None, what, f"date {text!r} does not parse, expected YYYY-MM-DD")


def _to_grid(field: np.ndarray, transform, crs, grid: Grid) -> np.ndarray:
    """Area-weighted average of a (h, w) source field over each cell; 0 outside the source."""
    out = np.zeros(grid.shape, dtype=np.float64)
    reproject(field, out, src_transform=transform, src_crs=crs, dst_transform=grid.transform,
              dst_crs=grid.crs, resampling=Resampling.average)
    return out


def _read(path: Path, grid: Grid):
    with open_raster(path) as src:
        window, _ = window_of(src, grid)
        if window is None:
            raise DataError(path, None, "does not overlap the glacier grid")
        return (src.read(1, window=window, out_dtype=np.float64),
                src.window_transform(window), src.crs, src.nodata)


def scene_fractions(classes_path: Path, confidence_path: Path | None,
                    grid: Grid) -> np.ndarray:
    """(9, H, W) float32 of one scene: per cell the fraction of valid pixels in each class and
    their mean confidence (``DEFAULT_CONFIDENCE`` without a confidence file). NaN where a cell
    has no valid pixel."""
    values, transform, crs, nodata = _read(classes_path, grid)
    valid = np.isfinite(values) & (values != CLASS_NODATA)
    if nodata is not None and np.isfinite(nodata):
        valid &= values != nodata
    bad = valid & ((values < 0) | (values > N_CLASSES - 1) | (values != np.round(values)))
    if bad.any():
        wrong = ", ".join(f"{v:g}" for v in np.unique(values[bad])[:5])
        raise DataError(classes_path, None, f"has class value(s) {wrong}; expected 0–"
                                            f"{N_CLASSES - 1} or nodata {CLASS_NODATA}")
    # Fraction of class k among valid pixels = average(class == k) / average(valid), both
    # averaged over the cell's area, so pixels outside the scene or nodata do not count.
    covered = _to_grid(valid.astype(np.float64), transform, crs, grid)
    seen = covered > 1e-9
    out = np.full((N_CLASSES + 1,) + grid.shape, np.nan, dtype=np.float64)
    for k in range(N_CLASSES):
        share = _to_grid((valid & (values == k)).astype(np.float64), transform, crs, grid)
        out[k][seen] = share[seen] / covered[seen]
    if confidence_path is None:
        out[N_CLASSES][seen] = DEFAULT_CONFIDENCE
        return out.astype(np.float32)
    confidence, c_transform, c_crs, c_nodata = _read(confidence_path, grid)
    c_valid = np.isfinite(confidence) & (confidence != 0)
    if c_nodata is not None and np.isfinite(c_nodata):
        c_valid &= confidence != c_nodata
    outside = c_valid & ((confidence < 0) | (confidence > 1))
    if outside.any():
        raise DataError(confidence_path, None, f"has values from {confidence[c_valid].min():g} "
                                               f"to {confidence[c_valid].max():g}, expected a "
                                               "confidence in [0, 1] (nodata 0)")
    weight = _to_grid(c_valid.astype(np.float64), c_transform, c_crs, grid)
    total = _to_grid(np.where(c_valid, confidence, 0.0), c_transform, c_crs, grid)
    c_seen = seen & (weight > 1e-9)
    out[N_CLASSES][c_seen] = total[c_seen] / weight[c_seen]
    return out.astype(np.float32)


def facies_fields(scenes: list[tuple[np.datetime64, Path, Path | None]], grid: Grid,
                  year_of_date: Callable[[np.datetime64], int | None],
                  masks_by_year: Mapping[int, np.ndarray] | Callable[[int], np.ndarray],
                  ) -> tuple[list[int], np.ndarray, dict]:
    """Facies maps per balance year from classifier scenes.

    ``scenes``: (date, classes GeoTIFF, confidence GeoTIFF or None). Each scene belongs to the
    balance year ``year_of_date(date)`` contains; a date in no balance year is an error. Of
    several scenes in one year the latest is used: the maps describe the end of the ablation
    season, and the latest scene is the closest to it. ``masks_by_year``: year → (H, W) mask
    (dict or callable); off-glacier cells are NaN. A glacier cell that no valid pixel of its
    scene covers is an error (the map would be silently empty there).

    Returns (years ascending, (n_years, 9, H, W) float32, diagnostics: scene used and scenes
    skipped per year, whether confidence came from a file).
    """
    mask_of = masks_by_year if callable(masks_by_year) else masks_by_year.__getitem__
    latest: dict[int, tuple[np.datetime64, Path, Path | None]] = {}
    skipped: dict[int, list[str]] = {}
    for date, classes, confidence in scenes:
        year = year_of_date(date)
        if year is None:
            raise DataError(classes, "scene date", f"{date} lies in no balance year of the "
                                                   "glacier; expected a date within the "
                                                   "prepared years")
        year = int(year)
        if year in latest and latest[year][0] > date:
            skipped.setdefault(year, []).append(str(date))
            continue
        if year in latest:
            skipped.setdefault(year, []).append(str(latest[year][0]))
        latest[year] = (date, Path(classes), None if confidence is None else Path(confidence))
    years = sorted(latest)
    data = np.empty((len(years), N_CLASSES + 1) + grid.shape, dtype=np.float32)
    for i, year in enumerate(years):
        date, classes, confidence = latest[year]
        maps = scene_fractions(classes, confidence, grid)
        glacier = np.asarray(mask_of(year)) > 0.5
        unseen = glacier & np.isnan(maps).any(axis=0)
        if unseen.any():
            raise DataError(classes, None, f"leaves {int(unseen.sum())} glacier cell(s) of "
                                           f"{year} without a valid pixel; expected a scene "
                                           "covering the glacier")
        maps[:, ~glacier] = np.nan
        data[i] = maps
    diagnostics = {"scenes": {year: {"date": str(latest[year][0]),
                                     "classes": str(latest[year][1]),
                                     "confidence": (str(latest[year][2]) if latest[year][2]
                                                    else f"none, set to {DEFAULT_CONFIDENCE:g}")}
                              for year in years},
                   "skipped_earlier_scenes": {y: sorted(d) for y, d in skipped.items()}}
    return years, data, diagnostics
