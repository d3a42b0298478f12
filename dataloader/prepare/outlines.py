"""Glacier outlines → the 0/1 glacier mask of the 100 m grid.

Two sources: a vector outline file (an RGI region file, a national inventory: any format
pyogrio reads, any CRS, many glaciers), which serves every year; or the authors' ICEmapper
rasters (Sentinel-1 outline mapper), one GeoTIFF of softmax probabilities per year.
"""

from __future__ import annotations

import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely
from rasterio.enums import Resampling
from rasterio.features import rasterize, shapes
from rasterio.warp import reproject

from dataloader.errors import DataError
from dataloader.prepare.grid import Grid, block_mean, open_raster, to_crs, window_of

# Columns tried first for ids and names; any other text column is tried after them.
ID_FIELDS = ("RGIId", "rgi_id", "RGIID", "glac_id", "GLIMSId", "glims_id", "id", "ID")
NAME_FIELDS = ("Name", "name", "glac_name", "NAME", "GLAC_NAME")
SUBCELLS = 10  # sub-cells per cell side for area fractions (10 m)


def _normal_name(value) -> str:
    """Name as compared: case-folded, whitespace collapsed, and cut at the first run of two or
    more spaces. Why the cut: fixed-width DBF fields of RGI 5 come back padded with spaces and a
    stray byte ('Hintereisferner      À')."""
    text = re.split(r"\s{2,}", str(value).strip())[0]
    return " ".join(text.split()).casefold()


def _text_columns(frame: gpd.GeoDataFrame, preferred: tuple[str, ...]) -> list[str]:
    """Attribute columns to search, ``preferred`` ones first (ids may also be integers)."""
    text = [c for c in frame.columns if c != frame.geometry.name
            and (pd.api.types.is_string_dtype(frame[c]) or pd.api.types.is_integer_dtype(frame[c]))]
    return [c for c in preferred if c in text] + [c for c in text if c not in preferred]


def _select_ids(frame, ids: list[str], path) -> tuple[np.ndarray, str]:
    wanted = [str(i).strip() for i in ids]
    best, best_hits = None, -1
    for column in _text_columns(frame, ID_FIELDS):
        values = frame[column].astype(str).str.strip()
        hits = sum(bool((values == w).any()) for w in wanted)
        if hits == len(wanted):
            return values.isin(wanted).to_numpy(), column
        if hits > best_hits:
            best, best_hits = column, hits
    column = best if best_hits > 0 else next(iter(_text_columns(frame, ID_FIELDS)), None)
    if column is None:
        raise DataError(path, None, "has no text attribute to match outline ids against")
    values = frame[column].astype(str).str.strip()
    missing = [w for w in wanted if not (values == w).any()]
    raise DataError(path, f"field {column!r}", f"has no outline id {', '.join(missing)}; "
                                               f"available e.g. {', '.join(values.iloc[:5])}")


def _select_name(frame, name: str, path) -> tuple[np.ndarray, str]:
    wanted = _normal_name(name)
    columns = _text_columns(frame, NAME_FIELDS)
    for column in columns:
        selected = frame[column].map(_normal_name).to_numpy() == wanted
        if selected.any():
            return selected, column
    named = [c for c in columns if c in NAME_FIELDS] or columns[:1]
    if not named:
        raise DataError(path, None, "has no text attribute to match an outline name against")
    names = sorted({_normal_name(v) for v in frame[named[0]]} - {"", "none", "nan"})
    raise DataError(path, f"field {named[0]!r}", f"has no outline named {name!r}; "
                                                 f"available e.g. {', '.join(names[:5])}")


def equal_area_km2(outline) -> float:
    """Area (km²) of a geometry in EPSG:4326, computed in a Lambert azimuthal equal-area
    projection centred on it."""
    centre = outline.centroid
    laea = f"+proj=laea +lat_0={centre.y} +lon_0={centre.x} +datum=WGS84 +units=m"
    return float(to_crs(outline, 4326, laea, step=0.0005).area) / 1e6


