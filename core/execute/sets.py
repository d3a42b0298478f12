"""The sets of glaciers that training, validation and inference run (the :class:`Glaciers`
protocol): a dataset's glaciers planned into batches of one shape and streamed from the tensor
cache (:class:`GlacierSet`), or arrays already made (:class:`GlacierList`); the batching plan
(shape classes on a CPU, coarse buckets on a GPU) and the device each batch runs on."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, NamedTuple, Protocol, Sequence

import equinox as eqx
import jax
import numpy as np

from dataloader import Dataset
from glaunti.layouts import (
    STATIC_KEYS,
    GlacierArrays,
    GlacierBatch,
    grid_bucket,
    layout_host_arrays,
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


def _host_bytes(h: dict) -> int:
    return sum(np.asarray(v).nbytes for k, v in h.items() if k not in STATIC_KEYS)


def footprint(h: dict) -> int:
    """Estimated training bytes of one glacier given as a layout's host arrays: the arrays, and
    per cell the saved states and sums of every year, one year of per-day carries and the
    corrector's activations of one year (see the constants above)."""
    cells = h["climate_cell"].size
    years, days = h["day_index"].shape
    return _host_bytes(h) + 4 * cells * (years * YEAR_FLOATS + days * DAY_FLOATS + CORRECTOR_FLOATS)


# On a CPU, whether glaciers of different grids share a batch (one compile, padded arithmetic)
# or run apart (one compile each, no padding) is a trade: a compile costs about as much as this
# many computed cell-days (2 cores, `science` twin: A 4.4e7, B 0.8e7, C 5.0e7, from the
# benchmark's compile seconds per program over its seconds per computed cell-day). On a GPU the
# arithmetic of padding is nearly free and every batch costs launch latency, so glaciers share
# the coarse buckets of ``glaunti.layouts.grid_bucket`` (at least 32×32) and "cells" rows pad
# to the batch's largest.
COMPILE_CELL_DAYS = 4e7


def bucket_key(h: dict, layout: str) -> tuple:
    """Glaciers with equal keys can share a batch: years and day-block length, climate days and
    columns, spin-up years; the grid (or "cells" row) and the stakes and loss cells are padded
    to the batch's."""
    kind = "cells" if layout == "cells" else "grid"
    return kind, h["day_index"].shape, h["temperature_2m"].shape, h["n_spinup"]


class GlacierShape(NamedTuple):
    """What batching needs to know of one glacier in a layout (:meth:`GlacierSet.batches`)."""

    index: int
    key: tuple
    dims: tuple[int, int]  # its own grid, or its (1, N) "cells" row
    stakes: int
    loss_cells: int
    footprint: int  # bytes, :func:`footprint`
    years: np.ndarray  # (Y,) bool: years with a valid day

    @classmethod
    def of(cls, index: int, h: dict, layout: str) -> GlacierShape:
        return cls(index, bucket_key(h, layout), tuple(int(n) for n in h["climate_cell"].shape),
                   len(h["stake_year"]), len(h["loss_cells"]), footprint(h), np.any(h["day_valid"], axis=1))

    @property
    def cells(self) -> int:
        return self.dims[0] * self.dims[1]

    @property
    def days(self) -> int:
        """Days its own years walk (years with a valid day × the block length)."""
        return int(self.years.sum()) * self.key[1][1]


class Batch(NamedTuple):
    """One batch of a :class:`GlacierSet`: its glaciers' indices (largest first), the shape its
    arrays are stacked to, the years its year walk runs and the glaciers' own years with days
    (each × L days), and whether its shape class holds a glacier padded to that shape
    (``padded``: then every batch of the class runs a padding-aware model's padded path, so that
    the class compiles one function, not one per path)."""

    indices: tuple[int, ...]
    key: tuple
    grid: tuple[int, int]
    stakes: int
    loss_cells: int
    block_length: int
    walked_years: int
    glacier_years: int
    padded: bool = False

    @property
    def signature(self) -> tuple:
        """Equal for batches that run in the same compiled function."""
        return self.key, self.grid, self.stakes, self.loss_cells, len(self.indices), self.padded

    def describe(self) -> str:
        grid = f"{self.grid[1]} cells" if self.key[0] == "cells" else f"{self.grid[0]}×{self.grid[1]}"
        n = len(self.indices)
        return f"{grid}, {n} glacier{'s' if n > 1 else ''}"


