"""Glaciers as device arrays for calibration and inference, streamed from the tensor cache,
one at a time or in batches of glaciers that share one shape bucket."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, NamedTuple, Sequence

import equinox as eqx
import jax
import numpy as np

from dataloader import Dataset
from glaunti.layouts import (
    STATIC_KEYS,
    GlacierArrays,
    GlacierBatch,
    layout_host_arrays,
    make_arrays,
    stack_host_arrays,
    to_device,
)

# Glaciers whose device arrays add up to less than this stay resident between epochs; beyond it
# they are re-read from the (memory-mapped) cache every epoch so that memory does not grow with
# the number of glaciers.
DEFAULT_RESIDENT_BYTES = 2 * 1024**3

# Device memory one batch of glaciers may use in training (forward and backward pass), as
# estimated by :func:`footprint`: on CPU this constant, on a GPU a fraction of its memory
# (``memory_stats()["bytes_limit"]``; two batches are in flight per device, and XLA needs room
# for its temporaries). ``GLAUNTI_BATCH_BYTES`` overrides both (1 = one glacier per batch).
BATCH_BYTES = 1024**3
GPU_BATCH_FRACTION = 0.25
BATCH_BYTES_ENV = "GLAUNTI_BATCH_BYTES"
# Floats per grid cell that a glacier's backward pass keeps besides its arrays (per-year and
# per-day rematerialisation, docs/performance.md). The state is counted at 16 floats per cell
# (B's hidden state; A, C and D keep 1), so that one estimate serves every model.
STATE_FLOATS = 16
YEAR_FLOATS = STATE_FLOATS + 2 + 5  # per year: its initial state, 2 period sums, 5 corrections
DAY_FLOATS = STATE_FLOATS + 2  # per day of the year being differentiated: the scan's carry
CORRECTOR_FLOATS = 1024  # the corrector's activations of one year (32 channels, ~30 tensors)


def nbytes(arrays: GlacierArrays) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(arrays))


def with_study_years(arrays: GlacierArrays, years: np.ndarray, first: int, last: int) -> GlacierArrays:
    """The same glacier with only study years in [first, last] scored (others still run).
    ``years`` are the glacier's real years; padded years of a training layout stay unscored."""
    years = np.asarray(years)
    years = np.concatenate([years, np.full(arrays.n_years - len(years), -1, years.dtype)])
    keep = (years >= first) & (years <= last)
    return eqx.tree_at(lambda a: a.study, arrays, arrays.study & keep)


def batch_budget(device=None) -> int:
    """Bytes one batch may use (:data:`BATCH_BYTES`, or a GPU's share, or the environment)."""
    value = os.environ.get(BATCH_BYTES_ENV, "").strip()
    if value:
        try:
            return int(float(value))
        except ValueError:
            raise ValueError(f"{BATCH_BYTES_ENV}={value!r}: expected a number of bytes") from None
    device = device if device is not None else jax.local_devices()[0]
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # CPU backends without memory statistics
        limit = None
    return int(GPU_BATCH_FRACTION * limit) if limit else BATCH_BYTES


def footprint(h: dict) -> int:
    """Estimated training bytes of one glacier given as a layout's host arrays: the arrays, and
    per cell the saved states and sums of every year, one year of per-day carries and the
    corrector's activations of one year (see the constants above)."""
    cells = h["climate_cell"].size
    years, days = h["day_index"].shape
    arrays = sum(np.asarray(v).nbytes for k, v in h.items() if k not in STATIC_KEYS)
    return arrays + 4 * cells * (years * YEAR_FLOATS + days * DAY_FLOATS + CORRECTOR_FLOATS)


def bucket_key(h: dict, layout: str) -> tuple:
    """Glaciers with equal keys can share a batch: equal padded grid (any "cells" row: a batch
    pads its rows to its largest), years and day-block length, climate days and columns, spin-up
    years. Stakes and loss cells are padded to the bucket's largest."""
    grid = "cells" if layout == "cells" else h["climate_cell"].shape
    return grid, h["day_index"].shape, h["temperature_2m"].shape, h["n_spinup"]


class GlacierShape(NamedTuple):
    """What batching needs to know of one glacier in a layout (:meth:`GlacierSet.batches`)."""

    index: int
    key: tuple
    cells: int  # cells of its (padded) grid or "cells" row
    stakes: int
    loss_cells: int
    footprint: int  # bytes, :func:`footprint`
    years: np.ndarray  # (Y,) bool: years with a valid day

    @classmethod
    def of(cls, index: int, h: dict, layout: str) -> GlacierShape:
        return cls(index, bucket_key(h, layout), int(h["climate_cell"].size), len(h["stake_year"]),
                   len(h["loss_cells"]), footprint(h), np.any(h["day_valid"], axis=1))


class Batch(NamedTuple):
    """One batch of a :class:`GlacierSet`: its glaciers' indices (largest first), the shape its
    arrays are stacked to, and the years its year walk runs and the glaciers' own years with days
    (each × L days)."""

    indices: tuple[int, ...]
    key: tuple
    grid: tuple[int, int]
    stakes: int
    loss_cells: int
    block_length: int
    walked_years: int
    glacier_years: int

    @property
    def signature(self) -> tuple:
        """Equal for batches that run in the same compiled function."""
        return self.key, self.grid, self.stakes, self.loss_cells, len(self.indices)

    def describe(self) -> str:
        grid = f"{self.grid[1]} cells" if self.key[0] == "cells" else f"{self.grid[0]}×{self.grid[1]}"
        n = len(self.indices)
        return f"{grid}, {n} glacier{'s' if n > 1 else ''}"


