"""DEM → mean elevation ``z`` and sub-grid roughness ``zstddev`` of each 100 m cell.

Each cell is split into ``SUBCELLS`` × ``SUBCELLS`` sub-cells of 10 m, and

* a DEM finer than a sub-cell (national 1–5 m, 10 m) is averaged onto them, keeping the first
  two moments (mean of z and of z²) so that ``zstddev`` is the exact standard deviation of the
  DEM pixels in the cell (law of total variance), whatever the DEM's CRS;
* a coarser DEM (SRTM 90 m, Copernicus 30 m) is interpolated bilinearly to the sub-cells; then
  ``zstddev`` is the roughness of the interpolated surface: its slope part is right, relief
  below the DEM's resolution is missing, so it is a lower bound.

Only the DEM pixels covering the grid are read, in strips of grid rows, so a 1 m DEM of a
large glacier does not need to fit in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rasterio.enums import Resampling
from rasterio.warp import reproject

from dataloader.errors import DataError
from dataloader.layout import CELL
from dataloader.prepare.grid import Grid, open_raster, pixel_size_m, window_of

SUBCELLS = 10            # sub-cells per cell side
MAX_STRIP_PIXELS = 20_000_000   # DEM pixels read at once (~160 MB as float64)
SRTM_VOID = -32768       # the int16 void value of SRTM files that declare no nodata


def _nodata_mask(src, values: np.ndarray) -> np.ndarray:
    bad = ~np.isfinite(values)
    if src.nodata is not None and np.isfinite(src.nodata):
        bad |= values == src.nodata
    elif np.dtype(src.dtypes[0]) == np.int16:
        bad |= values == SRTM_VOID
    return bad


def _strip_moments(src, path, grid: Grid, fine: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell mean and standard deviation of elevation over the rows of ``grid``."""
    window, covers = window_of(src, grid)
    if not covers:
        left, bottom, right, top = src.bounds
        raise DataError(path, None, f"does not cover the glacier grid plus margin (raster "
                                    f"bounds {left:.5g}, {bottom:.5g}, {right:.5g}, {top:.5g} "
                                    f"in its CRS); expected a DEM covering the whole grid")
    values = src.read(1, window=window, out_dtype=np.float64)
    bad = _nodata_mask(src, values)
    if bad.any():
        raise DataError(path, None, f"has {int(bad.sum())} nodata/NaN pixel(s) inside the "
                                    "glacier grid plus margin; expected a complete DEM there")
    # Moments about a reference height keep z² small, so mean(z²) − mean(z)² keeps its digits.
    reference = float(values.mean())
    values -= reference
    transform = src.window_transform(window)
    sub_transform, sub_shape = grid.subcells(SUBCELLS)

    def to_subcells(field, resampling):
        out = np.full(sub_shape, np.nan)
        reproject(field, out, src_transform=transform, src_crs=src.crs,
                  dst_transform=sub_transform, dst_crs=grid.crs, resampling=resampling,
                  src_nodata=np.nan, dst_nodata=np.nan)
        return out

    if fine:
        first = to_subcells(values, Resampling.average)
        second = to_subcells(values * values, Resampling.average)
    else:
        first = to_subcells(values, Resampling.bilinear)
        second = first * first
    if np.isnan(first).any():
        raise DataError(path, None, "does not cover the glacier grid plus margin; expected a "
                                    "DEM covering the whole grid")
    blocks = (grid.height, SUBCELLS, grid.width, SUBCELLS)
    mean = first.reshape(blocks).mean(axis=(1, 3))
    variance = second.reshape(blocks).mean(axis=(1, 3)) - mean * mean
    return mean + reference, np.sqrt(np.maximum(variance, 0.0))


def dem_fields(path, grid: Grid) -> tuple[np.ndarray, np.ndarray, dict]:
    """``z`` and ``zstddev`` (each (H, W) float32, m) of the DEM GeoTIFF ``path`` on ``grid``.

    Any CRS and resolution; how the two regimes (finer or coarser than 10 m sub-cells) are
    handled is in the module docstring. Errors: no CRS; a DEM that does not cover the grid
    (glacier plus margin) or has nodata/NaN there.

    Diagnostics: DEM resolution (m), sub-cells per cell, method, coverage (always complete when
    no error is raised), elevation range.
    """
    path = Path(path)
    with open_raster(path) as src:
        resolution = pixel_size_m(src, grid)
        fine = resolution <= CELL / SUBCELLS
        # Grid rows per strip so that each strip reads at most MAX_STRIP_PIXELS DEM pixels.
        pixels_per_row = (grid.width * CELL / resolution + 4) * (CELL / resolution)
        rows = max(1, int(MAX_STRIP_PIXELS // max(pixels_per_row, 1.0)))
        z = np.empty(grid.shape, dtype=np.float64)
        std = np.empty(grid.shape, dtype=np.float64)
        for first in range(0, grid.height, rows):
            stop = min(first + rows, grid.height)
            z[first:stop], std[first:stop] = _strip_moments(src, path, grid.rows(first, stop),
                                                            fine)
    method = ("average of DEM pixels onto 10 m sub-cells, exact within-cell moments" if fine
              else "bilinear interpolation to 10 m sub-cells; zstddev is the roughness of the "
                   "interpolated surface, a lower bound (relief finer than the DEM is missing)")
    diagnostics = {"file": str(path), "dem_resolution_m": round(resolution, 2),
                   "subcells_per_cell": SUBCELLS * SUBCELLS, "method": method,
                   "coverage": "complete", "z_min_m": float(z.min()), "z_max_m": float(z.max())}
    return z.astype(np.float32), std.astype(np.float32), diagnostics