def _cover(dims: Iterable[tuple[int, int]]) -> tuple[int, int]:
    dims = list(dims)
    return max(d[0] for d in dims), max(d[1] for d in dims)


def merge_classes(members: Sequence[GlacierShape], passes: int, compile_cell_days: float
                  ) -> list[tuple[tuple[int, int], list[GlacierShape]]]:
    """Glaciers of one key grouped into shape classes that each compile once: starting from one
    class per own grid (or row), the two classes whose merger (padded to the larger side of
    each) costs least are merged while that saves: a class costs ``compile_cell_days`` plus
    ``passes`` × its grid's cells × its glaciers' days. Deterministic."""
    classes: dict[tuple[int, int], list[GlacierShape]] = {}
    for m in members:
        classes.setdefault(m.dims, []).append(m)
    groups = sorted(classes.items())

    def cost(dims, group):
        return compile_cell_days + passes * dims[0] * dims[1] * sum(m.days for m in group)

    while len(groups) > 1:
        best = None
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                (da, a), (db, b) = groups[i], groups[j]
                dims = _cover([da, db])
                saving = cost(da, a) + cost(db, b) - cost(dims, a + b)
                if saving > 0 and (best is None or saving > best[0]):
                    best = (saving, i, j, dims)
        if best is None:
            break
        _, i, j, dims = best
        merged = (dims, groups[i][1] + groups[j][1])
        groups = sorted([g for k, g in enumerate(groups) if k not in (i, j)] + [merged])
    return groups


def plan_batches(shapes: Sequence[GlacierShape], budget: int, passes: int | None = None,
                 compile_cell_days: float | None = None) -> list[Batch]:
    """Group glaciers into batches of one shape.

    Shape classes per key: with ``compile_cell_days`` (CPU) those of :func:`merge_classes` for
    ``passes`` runs over the set, one glacier per batch on the class's grid; without (GPU) the
    coarse grid buckets of ``glaunti.layouts.grid_bucket``, or for "cells" rows one class whose
    batches pad to their largest row, and per class, glaciers by decreasing cells (then index),
    each batch as many as fit ``budget`` when every one costs the batch's largest footprint (at
    least one). Batches in the order of their first glacier. Depends only on the glaciers and
    these arguments."""
    keys: dict[tuple, list[GlacierShape]] = {}
    for shape in shapes:
        keys.setdefault(shape.key, []).append(shape)
    out = []
    for key, members in keys.items():
        if compile_cell_days is not None:
            classes = merge_classes(members, passes or 1, compile_cell_days)
        elif key[0] == "cells":
            classes = [(None, members)]
        else:
            buckets: dict[tuple[int, int], list[GlacierShape]] = {}
            for m in members:
                buckets.setdefault(grid_bucket(*m.dims), []).append(m)
            classes = list(buckets.items())
        for dims, group_members in classes:
            stakes = max(m.stakes for m in group_members)
            loss_cells = max(m.loss_cells for m in group_members)
            groups: list[list[GlacierShape]] = [[]]
            for shape in sorted(group_members, key=lambda m: (-m.cells, m.index)):
                group = groups[-1]
                # Each glacier's footprint as if it had the class's grid (the row: its own).
                size = shape.footprint * (dims[0] * dims[1] / shape.cells if dims else 1.0)
                # On a CPU a vmapped batch costs more than its glaciers one after another
                # (C +17–28 %, B +23–40 %): a class shares its compiled function, not a scan.
                alone = compile_cell_days is not None
                if group and (alone or (len(group) + 1) * max(size, *(g for _, g in group)) > budget):
                    groups.append(group := [])
                group.append((shape, size))
            padded = dims is not None and any(m.dims != dims for m in group_members)
            for group in groups:
                years = np.stack([m.years for m, _ in group])  # (B, Y)
                grid = dims or _cover(m.dims for m, _ in group)
                out.append(Batch(tuple(m.index for m, _ in group), key, grid, stakes, loss_cells,
                                 int(key[1][1]), int(np.any(years, axis=0).sum()), int(years.sum()),
                                 padded or any(m.dims != grid for m, _ in group)))
    return sorted(out, key=lambda b: min(b.indices))  # one glacier per batch: the set's order