def plan_batches(shapes: Sequence[GlacierShape], budget: int) -> list[Batch]:
    """Group glaciers into batches: per bucket, glaciers by decreasing cells (then index), each
    batch as many as fit ``budget`` when every one costs the batch's largest footprint (at
    least one); batches in the order of their first glacier. Depends only on the glaciers and
    the budget."""
    buckets: dict[tuple, list[GlacierShape]] = {}
    for shape in shapes:
        buckets.setdefault(shape.key, []).append(shape)
    out = []
    for key, members in buckets.items():
        stakes = max(m.stakes for m in members)
        loss_cells = max(m.loss_cells for m in members)
        groups: list[list[GlacierShape]] = [[]]
        for shape in sorted(members, key=lambda m: (-m.cells, m.index)):
            group = groups[-1]
            if group and (len(group) + 1) * max(shape.footprint, *(m.footprint for m in group)) > budget:
                groups.append(group := [])
            group.append(shape)
        for group in groups:
            years = np.stack([m.years for m in group])  # (B, Y)
            grid = (1, max(m.cells for m in group)) if key[0] == "cells" else tuple(key[0])
            out.append(Batch(tuple(m.index for m in group), key, grid, stakes, loss_cells, int(key[1][1]),
                             int(np.any(years, axis=0).sum()), int(years.sum())))
    return sorted(out, key=lambda b: min(b.indices))  # one glacier per batch: the set's order


class GlacierSet:
    """A re-iterable set of glaciers: ``for name, arrays in glacier_set()``.

    ``layout`` is the ``glaunti.layouts`` layout of the arrays ("exact", or the training layouts
    "padded"/"cells" that share compiled functions between glaciers). Glaciers stay resident
    (on their device) while their arrays add up to less than :data:`DEFAULT_RESIDENT_BYTES`; the
    others are re-read from the memory-mapped cache when needed, so host memory does not grow with the
    number of glaciers. The trainer asks for this process's glaciers only, each on its device,
    through :meth:`iter_placed`.
    """

    def __init__(self, dataset: Dataset, names: Sequence[str], facies: bool, layout: str = "exact",
                 batch_bytes: int | None = None):
        self.dataset, self.names, self.facies, self.layout = dataset, list(names), facies, layout
        self.budget = DEFAULT_RESIDENT_BYTES
        self.batch_bytes = batch_bytes
        self._resident: dict[str, GlacierArrays] = {}
        self._resident_batches: dict[int, GlacierBatch] = {}
        self._used = 0
        self._plan: list[Batch] | None = None

    def _host(self, tensors) -> dict:
        return layout_host_arrays(tensors, self.facies, self.layout)

    def batches(self) -> list[Batch]:
        """The batches of this set (computed once from the glaciers' shapes and the batch
        budget, :func:`batch_budget`), in their fixed order."""
        if self._plan is None:
            budget = batch_budget() if self.batch_bytes is None else self.batch_bytes
            shapes = [GlacierShape.of(i, self._host(tensors), self.layout)
                      for i, tensors in enumerate(self.dataset.iter_glaciers(self.names))]
            self._plan = plan_batches(shapes, budget)
        return self._plan

    def iter_batches(self, placed: Sequence[tuple[int, object]]) -> Iterator[tuple[int, Batch, GlacierBatch]]:
        """``(b, batch, GlacierBatch)`` for the given ``(batch index, device)`` pairs."""
        plan = self.batches()
        for b, device in placed:
            batch = plan[b]
            arrays = self._resident_batches.get(b)
            if arrays is None:
                hosts = [self._host(t) for t in self.dataset.iter_glaciers([self.names[i] for i in batch.indices])]
                stacked = stack_host_arrays(hosts, batch.grid, batch.stakes, batch.loss_cells)
                arrays = GlacierBatch(to_device(stacked, device))
                del hosts
                size = nbytes(arrays)
                if self._used + size <= self.budget:
                    self._resident_batches[b] = arrays
                    self._used += size
            elif device is not None:
                arrays = jax.device_put(arrays, device)
            yield b, batch, arrays

    def _make(self, name, tensors, device=None) -> GlacierArrays:
        arrays = make_arrays(tensors, facies=self.facies, layout=self.layout, device=device)
        size = nbytes(arrays)
        if self._used + size <= self.budget:
            self._resident[name] = arrays
            self._used += size
        return arrays

    def __call__(self) -> Iterable[tuple[str, GlacierArrays]]:
        for _, name, arrays in self.iter_placed([(i, None) for i in range(len(self.names))]):
            yield name, arrays

    def iter_placed(self, placed: Sequence[tuple[int, object]]) -> Iterator[tuple[int, str, GlacierArrays]]:
        """``(i, name, arrays)`` for the given ``(index, device)`` pairs, arrays on ``device``
        (None: JAX's default device)."""
        placed = list(placed)
        missing = [self.names[i] for i, _ in placed if self.names[i] not in self._resident]
        fresh = iter(self.dataset.iter_glaciers(missing)) if missing else iter(())
        for i, device in placed:
            name = self.names[i]
            arrays = self._resident.get(name)
            if arrays is None:
                arrays = self._make(name, next(fresh), device)
            elif device is not None:
                arrays = jax.device_put(arrays, device)  # no-op when already there
            yield i, name, arrays

    def __len__(self) -> int:
        return len(self.names)