def read_vector(path: Path):
    """A vector file (shapefile, GeoPackage, GeoJSON, …) as a GeoDataFrame; a file that does
    not open or has no CRS is a DataError naming it."""
    try:
        frame = pyogrio.read_dataframe(path)
    except Exception as error:  # pyogrio raises several GDAL-level types
        raise DataError(path, None, f"could not be read as a vector file ({error})") from error
    if frame.crs is None:
        raise DataError(path, None, "has no CRS (missing .prj or CRS definition), expected one")
    return frame


def read_vector_outline(path, ids: list[str] | None = None,
                        name: str | None = None) -> tuple[shapely.Geometry, dict]:
    """The outline of one glacier from a vector file, as a shapely (Multi)Polygon in EPSG:4326.

    ``ids``: values of the id field (whichever text column holds all of them: RGIId, rgi_id,
    glac_id, …); several ids give the union of their polygons (RGI 5 splits Vernagtferner into
    ``RGI50-11.00719_d01`` and ``_d02``). ``name``: matched case-insensitively against a name
    field (Name, glac_name, …). With both, the features matching either are joined.

    Returns (outline, diagnostics): matched ids and names, fields used, number of features and
    the outline area in km² (equal-area projection).
    """
    if not ids and not name:
        raise DataError(path, None, "no outline selected: give outline id(s) or a name")
    path = Path(path)
    frame = read_vector(path)
    selected = np.zeros(len(frame), dtype=bool)
    diagnostics: dict = {"file": str(path)}
    if ids:
        by_id, id_field = _select_ids(frame, list(ids), path)
        selected |= by_id
        diagnostics.update(id_field=id_field,
                           ids=sorted(frame.loc[by_id, id_field].astype(str).str.strip()))
    if name:
        by_name, name_field = _select_name(frame, name, path)
        selected |= by_name
        diagnostics.update(name_field=name_field, name=name)
    chosen = frame.loc[selected]
    if not chosen.geom_type.isin(["Polygon", "MultiPolygon"]).all():
        raise DataError(path, "geometry", f"of the selected features is "
                                          f"{sorted(set(chosen.geom_type))}, expected polygons")
    outline = shapely.union_all(shapely.make_valid(chosen.to_crs(4326).geometry.to_numpy()))
    diagnostics.update(features=int(selected.sum()), area_km2=equal_area_km2(outline))
    return outline, diagnostics


def outline_fraction(outline, grid: Grid) -> np.ndarray:
    """(H, W) float32: fraction of each cell's area inside ``outline`` (EPSG:4326), counted on
    ``SUBCELLS`` × ``SUBCELLS`` sub-cells (10 m) by their centres."""
    projected = to_crs(outline, 4326, grid.epsg, step=0.0005)
    transform, shape = grid.subcells(SUBCELLS)
    inside = rasterize([(projected, 1)], out_shape=shape, transform=transform, fill=0,
                       dtype="uint8")
    return block_mean(inside.astype(np.float32), SUBCELLS).astype(np.float32)


def rasterise_outline(outline, grid: Grid, source=None) -> np.ndarray:
    """(H, W) float32 0/1 glacier mask of ``outline`` (EPSG:4326) on ``grid``.

    Rule: a cell is glacier when at least 50 % of its area lies inside the outline, the area
    counted on 10 m sub-cells (see ``outline_fraction``). So the mask area matches the outline
    area to within the cells cut by the boundary, without a bias either way. ``source`` only
    names the outline file in errors.
    """
    mask = (outline_fraction(outline, grid) >= 0.5).astype(np.float32)
    if not mask.any():
        raise DataError(source, "outline", "covers no 100 m cell by half or more: no glacier "
                                           "cell on the grid")
    return mask