def assign_devices(batches: Sequence[Batch], n_devices: int, passes: int = 1,
                   compile_cell_days: float = COMPILE_CELL_DAYS) -> list[int]:
    """The local device (index) each batch runs on.

    XLA compiles a function once for every device it runs on, so a batch shape spread over N
    devices compiles N times (on CPUs with the persistent cache the others load the first
    device's compile, ``core.execute.distributed.share_cpu_executables``; priced as a compile here all
    the same). A device's time is ``passes`` × its batches' computed cell-days
    plus ``compile_cell_days`` per signature it runs (each device has its own core, so devices
    compile in parallel). Of two plans the one that finishes first (ties: the first):
    whole shape classes, largest first, each on the least loaded device, then single batches
    moved off the busiest device while that finishes sooner; or batch by batch, largest
    first, each where it finishes first (classes split freely: balance over many passes).
    Deterministic; placement never changes a result (gradients are summed in batch order)."""
    n = max(1, n_devices)
    work = _computed_cell_days(batches, passes)
    signature = [b.signature for b in batches]

    def loads(device):
        total = [0.0] * n
        for d, sigs in enumerate(_signatures_by_device(device, signature, n)):
            total[d] = len(sigs) * compile_cell_days
        for j, d in enumerate(device):
            total[d] += work[j]
        return total

    # Whole classes, then single moves off the busiest device.
    whole = whole_classes(batches, n, passes, per_class=compile_cell_days)
    for _ in range(len(batches) * n):
        load = loads(whole)
        src = max(range(n), key=lambda d: (load[d], -d))
        move = None
        for j in sorted((j for j in range(len(batches)) if whole[j] == src), key=lambda j: (work[j], j)):
            for dst in sorted(range(n), key=lambda d: (load[d], d)):
                if dst != src:
                    trial = whole[:j] + [dst] + whole[j + 1:]
                    if max(loads(trial)[d] for d in (src, dst)) < load[src]:
                        move = trial
                        break
            if move:
                break
        if move is None:
            break
        whole = move

    # Batch by batch.
    free = [0] * len(batches)
    load = [0.0] * n
    compiled: list[set] = [set() for _ in range(n)]
    for j in sorted(range(len(batches)), key=lambda j: (-work[j], j)):
        def finish(d, j=j):
            return load[d] + work[j] + (0.0 if signature[j] in compiled[d] else compile_cell_days)

        d = min(range(n), key=lambda d: (finish(d), d))
        load[d] = finish(d)
        compiled[d].add(signature[j])
        free[j] = d
    return whole if max(loads(whole), default=0.0) <= max(loads(free), default=0.0) else free


def compile_owners(signatures: Sequence, by_device: dict, done=frozenset()) -> dict:
    """Work item → the device that compiles its shape, for devices that share executables
    (``core.execute.distributed.share_cpu_executables``; ``by_device``: device → its items, ``done``:
    shapes compiled already). A shape one device runs alone compiles there, a shared one on the
    device with the fewest shapes to compile so far (stable: the first such device), so that the
    shapes compile side by side; the other devices run their share of it last, loading the
    compile."""
    needed: dict = {}  # new signature → devices running it, in device order
    for device, indices in by_device.items():
        for j in indices:
            if signatures[j] not in done and device not in needed.setdefault(signatures[j], []):
                needed[signatures[j]].append(device)
    owner, count = {}, {device: 0 for device in by_device}
    for signature, devices in sorted(needed.items(), key=lambda kv: len(kv[1])):
        owner[signature] = min(devices, key=lambda d: count[d])
        count[owner[signature]] += 1
    return {j: owner[signatures[j]] for indices in by_device.values() for j in indices if signatures[j] in owner}


