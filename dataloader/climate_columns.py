"""The daily climate of a glacier as its distinct cell series (the `climate_cell` algorithm).

The reanalysis is resampled by nearest neighbour onto the glacier grid, so whole blocks of cells
carry the same series: storing each distinct (temperature, precipitation) series once, with a
map from cells to columns, shrinks the prepared climate by orders of magnitude
(docs/architecture.md, `climate_cell`). The files are read in chunks of days so that peak memory
stays bounded for any grid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xarray as xr

from dataloader.errors import DataError
from dataloader.rasters import Grid, grid_variable

# Temperatures at or above this are taken for Kelvin (no glacier sees +200 °C).
KELVIN_THRESHOLD = 200.0

# Climate is read in chunks of about this many values (both files together) so that peak memory
# stays bounded even for the largest grids (~10 GB per climate variable in the files for 30
# years of a 500 × 400 grid).
CLIMATE_CHUNK_VALUES = 1 << 24

# The distinct climate columns found while reading are kept in memory up to this many values
# (both variables together), so that the files are read once; beyond, they are read twice.
CLIMATE_KEEP_VALUES = 1 << 24

# `allocate(field, shape, dtype)` returns a writable array for a large field; the cache passes
# one that memory-maps a file in its entry being built, the default keeps it in memory.
Allocator = Callable[[str, tuple, np.dtype], np.ndarray]


@dataclasses.dataclass(frozen=True)
class ClimateSource:
    """One daily climate variable of a glacier, its dims and grid checked (`climate_source`)."""

    path: Path
    variable: str  # name in the file
    field: str  # name of the GlacierTensors field (and of its `allocate`d array)
    data: xr.DataArray  # (time, y, x), lazy
    days: np.ndarray  # (D,) datetime64[D], consecutive


def climate_source(path: Path, ds: xr.Dataset, variable: str, field: str, grid: Grid) -> ClimateSource:
    """`variable` of the open file `ds`: dims (time, y, x) on `grid`, consecutive days at 00:00."""
    data = grid_variable(path, ds, variable, ("time", "y", "x"), grid)
    return ClimateSource(path, variable, field, data, _daily_time_axis(path, ds))


def read_climate(
    sources: list[ClimateSource], grid: Grid, allocate: Allocator
) -> tuple[np.datetime64, np.ndarray, np.ndarray, np.ndarray]:
    """Daily climate as its distinct cell series.

    The reanalysis is resampled by nearest neighbour onto the glacier grid, so whole blocks of
    cells carry the same series. Two cells share a column when their temperature and their
    precipitation series are bit-identical over all days; columns are numbered in the
    row-major order of their first cell.

    The files are read once, together, in chunks of days: each chunk refines the partition
    of the cells (`_refine`) and its class series are kept in memory, so that the columns can
    be assembled at the end without a second read. If the kept series would exceed
    CLIMATE_KEEP_VALUES (many distinct columns), they are dropped and the columns are
    gathered in a second pass over the files instead; peak memory stays bounded either way.

    Args:
        sources: temperature then precipitation (`climate_source`), on the same days.
        grid: the grid of outlines.nc, H × W.
        allocate: gives the (D, C) output arrays, by GlacierTensors field name.

    Returns:
        first date, (D, C) float32 temperature_2m and precipitation (`allocate`d), and the
        (H, W) int32 climate_cell map: `temperature_2m[:, climate_cell]` is the file's
        (D, H, W) array, bit for bit.
    """
    days = sources[0].days
    for source in sources[1:]:
        if not np.array_equal(source.days, days):
            raise DataError(source.path, "coordinate 'time'", f"differs from {sources[0].path.name}, "
                            "expected the same days")
    n_cells = grid.shape[0] * grid.shape[1]
    windows = _day_windows([source.data for source in sources], len(days), n_cells)

    def read(start: int, stop: int, check: bool) -> list[np.ndarray]:
        """(days, cells) float32 chunk of each file."""
        chunks = []
        for source in sources:
            chunk = source.data[start:stop].values.astype(np.float32, copy=False)
            if check:
                _check_climate_chunk(source.path, source.variable, chunk, days[start:stop])
            chunks.append(chunk.reshape(stop - start, n_cells))
        return chunks

    # Pass 1: partition the cells; keep (parents, class series) of each chunk while small.
    labels = np.zeros(n_cells, np.int64)  # class of each cell given the days read so far
    kept, kept_values = [], 0
    for start, stop in windows:
        chunks = read(start, stop, check=True)
        new_labels, first = _refine(labels, chunks)
        parents = labels[first]  # class of each new class before this chunk
        labels = new_labels
        if kept is not None:
            kept_values += len(sources) * (stop - start) * len(first)
            if kept_values <= CLIMATE_KEEP_VALUES:
                kept.append((start, stop, parents, [c[:, first] for c in chunks]))
            else:
                kept = None
        del chunks

    # Columns in the row-major order of their first cell.
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)  # column c is class order[c] …
    column_cell = first[order]  # … whose first cell is column_cell[c]
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    climate_cell = rank[labels].astype(np.int32).reshape(grid.shape)
    out = [allocate(source.field, (len(days), len(order)), np.dtype(np.float32))
           for source in sources]
    if kept is not None:
        classes = order  # class after the last chunk of each column; walked back chunk by chunk
        for start, stop, parents, series in reversed(kept):
            for target, values in zip(out, series):
                target[start:stop] = values[:, classes]
            classes = parents[classes]
    else:
        for start, stop in windows:
            for target, chunk in zip(out, read(start, stop, check=False)):
                target[start:stop] = chunk[:, column_cell]
    return days[0], out[0], out[1], climate_cell


def _day_windows(variables: list[xr.DataArray], n_days: int, n_cells: int) -> list[tuple[int, int]]:
    """[start, stop) day windows of about CLIMATE_CHUNK_VALUES values for both files together,
    made of whole HDF5 chunks of both files (a chunk cut in two is decompressed twice)."""
    file_chunks = [(var.encoding.get("chunksizes") or (1,))[0] for var in variables]
    file_chunk = math.lcm(*file_chunks)
    if file_chunk > 8 * max(file_chunks):  # unrelated chunkings: align to the longer one only
        file_chunk = max(file_chunks)
    step = max(1, CLIMATE_CHUNK_VALUES // (len(variables) * n_cells))
    step = max(file_chunk, step // file_chunk * file_chunk)
    return [(start, min(start + step, n_days)) for start in range(0, n_days, step)]


def _refine(labels: np.ndarray, chunks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Split the classes of `labels` (n_cells,) so that two cells stay together only if their
    columns in every (days, n_cells) chunk are bit-identical (0.0 and −0.0 differ).

    Cells are grouped by a hash of (class, columns) and every group is then checked for exact
    equality; on a hash collision the chunk is grouped exactly by sorting its columns.

    Returns:
        (n_cells,) new labels 0 … C−1 and (C,) the first cell of each new class.
    """
    bits = [chunk.view(np.uint32) for chunk in chunks]
    key = labels.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    for i, b in enumerate(bits):
        key += _column_hash(b, seed=i)
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    representative = first[inverse]
    same = labels[representative] == labels
    rows = max(1, (1 << 22) // len(labels))  # bounded temporaries
    for values in bits:
        for start in range(0, len(values), rows):
            block = values[start : start + rows]
            same &= (np.take(block, representative, axis=1) == block).all(axis=0)
    if same.all():
        return inverse, first
    exact = np.concatenate([labels.astype(np.uint32)[:, None], *(b.T for b in bits)], axis=1)
    _, first, inverse = np.unique(exact, axis=0, return_index=True, return_inverse=True)
    return inverse.reshape(-1), first


def _column_hash(bits: np.ndarray, seed: int) -> np.ndarray:
    """(n,) uint64 hash of each column of a (days, n) uint32 array: Σ bits[d] · w[d] mod 2⁶⁴
    with fixed random odd weights w (a different set per `seed`)."""
    weights = np.random.default_rng([seed, len(bits)]).integers(
        0, 1 << 63, size=len(bits), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    hashed = np.zeros(bits.shape[1], np.uint64)
    rows = max(1, (1 << 16) // bits.shape[1])
    buffer = np.empty((rows, bits.shape[1]), np.uint64)
    for start in range(0, len(bits), rows):
        block = buffer[: min(rows, len(bits) - start)]
        np.multiply(bits[start : start + rows], weights[start : start + rows, None], out=block)
        hashed += block[0] if len(block) == 1 else block.sum(axis=0, dtype=np.uint64)
    return hashed


def _daily_time_axis(path: Path, ds: xr.Dataset) -> np.ndarray:
    """(D,) datetime64[D] days of the file, checked to be consecutive days at 00:00."""
    if "time" not in ds.coords:
        raise DataError(path, "coordinate 'time'", "is missing, expected one value per day")
    values = ds["time"].values
    if not np.issubdtype(values.dtype, np.datetime64):
        raise DataError(
            path, "coordinate 'time'",
            f"could not be decoded to dates (dtype {values.dtype}), expected 'days since <date>' "
            "in the proleptic_gregorian calendar",
        )
    days = values.astype("datetime64[D]")
    if len(days) == 0:
        raise DataError(path, "coordinate 'time'", "is empty, expected daily values")
    if (days != values).any():
        raise DataError(path, "coordinate 'time'", "has times other than 00:00, expected days")
    gaps = np.flatnonzero(np.diff(days) != np.timedelta64(1, "D"))
    if len(gaps):
        i = gaps[0]
        raise DataError(
            path, "coordinate 'time'",
            f"is not consecutive: {days[i]} is followed by {days[i + 1]}, expected one value per "
            "day without gaps",
        )
    return days


def _check_climate_chunk(path: Path, variable: str, chunk: np.ndarray, days: np.ndarray) -> None:
    finite = np.isfinite(chunk).all(axis=(1, 2))
    if not finite.all():
        raise DataError(
            path, f"variable {variable!r}",
            f"contains NaN or inf (first on {days[np.argmin(finite)]}), expected complete climate",
        )
    if variable == "temperature_2m" and chunk.max() >= KELVIN_THRESHOLD:
        raise DataError(
            path, f"variable {variable!r}",
            f"reaches {chunk.max():.1f}, which looks like Kelvin; expected °C (all values < "
            f"{KELVIN_THRESHOLD:g})",
        )
