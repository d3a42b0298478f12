"""Host-side layouts of a glacier: ``GlacierTensors`` (numpy) → ``GlacierArrays`` (device).

``host_arrays`` gathers what the models and losses read; the training layouts only add padding
that cannot change a number, so that glaciers share compiled functions
(``docs/performance.md``). Nothing here knows a model: :func:`layout_for` asks the model
whether it is cell-independent.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

import constants
from glaunti.corrector import check_grid


class GlacierArrays(eqx.Module):
    """Device arrays of one glacier (see ``docs/architecture.md`` for the fields)."""

    # Daily climate as its distinct cell series (reanalysis resampled by nearest neighbour is
    # constant over blocks of cells): cell (i, j) reads column climate_cell[i, j].
    temperature_2m: Float[Array, "D C"]
    precipitation: Float[Array, "D C"]
    climate_cell: Int[Array, "H W"]
    lapse_offset: Float[Array, "Y H W"]
    outlines: Float[Array, "Y H W"]
    fields: Float[Array, "Y 12 H W"]  # corrector inputs: outlines, z, zstd (normalised), 9 facies bands
    climate_monthly: Float[Array, "Y 2 14"]
    n_months: Int[Array, " Y"]
    day_index: Int[Array, "Y L"]
    day_weight: Float[Array, "Y L"]
    day_valid: Bool[Array, "Y L"]
    day_season: Int[Array, "Y L"]
    day_period_start: Bool[Array, "Y L"]
    seasonal: Bool[Array, " Y"]
    study: Bool[Array, " Y"]
    glacier_wide: Float[Array, "Y 3"]
    stake_year: Int[Array, " N"]
    stake_code: Int[Array, " N"]
    stake_row: Int[Array, " N"]
    stake_col: Int[Array, " N"]
    stake_balance: Float[Array, " N"]
    stake_weight: Float[Array, " N"]
    # The glacier's own grid (H, W) before any padding of the grid to a shape bucket: rows and
    # columns at or beyond it are padding that no model output may depend on.
    grid_size: Int[Array, " 2"]
    # Flat indices (into the stored H×W grid) of the cells that can affect the loss: glacier in
    # any year or holding a stake; padded with H·W (out of range) to a cell bucket.
    loss_cells: Int[Array, " K"]

    # Spin-up years come first (1990–1994); a static count so that they get their own scan.
    n_spinup: int = eqx.field(static=True)
    # Whether the grid was padded to a shape bucket ("padded_grid"): models that see the whole
    # grid then mask what lies beyond ``grid_size`` (static: the unpadded path stays the
    # published computation, bit for bit).
    grid_padded: bool = eqx.field(static=True, default=False)

    @property
    def n_years(self) -> int:
        return self.day_index.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.climate_cell.shape


# Stakes are padded to a multiple of this (with zero weight) so that glaciers of one grid shape
# share compiled functions whatever their number of stakes.
STAKE_PADDING = 64
INDEX_CODE = constants.index_stake_code  # index readings: evaluated, never calibrated on


def _pad(values, n, fill):
    values = np.asarray(values)
    return np.concatenate([values, np.full(n - len(values), fill, dtype=values.dtype)])


def loss_cells(outlines, stake_row, stake_col) -> np.ndarray:
    """Flat indices of the cells of an (Y, H, W) ``outlines`` grid that can affect the loss
    (glacier in any year, or holding one of the given stakes), padded with H·W to a cell bucket."""
    outlines = np.asarray(outlines)
    height, width = outlines.shape[-2:]
    keep = np.any(outlines > 0, axis=0)
    keep[np.asarray(stake_row, int), np.asarray(stake_col, int)] = True
    flat = np.flatnonzero(keep.ravel()).astype(np.int32)
    return _pad(flat, cell_bucket(len(flat)), height * width)


def host_arrays(tensors, facies: bool = False) -> dict:
    """The fields of :class:`GlacierArrays` as numpy arrays (exact shapes), plus ``n_spinup``."""
    n = max(STAKE_PADDING, -(-len(tensors.stake_balance) // STAKE_PADDING) * STAKE_PADDING)
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    i32 = lambda a: np.asarray(a, dtype=np.int32)  # noqa: E731
    facies_bands = np.asarray(tensors.facies, dtype=np.float32)
    if not facies:
        facies_bands = np.full_like(facies_bands, constants.facies_placeholder)
    fields = np.concatenate(
        [
            np.asarray(tensors.outlines, np.float32)[:, None],
            (np.asarray(tensors.elevation, np.float32) / np.float32(constants.elevation_norm))[:, None],
            (np.asarray(tensors.elevation_std, np.float32) / np.float32(constants.elevation_std_norm))[:, None],
            facies_bands,
        ],
        axis=1,
    )
    return dict(
        temperature_2m=f32(tensors.temperature_2m),
        precipitation=f32(tensors.precipitation),
        climate_cell=i32(tensors.climate_cell),
        lapse_offset=f32(tensors.lapse_offset),
        outlines=f32(tensors.outlines),
        fields=f32(fields),
        climate_monthly=f32(tensors.climate_monthly),
        n_months=i32(tensors.n_months),
        day_index=i32(tensors.day_index),
        day_weight=f32(tensors.day_weight),
        day_valid=np.asarray(tensors.day_valid, dtype=bool),
        day_season=i32(tensors.day_season),
        day_period_start=np.asarray(tensors.day_period_start, dtype=bool),
        seasonal=np.asarray(tensors.seasonal, dtype=bool),
        study=np.asarray(tensors.study, dtype=bool),
        glacier_wide=f32(tensors.glacier_wide),
        stake_year=i32(_pad(tensors.stake_year, n, 0)),
        stake_code=i32(_pad(tensors.stake_code, n, INDEX_CODE)),
        stake_row=i32(_pad(tensors.stake_row, n, 0)),
        stake_col=i32(_pad(tensors.stake_col, n, 0)),
        stake_balance=f32(_pad(tensors.stake_balance, n, 0.0)),
        stake_weight=f32(_pad(tensors.stake_weight, n, 0.0)),
        grid_size=i32(np.shape(tensors.climate_cell)),
        loss_cells=loss_cells(tensors.outlines, tensors.stake_row, tensors.stake_col),
        n_spinup=int(np.sum(np.asarray(tensors.years) < constants.study_period_start_year)),
    )


# ----------------------------------------------------------------------------------------------
# Layouts. "exact" keeps the glacier's own shapes (what analysis code and the golden tests use).
# The training layouts only add padding that cannot change a number, so that glaciers share
# compiled functions (docs/performance.md):
#   "padded": the number of years Y, climate days D and climate columns C rounded up to
#             buckets. Padded years are all-invalid blocks (``study`` False, outlines copied
#             from the last real year so that no mean divides by zero); ``run_glacier`` skips
#             them with ``lax.cond``, so they cost nothing. Padded days/columns are never read.
#             One compile per grid shape (H, W). Used for C and D (the corrector needs the grid).
#   "padded_grid": "padded", and in a batch the grid padded (bottom/right) to the batch's grid
#             (``core.execute.sets.plan_batches``; on a GPU a :func:`grid_bucket`) with inert cells:
#             outlines, fields, lapse offset and climate column 0, never a stake. Exact only for
#             a model whose outputs on the glacier's own grid do not depend on the padding (it
#             reads ``grid_size``); such a model says so with ``pads_grid = True`` and
#             :func:`layout_for` then picks this layout. Glaciers of different grids can then
#             share one compiled function (which ones: ``core.execute.sets.plan_batches``).
#   "cells":  "padded", and the grid replaced by a (1, N) row of the cells that matter for the
#             loss (glacier in any year, or holding a stake), N rounded up to a cell bucket with
#             inert padding cells. Exact for the cell-independent models A and B only; one
#             compile per cell bucket, and 2-3x less work (most of a grid is off-glacier).
# Glaciers are stacked into batches (:func:`stack_host_arrays`), which pad their stakes, loss
# cells and grid (or "cells" row) to the batch's.
# ----------------------------------------------------------------------------------------------
LAYOUTS = ("exact", "padded", "padded_grid", "cells")
YEAR_MULTIPLE = 8
DAY_MULTIPLE = 2048
MIN_COLUMNS = 16
MIN_CELLS = 128
CELL_BUCKETS_PER_OCTAVE = 4
# Grid buckets of "padded_grid" batches on a GPU: sides at least 32 (the corrector pools three
# times by 2, and on a GPU a smaller grid costs launch latency, not arithmetic), above that 4
# sizes per octave in steps of at least 8 (≤ 25 % padding per side, ≤ 56 % per grid).
# docs/performance.md lists the waste.
MIN_BUCKET_SIDE = 32


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def column_bucket(c: int) -> int:
    """Climate columns C rounded up to a power of two (at least 16)."""
    return max(MIN_COLUMNS, 1 << int(np.ceil(np.log2(max(c, 1)))))


def cell_bucket(n: int, per_octave: int = CELL_BUCKETS_PER_OCTAVE) -> int:
    """Cells rounded up to one of ``per_octave`` sizes per power of two (≤ 1/per_octave padding):
    128, 160, 192, 224, 256, 320, ... for 4 per octave."""
    if n <= MIN_CELLS:
        return MIN_CELLS
    step = max(1, (1 << (int(np.floor(np.log2(n))))) // per_octave)
    return _round_up(n, step)


def side_bucket(n: int) -> int:
    """A grid side rounded up to a bucket: 32, 40, 48, 56, 64, 80, 96, ..., 512, 640, ..."""
    if n <= MIN_BUCKET_SIDE:
        return MIN_BUCKET_SIDE
    step = max(8, (1 << int(np.floor(np.log2(n)))) // CELL_BUCKETS_PER_OCTAVE)
    return _round_up(n, step)


def grid_bucket(height: int, width: int) -> tuple[int, int]:
    """The bucket grid (H', W') of an (H, W) grid (GPU batches of "padded_grid")."""
    return side_bucket(height), side_bucket(width)


def layout_for(model) -> str:
    """The training layout of a model: "cells" when its cells are independent (A, B: the grid
    can be packed into a row of the cells that matter), else "padded_grid" when the model
    declares ``pads_grid`` (its outputs ignore cells beyond ``grid_size``), else "padded"."""
    if model.cell_independent:
        return "cells"
    return "padded_grid" if getattr(model, "pads_grid", False) else "padded"


def inference_layout(model) -> str:
    """The layout in which glaciers of different grids share an inference batch: "padded_grid"
    for a model whose outputs ignore cells beyond ``grid_size`` (C, D), else "padded" (A, B:
    cell-independent, a padded cell changes no other; the whole grid, not only "cells", since
    the daily SMB covers every cell)."""
    return "padded_grid" if getattr(model, "pads_grid", False) else "padded"


def _pad_axis(a: np.ndarray, axis: int, n: int, fill=0, edge: bool = False) -> np.ndarray:
    extra = n - a.shape[axis]
    if extra <= 0:
        return a
    if edge:
        last = np.take(a, [a.shape[axis] - 1], axis=axis)
        pad = np.repeat(last, extra, axis=axis)
    else:
        shape = list(a.shape)
        shape[axis] = extra
        pad = np.full(shape, fill, dtype=a.dtype)
    return np.concatenate([a, pad], axis=axis)


def pad_host_arrays(h: dict) -> dict:
    """The "padded" layout of :func:`host_arrays` output (Y, D, C to buckets), see above."""
    h = dict(h)
    n_years = h["day_index"].shape[0]
    y = _round_up(n_years, YEAR_MULTIPLE)
    d = _round_up(h["temperature_2m"].shape[0], DAY_MULTIPLE)
    c = column_bucket(h["temperature_2m"].shape[1])
    for name in ("temperature_2m", "precipitation"):
        h[name] = _pad_axis(_pad_axis(h[name], 0, d), 1, c)
    for name in ("lapse_offset", "outlines", "fields", "climate_monthly", "n_months"):
        h[name] = _pad_axis(h[name], 0, y, edge=True)
    for name in ("day_index", "day_weight", "day_valid", "day_season", "day_period_start",
                 "seasonal", "study"):
        h[name] = _pad_axis(h[name], 0, y)
    h["glacier_wide"] = _pad_axis(h["glacier_wide"], 0, y, fill=np.nan)
    return h


# Keys of a host dict that are static fields of GlacierArrays, not arrays.
STATIC_KEYS = ("n_spinup", "grid_padded")
# The fields of GlacierArrays that hold the grid (..., H, W): padding fills them with 0, the
# "cells" layout and the engine's chunks of cells cut them.
GRID_FIELDS = ("climate_cell", "lapse_offset", "outlines", "fields")


def pad_host_grid(h: dict, height: int, width: int) -> dict:
    """The grid of :func:`host_arrays`-style ``h`` padded at the bottom/right to (height, width)
    with inert cells (0 everywhere; stakes keep their cells). ``grid_size`` keeps the glacier's
    own size; ``loss_cells`` are re-indexed into the padded grid (padding value height·width).
    Whether a model then masks the padding (``grid_padded``) is the batch's to say
    (:func:`stack_host_arrays`)."""
    old_h, old_w = h["climate_cell"].shape
    if (height, width) == (old_h, old_w):
        return h
    if height < old_h or width < old_w:
        raise ValueError(f"cannot pad a {old_h}×{old_w} grid to {height}×{width}")
    h = dict(h)
    for name in GRID_FIELDS:
        h[name] = _pad_axis(_pad_axis(h[name], -2, height), -1, width)
    cells = h["loss_cells"]
    real = cells < old_h * old_w
    h["loss_cells"] = np.where(real, (cells // old_w) * width + cells % old_w, height * width).astype(np.int32)
    return h


def pad_host_stakes(h: dict, n: int) -> dict:
    """Stakes padded to ``n`` as :func:`host_arrays` pads them (zero weight, index code)."""
    h = dict(h)
    fills = dict(stake_year=0, stake_code=INDEX_CODE, stake_row=0, stake_col=0, stake_balance=0.0,
                 stake_weight=0.0)
    for name, fill in fills.items():
        h[name] = _pad(h[name], n, fill)
    return h


def stack_host_arrays(hs: list[dict], grid: tuple[int, int] | None = None, stakes: int | None = None,
                      loss_cells: int | None = None, grid_padded: bool = False) -> dict:
    """Glaciers of one bucket (:func:`host_arrays` dicts of one layout, equal Y, D, C, L and
    spin-up) stacked along a new leading axis, after padding each one's grid (or "cells" row),
    stakes and loss cells to ``grid``, ``stakes`` and ``loss_cells`` (default: the largest of
    the batch); ``n_spinup`` stays a plain int. ``grid_padded`` (static) makes a padding-aware
    model (C/D) mask what lies beyond each glacier's ``grid_size``: set for a whole shape class
    that holds a padded glacier (``core.execute.sets``), so that the class compiles one
    function."""
    height, width = grid or (max(h["climate_cell"].shape[0] for h in hs),
                             max(h["climate_cell"].shape[1] for h in hs))
    stakes = stakes or max(len(h["stake_year"]) for h in hs)
    hs = [pad_host_stakes(pad_host_grid(h, height, width), stakes) for h in hs]
    loss_cells = loss_cells or max(len(h["loss_cells"]) for h in hs)
    for h in hs:
        h["loss_cells"] = _pad(h["loss_cells"], loss_cells, height * width)
    spinups = {h["n_spinup"] for h in hs}
    if len(spinups) != 1:
        raise ValueError(f"glaciers of one batch must share their spin-up years; got {sorted(spinups)}")
    out = {}
    for name in hs[0]:
        if name in STATIC_KEYS:
            continue
        shapes = {h[name].shape for h in hs}
        if len(shapes) != 1:
            raise ValueError(f"glaciers of one batch differ in the shape of {name}: {sorted(shapes)}")
        out[name] = np.stack([h[name] for h in hs])
    out["n_spinup"] = spinups.pop()
    out["grid_padded"] = grid_padded
    return out


def pack_host_cells(h: dict, keep: np.ndarray | None = None) -> dict:
    """The "cells" layout: the grid becomes a (1, N) row of the kept cells (default: glacier in
    any year or holding a stake), N rounded up with :func:`cell_bucket`."""
    h = dict(h)
    height, width = h["climate_cell"].shape
    if keep is None:
        keep = np.any(h["outlines"] > 0, axis=0)
        keep[h["stake_row"], h["stake_col"]] = True  # padded stakes sit on (0, 0): harmless
    flat = np.flatnonzero(np.asarray(keep, bool).ravel())
    n = cell_bucket(len(flat))
    position = np.zeros(height * width, np.int32)
    position[flat] = np.arange(len(flat), dtype=np.int32)

    def pack(a):  # (..., H, W) -> (..., 1, n)
        cells = a.reshape(a.shape[:-2] + (height * width,))[..., flat]
        return _pad_axis(cells, -1, n)[..., None, :]

    for name in GRID_FIELDS:
        h[name] = pack(h[name])
    h["grid_size"] = np.array([1, n], np.int32)
    h["loss_cells"] = _pad(np.arange(len(flat), dtype=np.int32), n, n)
    h["stake_col"] = position[h["stake_row"] * width + h["stake_col"]]
    h["stake_row"] = np.zeros_like(h["stake_row"])
    return h


def make_arrays(tensors, facies: bool = False, *, layout: str = "exact", device=None,
                keep=None) -> GlacierArrays:
    """``GlacierTensors`` → ``GlacierArrays``. ``facies`` selects model D's inputs (the facies maps
    where they exist); otherwise the nine facies bands hold the −1 placeholder (model C).

    ``layout`` is "exact" (default: the glacier's own shapes), "padded", "padded_grid" or "cells"
    (training layouts that share compiled functions between glaciers; see :data:`LAYOUTS`). ``device``
    places the arrays on that device (default: JAX's default device). ``keep`` (H, W) bool
    overrides the cells kept by the "cells" layout (e.g. every cell, for inference).
    """
    return to_device(layout_host_arrays(tensors, facies, layout, keep), device)


def layout_host_arrays(tensors, facies: bool = False, layout: str = "exact", keep=None) -> dict:
    """:func:`host_arrays` in ``layout`` (numpy; what :func:`make_arrays` puts on a device)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    h = host_arrays(tensors, facies)
    if layout != "exact":
        h = pad_host_arrays(h)
    if layout == "padded_grid":
        # A traced grid size cannot be checked by the corrector: check the real one here. The
        # grid itself is padded by the batch it joins (stack_host_arrays), if at all.
        check_grid(*h["climate_cell"].shape)
    if layout == "cells":
        h = pack_host_cells(h, keep)
    return h


def to_device(h: dict, device=None) -> GlacierArrays:
    """:class:`GlacierArrays` from a host dict (one glacier, or a batch from
    :func:`stack_host_arrays`) on ``device`` (None: JAX's default device)."""
    h = dict(h)
    static = {name: h.pop(name) for name in STATIC_KEYS if name in h}
    if device is not None:
        h = jax.device_put(h, device)
    else:
        h = {k: jnp.asarray(v) for k, v in h.items()}
    return GlacierArrays(**h, **static)


class GlacierBatch(eqx.Module):
    """Glaciers of one bucket as one :class:`GlacierArrays` whose every array has a leading
    glacier axis B (the engine runs it under ``jax.vmap``, ``core.train.loss.batch_loss``)."""

    arrays: GlacierArrays

    @property
    def size(self) -> int:
        return self.arrays.day_index.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        return self.arrays.climate_cell.shape[1:]