def whole_classes(batches: Sequence[Batch], n_devices: int, passes: int = 1,
                  per_class: float = 0.0) -> list[int]:
    """The local device (index) of each batch when shape classes are never split: classes by
    decreasing computed cell-days, each on the device least loaded so far (ties: the lowest
    index), a class loading it by its cell-days plus ``per_class`` (its compile)."""
    n = max(1, n_devices)
    work = _computed_cell_days(batches, passes)
    classes: dict[tuple, list[int]] = {}
    for j, batch in enumerate(batches):
        classes.setdefault(batch.signature, []).append(j)
    device, load = [0] * len(batches), [0.0] * n
    for members in sorted(classes.values(), key=lambda m: (-sum(work[j] for j in m), m[0])):
        d = min(range(n), key=lambda d: (load[d], d))
        load[d] += per_class + sum(work[j] for j in members)
        for j in members:
            device[j] = d
    return device


def _computed_cell_days(batches: Sequence[Batch], passes: int) -> list[float]:
    """Per batch, the cell-days its glaciers compute over ``passes`` runs."""
    return [float(passes * b.grid[0] * b.grid[1] * b.block_length * b.walked_years * len(b.indices))
            for b in batches]


def _signatures_by_device(device: Sequence[int], signature: Sequence[tuple], n: int) -> list[set]:
    out: list[set] = [set() for _ in range(n)]
    for j, d in enumerate(device):
        out[d].add(signature[j])
    return out


def on_gpu(device=None) -> bool:
    device = device if device is not None else jax.local_devices()[0]
    return device.platform != "cpu"


class WorkItem(NamedTuple):
    """One unit of work of a set of glaciers: the glaciers it runs (positions in the set's
    ``names``), a signature equal for items that run in the same compiled function, and a
    description for the line that says what compiles."""

    indices: tuple[int, ...]
    signature: tuple
    describe: str


class Glaciers(Protocol):
    """What training, validation and inference ask of a set of glaciers (:class:`GlacierSet`,
    batched from the dataset; :class:`GlacierList`, arrays given one by one)."""

    names: list[str]

    def items(self) -> list[WorkItem]:
        """The work items, in their fixed order (gradients are summed in it)."""

    def device_indices(self, n_devices: int) -> list[int] | None:
        """The local device (index) of each item, or None: round robin."""

    def load(self, placed: Sequence[tuple[int, object]]) -> Iterator[tuple[int, object]]:
        """``(item, arrays on its device)`` for the given ``(item, device)`` pairs."""


class GlacierList:
    """Glaciers whose arrays are already made (fine-tuning's one glacier with its study years,
    the "carried" validation's inputs), one work item each."""

    def __init__(self, pairs: Sequence[tuple[str, object]]):
        self.pairs = list(pairs)
        self.names = [name for name, _ in self.pairs]

    def __iter__(self) -> Iterator[tuple[str, object]]:
        return iter(self.pairs)

    def items(self) -> list[WorkItem]:
        return [WorkItem((i,), tuple(np.shape(x) for x in jax.tree_util.tree_leaves(arrays)), "1 glacier")
                for i, (_, arrays) in enumerate(self.pairs)]

    def device_indices(self, n_devices: int) -> None:
        return None

    def load(self, placed: Sequence[tuple[int, object]]) -> Iterator[tuple[int, object]]:
        for i, device in placed:
            arrays = self.pairs[i][1]
            yield i, (arrays if device is None else jax.device_put(arrays, device))


