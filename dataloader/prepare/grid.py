"""The 100 m north-up glacier grid of the published layout, and reading the part of a raster
that covers it.

A grid is fixed by its CRS (an EPSG code, UTM by default), its upper-left corner and its size;
cell edges lie on multiples of 100 m so that two preparations of the same glacier agree cell
for cell. Coordinates follow docs/data_format.md §5: ``x`` increasing, ``y`` decreasing, cell
centres at ``x_left + (col + ½)·100`` and ``y_top − (row + ½)·100``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Iterator

import numpy as np
import pyproj
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform_bounds
from rasterio.windows import Window, from_bounds

import constants
from dataloader.errors import DataError
from dataloader.layout import CELL


@cache
def _transformer(source: int | str, target: int | str) -> pyproj.Transformer:
    return pyproj.Transformer.from_crs(source, target, always_xy=True)


@dataclass(frozen=True)
class Grid:
    """A north-up grid of ``CELL`` (100 m) cells in the projected CRS ``epsg``.

    ``x_left``, ``y_top``: the outer corner of the upper-left cell (m); ``height`` rows,
    ``width`` columns.
    """

    epsg: int
    x_left: float
    y_top: float
    height: int
    width: int

    @property
    def x(self) -> np.ndarray:
        """(W,) float64 cell-centre eastings (m), increasing."""
        return self.x_left + (np.arange(self.width) + 0.5) * CELL

    @property
    def y(self) -> np.ndarray:
        """(H,) float64 cell-centre northings (m), decreasing (row 0 is the northern-most)."""
        return self.y_top - (np.arange(self.height) + 0.5) * CELL

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def transform(self) -> Affine:
        """Corner-based pixel → CRS transform (GDAL convention)."""
        return Affine(CELL, 0.0, self.x_left, 0.0, -CELL, self.y_top)

    @property
    def crs(self) -> CRS:
        return CRS.from_epsg(self.epsg)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in the grid CRS (m)."""
        return (self.x_left, self.y_top - self.height * CELL,
                self.x_left + self.width * CELL, self.y_top)

    def rows(self, first: int, stop: int) -> Grid:
        """The sub-grid of rows ``first`` … ``stop − 1`` (all columns)."""
        return Grid(self.epsg, self.x_left, self.y_top - first * CELL, stop - first, self.width)

    def subcells(self, n: int) -> tuple[Affine, tuple[int, int]]:
        """Transform and shape of the grid divided into n × n sub-cells per cell."""
        size = CELL / n
        return (Affine(size, 0.0, self.x_left, 0.0, -size, self.y_top),
                (self.height * n, self.width * n))

    def lonlat(self) -> tuple[np.ndarray, np.ndarray]:
        """(lon, lat), each (H, W) float64: cell centres in EPSG:4326 (degrees)."""
        xx, yy = np.meshgrid(self.x, self.y)
        lon, lat = _transformer(self.epsg, 4326).transform(xx, yy)
        return np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)

    def cell_of(self, lon, lat) -> tuple[np.ndarray, np.ndarray]:
        """(row, col) int64 of the cells holding points (lon, lat) in EPSG:4326, by the floor
        rule of docs/data_format.md §7.2: ``col = floor((X − x_left)/100)``,
        ``row = floor((y_top − Y)/100)``. Points outside the grid get indices < 0 or ≥ the
        size; the caller decides what to do with them."""
        east, north = _transformer(4326, self.epsg).transform(np.asarray(lon, dtype=np.float64),
                                                                np.asarray(lat, dtype=np.float64))
        col = np.floor((np.asarray(east) - self.x_left) / CELL).astype(np.int64)
        row = np.floor((self.y_top - np.asarray(north)) / CELL).astype(np.int64)
        return row, col


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the standard UTM zone (WGS 84) holding (lon, lat): 326zz north of the
    equator, 327zz south. The Norway/Svalbard zone exceptions are not applied: a user who
    wants them passes the EPSG code explicitly."""
    if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
        raise DataError(None, "outline centroid", f"({lon}, {lat}) is not a longitude/latitude "
                                                  "in degrees")
    zone = min(math.floor((lon + 180.0) / 6.0) + 1, 60)
    return (32600 if lat >= 0.0 else 32700) + zone


def to_crs(geometry, source: int | str, target: int | str, step: float | None = None):
    """``geometry`` transformed from CRS ``source`` to ``target``. With ``step`` (in source
    units), edges are first split into pieces no longer than ``step``, so that a straight edge
    in one CRS follows its curved image in the other."""
    if step is not None:
        geometry = shapely.segmentize(geometry, step)
    return shapely.transform(geometry, lambda xy: np.column_stack(
        _transformer(source, target).transform(xy[:, 0], xy[:, 1])))


# Edge densification of EPSG:4326 outlines before projecting: ~50 m along a meridian, far
# below a cell, so a four-corner lon/lat square lands where its curved UTM image is.
_DEGREE_STEP = 0.0005


def grid_around(outline, epsg: int | None = None, margin_m: float = 500.0,
                source: str | Path | None = None) -> Grid:
    """The grid covering ``outline`` (shapely geometry in EPSG:4326) plus ``margin_m`` metres
    on every side, with edges on multiples of 100 m of the target CRS.

    ``epsg`` defaults to the UTM zone of the outline's centroid. ``source`` (the outline file)
    only names the input in errors. A grid with a side under ``constants.min_grid_side`` cells
    is refused: the corrector's three 2 × 2 poolings need at least that many.
    """
    if outline is None or outline.is_empty:
        raise DataError(source, "outline", "is empty, expected a glacier polygon")
    if margin_m < 0:
        raise DataError(source, "margin", f"is {margin_m} m, expected ≥ 0")
    if epsg is None:
        centre = outline.centroid
        epsg = utm_epsg(centre.x, centre.y)
    try:
        crs = pyproj.CRS.from_epsg(int(epsg))
    except pyproj.exceptions.CRSError as error:
        raise DataError(source, "EPSG code", f"{epsg} is unknown ({error})") from error
    if not crs.is_projected or crs.axis_info[0].unit_name not in ("metre", "meter"):
        raise DataError(source, "EPSG code", f"{epsg} is not a projected CRS in metres")
    minx, miny, maxx, maxy = to_crs(outline, 4326, int(epsg), step=_DEGREE_STEP).bounds
    # An edge on a multiple of 100 m (an ICEmapper footprint on the grid's own CRS) moves by
    # up to decimetres in the round trip through EPSG:4326; 1 m of tolerance keeps it from
    # gaining a whole extra cell.
    eps = 0.01
    left = math.floor((minx - margin_m) / CELL + eps) * CELL
    right = math.ceil((maxx + margin_m) / CELL - eps) * CELL
    bottom = math.floor((miny - margin_m) / CELL + eps) * CELL
    top = math.ceil((maxy + margin_m) / CELL - eps) * CELL
    width = round((right - left) / CELL)
    height = round((top - bottom) / CELL)
    if min(width, height) < constants.min_grid_side:
        raise DataError(source, "outline", f"gives a {height} × {width} grid of 100 m cells "
                                           f"(margin {margin_m:g} m); the models need at least "
                                           f"{constants.min_grid_side} cells on each side "
                                           "(give a larger margin)")
    return Grid(int(epsg), float(left), float(top), height, width)


def raster_crs(src: rasterio.io.DatasetReader, path) -> CRS:
    """The CRS of an open raster; a raster without one is refused."""
    if src.crs is None:
        raise DataError(path, None, "has no CRS (georeferencing), expected a GeoTIFF with one")
    return src.crs


@contextmanager
def open_raster(path) -> Iterator[rasterio.io.DatasetReader]:
    """An open raster that has a CRS; anything else is refused, naming the file."""
    try:
        src = rasterio.open(path)
    except rasterio.errors.RasterioIOError as error:
        raise DataError(path, None, f"could not be read as a raster ({error})") from error
    with src:
        raster_crs(src, path)
        yield src


def window_of(src, grid: Grid, pad: int = 2) -> tuple[Window | None, bool]:
    """The window of raster ``src`` that covers ``grid`` plus ``pad`` source pixels, clipped to
    the raster (None when they do not overlap), and whether the raster covers the whole grid.
    """
    bounds = transform_bounds(grid.crs, src.crs, *grid.bounds, densify_pts=21)
    need = from_bounds(*bounds, transform=src.transform)
    # from_bounds of a south-up or flipped raster gives negative sizes; normalise.
    col0 = min(need.col_off, need.col_off + need.width)
    row0 = min(need.row_off, need.row_off + need.height)
    col1 = max(need.col_off, need.col_off + need.width)
    row1 = max(need.row_off, need.row_off + need.height)
    tol = 1e-6
    covers = col0 >= -tol and row0 >= -tol and col1 <= src.width + tol and row1 <= src.height + tol
    c0 = max(math.floor(col0) - pad, 0)
    r0 = max(math.floor(row0) - pad, 0)
    c1 = min(math.ceil(col1) + pad, src.width)
    r1 = min(math.ceil(row1) + pad, src.height)
    if c1 <= c0 or r1 <= r0:
        return None, False
    return Window(c0, r0, c1 - c0, r1 - r0), covers


def pixel_size_m(src, grid: Grid) -> float:
    """Approximate pixel size of raster ``src`` in metres at the grid's centre (geometric mean
    of the two pixel sides), whatever the raster's CRS."""
    left, bottom, right, top = grid.bounds
    centre_x, centre_y = _transformer(grid.epsg, src.crs.to_wkt()).transform(
        (left + right) / 2, (bottom + top) / 2)
    col, row = ~src.transform @ (centre_x, centre_y)
    corners = [src.transform @ (col, row), src.transform @ (col + 1, row),
               src.transform @ (col, row + 1)]
    xs, ys = _transformer(src.crs.to_wkt(), grid.epsg).transform(
        np.array([c[0] for c in corners]), np.array([c[1] for c in corners]))
    side_x = math.hypot(xs[1] - xs[0], ys[1] - ys[0])
    side_y = math.hypot(xs[2] - xs[0], ys[2] - ys[0])
    return math.sqrt(side_x * side_y)


def block_mean(field: np.ndarray, n: int) -> np.ndarray:
    """(H·n, W·n) → (H, W): mean over each n × n block."""
    height, width = field.shape[0] // n, field.shape[1] // n
    return field.reshape(height, n, width, n).mean(axis=(1, 3))