def _read_probabilities(path, src, window=None) -> np.ndarray:
    """Glacier probability (band 2) of an ICEmapper raster in ``window``, NaN where no data;
    both bands are checked to be probabilities."""
    if src.count != 2:
        raise DataError(path, None, f"has {src.count} band(s), expected 2 (ICEmapper softmax: "
                                    "background, glacier)")
    both = src.read(window=window, out_dtype=np.float64)
    if src.nodata is not None and not np.isnan(src.nodata):
        both[both == src.nodata] = np.nan
    finite = both[np.isfinite(both)]
    if finite.size and (finite.min() < -1e-6 or finite.max() > 1 + 1e-6):
        raise DataError(path, None, f"has values from {finite.min():g} to {finite.max():g}, "
                                    "expected probabilities in [0, 1]")
    return np.clip(both[1], 0.0, 1.0)


def icemapper_footprint(paths: dict[int, Path], threshold: float = 0.5) -> shapely.Geometry:
    """Union over all years of the ICEmapper pixels with glacier probability ≥ ``threshold``,
    as a shapely geometry in EPSG:4326: what the grid must cover. Crop the rasters to the
    glacier: every glacier pixel of them enters the footprint."""
    parts = []
    for year, path in sorted(paths.items()):
        with open_raster(path) as src:
            glacier = _read_probabilities(path, src) >= threshold
            if not glacier.any():
                raise DataError(path, None, f"has no pixel with glacier probability ≥ "
                                            f"{threshold:g} (year {year})")
            polygons = [shapely.geometry.shape(g) for g, _ in
                        shapes(glacier.astype(np.uint8), mask=glacier, transform=src.transform)]
            parts.append(to_crs(shapely.union_all(polygons), src.crs.to_wkt(), 4326))
    return shapely.union_all(parts)


def icemapper_masks(paths: dict[int, Path], grid: Grid,
                    threshold: float = 0.5) -> dict[int, np.ndarray]:
    """Year → (H, W) float32 0/1 mask from ICEmapper rasters: a cell is glacier when the mean
    glacier probability of the raster pixels in it (area-weighted average resampling) is
    ≥ ``threshold``. Cells the raster does not cover count as not glacier."""
    masks = {}
    for year, path in sorted(paths.items()):
        with open_raster(path) as src:
            window, _ = window_of(src, grid)
            if window is None:
                raise DataError(path, None, "does not overlap the glacier grid")
            glacier = _read_probabilities(path, src, window)
            transform = src.window_transform(window)
            crs = src.crs
        valid = np.isfinite(glacier)
        # Average of p over valid pixels = average(p·valid) / average(valid); cells outside
        # the raster keep 0 in both and come out not glacier.
        sums = []
        for field in (np.where(valid, glacier, 0.0), valid.astype(np.float64)):
            out = np.zeros(grid.shape, dtype=np.float64)
            reproject(field, out, src_transform=transform, src_crs=crs,
                      dst_transform=grid.transform, dst_crs=grid.crs,
                      resampling=Resampling.average)
            sums.append(out)
        probability = np.divide(sums[0], sums[1], out=np.zeros(grid.shape),
                                where=sums[1] > 1e-9)
        mask = (probability >= threshold).astype(np.float32)
        if not mask.any():
            raise DataError(path, None, f"leaves no glacier cell on the 100 m grid at "
                                        f"threshold {threshold:g} (year {year})")
        masks[int(year)] = mask
    return masks


def masks_for_years(masks: dict[int, np.ndarray], years: np.ndarray) -> np.ndarray:
    """(Y, H, W) float32 masks of ``years``: each year takes the mask of the latest raster year
    not after it; years before the first raster take the first."""
    if not masks:
        raise DataError(None, "outline rasters", "none given")
    known = np.array(sorted(masks))
    index = np.searchsorted(known, np.asarray(years), side="right") - 1
    return np.stack([masks[int(known[max(k, 0)])] for k in index]).astype(np.float32)