class GlacierSet:
    """The glaciers ``names`` of a dataset in batches of one shape (:meth:`batches`), read from
    the tensor cache when a batch is loaded.

    ``layout`` is the ``glaunti.layouts`` layout of the arrays ("exact", or the training layouts
    "padded", "padded_grid" and "cells" that share compiled functions between glaciers). Batches
    stay resident (on their device) while their arrays add up to less than
    :data:`DEFAULT_RESIDENT_BYTES`; the others are re-read from the memory-mapped cache when
    needed, so host memory does not grow with the number of glaciers. Each glacier is read once
    to plan the batches, and its layout's host arrays are kept for its first batch within the
    same budget. The trainer asks for this process's batches only, each on its device.
    """

    def __init__(self, dataset: Dataset, names: Sequence[str], facies: bool, layout: str = "exact",
                 batch_bytes: int | None = None, passes: int = 1, target: str | None = None):
        self.dataset, self.names, self.facies, self.layout = dataset, list(names), facies, layout
        if target not in (None, "cpu", "gpu"):
            raise ValueError(f"target={target!r}: expected 'cpu', 'gpu' or None (this machine's devices)")
        self.target = target  # batches planned as for this kind of device (None: the local one)
        self.budget = DEFAULT_RESIDENT_BYTES
        self.batch_bytes = batch_bytes
        self.passes = passes  # how often the set will be run (epochs): batching weighs compiles
        self._resident_batches: dict[int, GlacierBatch] = {}
        self._used = 0
        self._plan: list[Batch] | None = None
        self._devices: dict[int, list[int]] = {}
        self._shapes: list[GlacierShape] | None = None
        self._planned: dict[int, dict] = {}  # host arrays read while planning, until batched

    def _host(self, tensors) -> dict:
        return layout_host_arrays(tensors, self.facies, self.layout)

    def plan(self, gpu: bool) -> list[Batch]:
        """The batches this set gets on a GPU or a CPU (:func:`plan_batches`)."""
        if self._shapes is None:
            self._shapes = []
            for i, tensors in enumerate(self.dataset.iter_glaciers(self.names)):
                host = self._host(tensors)
                self._shapes.append(GlacierShape.of(i, host, self.layout))
                size = _host_bytes(host)
                if self._used + size <= self.budget:  # its first batch need not read it again
                    self._planned[i] = host
                    self._used += size
        budget = batch_budget() if self.batch_bytes is None else self.batch_bytes
        return plan_batches(self._shapes, budget, self.passes, None if gpu else COMPILE_CELL_DAYS)

    def batches(self) -> list[Batch]:
        """The batches of this set on this machine's devices (computed once from the glaciers'
        shapes, the batch budget (:func:`batch_budget`) and, on a CPU, the number of passes), in
        their fixed order."""
        if self._plan is None:
            self._plan = self.plan(on_gpu() if self.target is None else self.target == "gpu")
        return self._plan

    def device_indices(self, n_devices: int) -> list[int]:
        """The local device (index) of each batch (:func:`assign_devices`; computed once, not
        every epoch)."""
        if n_devices not in self._devices:
            self._devices[n_devices] = assign_devices(self.batches(), n_devices, self.passes)
        return self._devices[n_devices]

    def iter_batches(self, placed: Sequence[tuple[int, object]]) -> Iterator[tuple[int, Batch, GlacierBatch]]:
        """``(b, batch, GlacierBatch)`` for the given ``(batch index, device)`` pairs."""
        plan = self.batches()
        for b, device in placed:
            batch = plan[b]
            arrays = self._resident_batches.get(b)
            if arrays is None:
                unread = [i for i in batch.indices if i not in self._planned]
                read = dict(zip(unread, map(self._host, self.dataset.iter_glaciers([self.names[i] for i in unread]))))
                hosts = [self._planned.pop(i, None) or read[i] for i in batch.indices]
                self._used -= sum(_host_bytes(hosts[n]) for n, i in enumerate(batch.indices) if i not in read)
                # Only a model that pads grids (C/D) reads the flag: on a whole shape class, so
                # that a glacier filling the class's grid runs the padded path too (equal to its
                # own to float32 rounding) in the class's one function.
                stacked = stack_host_arrays(hosts, batch.grid, batch.stakes, batch.loss_cells,
                                            grid_padded=self.layout == "padded_grid" and batch.padded)
                arrays = GlacierBatch(to_device(stacked, device))
                del hosts
                size = nbytes(arrays)
                if self._used + size <= self.budget:
                    self._resident_batches[b] = arrays
                    self._used += size
            elif device is not None:
                arrays = jax.device_put(arrays, device)
            yield b, batch, arrays

    def items(self) -> list[WorkItem]:
        """The work items: one per batch (:meth:`batches`)."""
        return [WorkItem(b.indices, b.signature, b.describe()) for b in self.batches()]

    def load(self, placed: Sequence[tuple[int, object]]) -> Iterator[tuple[int, GlacierBatch]]:
        """``(j, arrays)`` of the given ``(item, device)`` pairs (:meth:`iter_batches`)."""
        for b, _, arrays in self.iter_batches(placed):
            yield b, arrays

    def __len__(self) -> int:
        return len(self.names)
