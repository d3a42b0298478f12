"""Daily SMB inference over a glacier's study period, streamed year by year.

The state (SWE or GRU hidden state) is spun up over 1990–1994 and carried through the study
years; each study year is run in the series regime and its days are placed on the calendar.
Days covered by two periods (the midseason day, a shared year boundary) hold the sum of both
half-weighted values. Only about one year of daily fields is in memory at a time: the NetCDF
writer buffers one block of file chunks (at most MAP_VALUES values). The glaciers of a training
batch (``core.data``) can run as one vmapped computation, each written to its own file
(:func:`write_daily_smb_batch`), and the batches of a glacier set on several devices at once
(:func:`write_daily_smb_batches`; the files are written from one thread).
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
import warnings
from typing import Iterator, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import netCDF4
import numpy as np
import pyproj
import xarray as xr

from core.data import whole_classes
from core.distributed import map_glaciers  # noqa: F401  (inference spreads glaciers over devices)
from core.io import atomic_path
from core.training import announce_compile, claim_compile, progress_note
from glaunti.glacier import GlacierArrays, GlacierBatch, initial_state, walk_years, year_step

SMB_VARIABLE = "smb"


def _spin_up(model, arrays):
    """The state after the spin-up years, from the cold start (the engine's year walk)."""
    state = initial_state(model, arrays)
    if arrays.n_spinup:
        state = walk_years(model, arrays, state, 0, arrays.n_spinup - 1)[0]
    return state


def _series(model, arrays, k, state):
    state, _, _, series = year_step(model, arrays, k, state, series=True)
    return state, series


_spun_up = eqx.filter_jit(_spin_up)
_series_step = eqx.filter_jit(_series)


@eqx.filter_jit
def _spun_up_batch(model, arrays):
    """:func:`_spin_up` of every glacier of a stacked batch (leading axis)."""
    return jax.vmap(lambda a: _spin_up(model, a))(arrays)


@eqx.filter_jit
def _series_step_batch(model, arrays, k, state):
    """Year ``k`` of every glacier of a stacked batch: (states, series (B, T, H, W))."""
    return jax.vmap(lambda a, s: _series(model, a, k, s))(arrays, state)


def _announce(model, arrays, describe: str, verbose: bool) -> float | None:
    """Note a new inference shape and, ``verbose``, say that it compiles; the start time or None."""
    shapes = tuple(np.shape(x) for x in jax.tree_util.tree_leaves(arrays))
    first, ready = claim_compile(("inference", type(model), shapes))
    ready.set()  # no device waits for an inference compile
    if not first:
        return None
    return announce_compile(f"model {getattr(model, 'kind', '?')} inference", describe) if verbose else None


class Calendar:
    """Places one glacier's study years, as the model runs them, on the calendar.

    :meth:`add` takes year k's daily series (T, H, W) and returns the ``(first_day, smb)``
    pieces of consecutive days that are final; :meth:`finish` returns the rest. A day shared by
    two balance years (a year boundary) holds the sum of both; days between two years that no
    year models hold 0, with a warning."""

    def __init__(self, tensors):
        self.tensors = tensors
        self.pending_day, self.pending = None, None

    def add(self, k: int, series: np.ndarray) -> list[tuple[int, np.ndarray]]:
        tensors = self.tensors
        begin, end = int(tensors.begin_day[k]), int(tensors.end_day[k])
        year = np.zeros((end - begin + 1,) + series.shape[1:], dtype=np.float32)
        valid = np.asarray(tensors.day_valid[k])
        np.add.at(year, np.asarray(tensors.day_index[k])[valid] - begin, series[valid])
        out = []
        pending = self.pending
        if pending is not None:
            overlap = self.pending_day + len(pending) - begin
            if overlap > 0:
                year[:overlap] += pending[len(pending) - overlap:]
                pending = pending[: len(pending) - overlap]
            elif overlap < 0:
                warnings.warn(f"{tensors.name}: {-overlap} day(s) between balance years "
                              f"{int(tensors.years[k]) - 1} and {int(tensors.years[k])} are not modelled; "
                              "they hold 0 in the daily output", stacklevel=3)
                pending = np.concatenate([pending, np.zeros((-overlap,) + pending.shape[1:], np.float32)])
            if len(pending):
                out.append((self.pending_day, pending))
        self.pending_day, self.pending = begin, year
        return out

    def finish(self) -> list[tuple[int, np.ndarray]]:
        return [] if self.pending is None else [(self.pending_day, self.pending)]


def iter_daily_smb(model, arrays: GlacierArrays, tensors, verbose: bool = True
                   ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_day, smb)`` chunks of consecutive calendar days covering the study period;
    ``smb`` is (n, H, W) float32 m w.e. per day, ``first_day`` a climate-day index. The first
    glacier of a new shape says that it compiles (``verbose``)."""
    height, width = arrays.shape
    t0 = _announce(model, arrays, f"{height}×{width}", verbose)
    state = _spun_up(model, arrays)
    calendar = Calendar(tensors)
    for k in range(arrays.n_spinup, len(tensors.years)):
        state, series = _series_step(model, arrays, jnp.int32(k), state)  # traced k: one compile
        series = np.asarray(series)
        if t0 is not None:
            progress_note(f"  compiled and ran its first year in {time.perf_counter() - t0:.1f} s")
            t0 = None
        yield from calendar.add(k, series)
    yield from calendar.finish()


def batch_series(model, batch: GlacierBatch, tensors: Sequence, verbose: bool = True
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """``(k, daily SMB (B, L, H, W) of year k)`` of a stacked batch (``core.data``: grids padded
    to the batch's, years and days to its buckets), study year by study year, computed on the
    batch's device as one vmapped computation (a batch of one without vmap). ``tensors`` follow
    the batch's glaciers."""
    arrays = batch.arrays
    size = arrays.day_valid.shape[0]
    if len(tensors) != size:
        raise ValueError(f"a batch of {size} glaciers needs as many tensors, got {len(tensors)}")
    height, width = arrays.climate_cell.shape[-2:]
    t0 = _announce(model, arrays, f"{height}×{width}, {size} glacier{'s' if size > 1 else ''}", verbose)
    if size == 1:  # no vmap: the same numbers, cheaper on a CPU
        one = jax.tree_util.tree_map(lambda a: a[0], arrays)
        state = _spun_up(model, one)

        def step(k, state):
            state, series = _series_step(model, one, k, state)
            return state, series[None]
    else:
        state = _spun_up_batch(model, arrays)

        def step(k, state):
            return _series_step_batch(model, arrays, k, state)

    for k in range(arrays.n_spinup, max(len(t.years) for t in tensors)):
        state, series = step(jnp.int32(k), state)
        series = np.asarray(series)
        if t0 is not None:
            progress_note(f"  compiled and ran its first year in {time.perf_counter() - t0:.1f} s")
            t0 = None
        yield k, series


class BatchFiles:
    """The daily SMB files of one batch's glaciers, fed year by year (:meth:`add`) with what
    :func:`batch_series` yields; each file holds its glacier's own grid and days, as
    :func:`write_netcdf` writes them. A context manager: all files are committed when it closes
    without an error, none otherwise. ``spans`` then holds (first_day, number of days) per file."""

    def __init__(self, tensors: Sequence, paths: Sequence, model_name: str):
        if len(paths) != len(tensors):
            raise ValueError(f"{len(tensors)} glaciers need as many paths, got {len(paths)}")
        self.tensors, self.paths, self.model_name = list(tensors), list(paths), model_name
        self.spans: list[tuple[int, int]] = []

    def __enter__(self) -> BatchFiles:
        with contextlib.ExitStack() as stack:
            self._files = [stack.enter_context(DailySMBFile(stack.enter_context(atomic_path(p)), t,
                                                            self.model_name))
                           for p, t in zip(self.paths, self.tensors)]
            self._calendars = [Calendar(t) for t in self.tensors]
            self._stack = stack.pop_all()
        return self

    def add(self, k: int, series: np.ndarray) -> None:
        """Year k's daily SMB of the batch (B, L, H, W), each glacier cropped to its own grid."""
        for i, t in enumerate(self.tensors):
            if k < len(t.years):
                own = series[i, :, : len(t.y), : len(t.x)]
                for day, data in self._calendars[i].add(k, own):
                    self._files[i].add(day, data)

    def __exit__(self, kind, value, traceback):
        if kind is not None:  # an error: every temporary file is removed
            self._stack.__exit__(kind, value, traceback)
            return False
        try:
            for calendar, file in zip(self._calendars, self._files):
                for day, data in calendar.finish():
                    file.add(day, data)
        except BaseException as err:
            self._stack.__exit__(type(err), err, err.__traceback__)
            raise
        self._stack.close()
        self.spans = [(f.first_day, f.n_days) for f in self._files]
        return False


def write_daily_smb_batch(model, batch: GlacierBatch, tensors: Sequence, paths: Sequence, model_name: str,
                          verbose: bool = True) -> list[tuple[int, int]]:
    """The daily SMB NetCDF files of the glaciers of one stacked batch (:func:`batch_series`,
    :class:`BatchFiles`): all or none are written. Returns (first_day, number of days) per file."""
    with BatchFiles(tensors, paths, model_name) as files:
        for k, series in batch_series(model, batch, tensors, verbose):
            files.add(k, series)
    return files.spans


def inference_devices(batches: Sequence, n_devices: int) -> list[int]:
    """The local device (index) of each batch of an inference: whole shape classes
    (``core.data.whole_classes``). One pass does not pay for a class's second compile
    (compiles side by side do not finish sooner either: the demo twin's 4 test glaciers of one
    shape with model C took 14.9 s on one CPU device, 26.2 s split over two)."""
    return whole_classes(batches, n_devices)


class _Stopped(Exception):
    """A device thread was told to stop (another thread failed)."""


def write_daily_smb_batches(model, glacier_set, paths: Sequence, model_name: str, written=None,
                            devices=None, verbose: bool = True) -> None:
    """:func:`write_daily_smb_batch` for every batch of ``glacier_set`` (``core.data.GlacierSet``;
    ``paths`` follow its glaciers), the batches spread over the local ``devices`` by shape
    class (:func:`inference_devices`). One thread per device computes; this thread
    writes every file, because NetCDF/HDF5 is not safe from several threads. At most two years
    per device wait to be written. ``written(batch, tensors)`` is called (here) once a batch's
    files are committed. A failure stops every device and leaves none of the unfinished
    batches' files."""
    devices = list(jax.local_devices() if devices is None else devices)
    plan = glacier_set.batches()

    def glacier_tensors(batch):
        return [glacier_set.dataset.glacier(glacier_set.names[i]) for i in batch.indices]

    if len(devices) <= 1 or len(plan) <= 1:
        for _, batch, arrays in glacier_set.iter_batches([(b, None) for b in range(len(plan))]):
            tensors = glacier_tensors(batch)
            write_daily_smb_batch(model, arrays, tensors, [paths[i] for i in batch.indices], model_name, verbose)
            if written is not None:
                written(batch, tensors)
        return

    assignment = inference_devices(plan, len(devices))
    pieces: queue.Queue = queue.Queue(maxsize=2 * len(devices))
    stop = threading.Event()

    def send(item):
        while True:
            try:
                pieces.put(item, timeout=0.1)
                return
            except queue.Full:
                if stop.is_set():
                    raise _Stopped from None

    def work(d):
        try:
            with jax.default_device(devices[d]):
                mine = [(b, devices[d]) for b in range(len(plan)) if assignment[b] == d]
                for b, batch, arrays in glacier_set.iter_batches(mine):
                    tensors = glacier_tensors(batch)
                    send(("start", b, (batch, tensors)))
                    for piece in batch_series(model, arrays, tensors, verbose):
                        if stop.is_set():
                            return
                        send(("year", b, piece))
                    send(("end", b, None))
        except _Stopped:
            return
        except BaseException as err:  # reported, never swallowed: the writer re-raises it
            with contextlib.suppress(_Stopped):
                send(("error", None, err))
        finally:
            with contextlib.suppress(_Stopped):
                send(("exit", d, None))

    threads = [threading.Thread(target=work, args=(d,), name=f"glaunti-inference-{d}", daemon=True)
               for d in sorted(set(assignment))]
    for thread in threads:
        thread.start()
    files: dict[int, tuple[BatchFiles, object, list]] = {}
    try:
        running = len(threads)
        while running:
            kind, b, payload = pieces.get()
            if kind == "start":
                batch, tensors = payload
                files[b] = (BatchFiles(tensors, [paths[i] for i in batch.indices], model_name).__enter__(),
                            batch, tensors)
            elif kind == "year":
                files[b][0].add(*payload)
            elif kind == "end":
                batch_files, batch, tensors = files.pop(b)
                batch_files.__exit__(None, None, None)
                if written is not None:
                    written(batch, tensors)
            elif kind == "error":
                raise payload
            else:
                running -= 1
    except BaseException as err:
        stop.set()
        for batch_files, _, _ in files.values():
            with contextlib.suppress(Exception):
                batch_files.__exit__(type(err), err, err.__traceback__)
        raise
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def daily_dates(tensors, first_day: int, n: int) -> np.ndarray:
    return tensors.first_date + np.arange(first_day, first_day + n).astype("timedelta64[D]")


def infer(model, arrays: GlacierArrays, tensors) -> tuple[xr.DataArray, int]:
    """The whole daily SMB series in memory: (DataArray (time, y, x), climate-day index of its
    first day)."""
    chunks = list(iter_daily_smb(model, arrays, tensors))
    first_day = chunks[0][0]
    data = np.concatenate([c for _, c in chunks])
    return _as_dataarray(tensors, data, daily_dates(tensors, first_day, len(data))), first_day


def _as_dataarray(tensors, data, dates):
    return xr.DataArray(
        data, dims=("time", "y", "x"),
        coords={"time": dates.astype("datetime64[ns]"), "y": tensors.y, "x": tensors.x},
        name=SMB_VARIABLE, attrs=_smb_attrs(),
    )


def _smb_attrs():
    return {
        "long_name": "daily surface mass balance",
        "units": "m w.e. d-1",  # metres of water equivalent per day (1 m w.e. = 1000 kg m-2)
        "grid_mapping": "spatial_ref",
        "comment": "days shared by two model periods hold the sum of both half-weighted values",
    }


# Chunking of the daily SMB. A chunk holds CHUNK_DAYS consecutive days of a rectangular tile:
# - days: 365, fewer when a year of the whole grid exceeds MAP_VALUES, because reading one
#   day's map decompresses every chunk of its block of days (at most MAP_VALUES values);
# - tile: the whole grid when the chunk stays within CHUNK_VALUES, otherwise the grid cut into
#   near-equal tiles that do, because reading one cell's series decompresses its tile over
#   all days.
# One chunk per day (the former layout) compressed poorly and made a series touch every day.
CHUNK_DAYS = 365
MAP_VALUES = 4_000_000    # 16 MB of float32
CHUNK_VALUES = 262_144    # 1 MB of float32


def chunk_shape(height: int, width: int) -> tuple[int, int, int]:
    """(days, rows, columns) of one chunk of the (time, y, x) daily SMB of an H x W grid."""
    days = max(1, min(CHUNK_DAYS, MAP_VALUES // (height * width)))
    cells = max(1, CHUNK_VALUES // days)
    if height * width <= cells:
        return days, height, width
    side = max(1, math.isqrt(cells))
    rows = -(-height // -(-height // side))  # ceil(H / number of tiles): near-equal tiles
    cols = -(-width // -(-width // side))
    return days, rows, cols


def _geotransform(x: np.ndarray, y: np.ndarray) -> str:
    """GDAL's ``GeoTransform`` of a grid of cell centres ``x`` (W,), ``y`` (H,) decreasing:
    "x_left dx 0 y_top 0 -dy" from the outer corner of the first cell (m)."""
    dx = float(x[1] - x[0]) if len(x) > 1 else 100.0
    dy = float(y[0] - y[1]) if len(y) > 1 else 100.0
    # Plain Python floats: a numpy scalar's repr is "np.float64(...)" under numpy 2.
    return " ".join(repr(float(v)) for v in (x[0] - dx / 2, dx, 0.0, y[0] + dy / 2, 0.0, -dy))


def _grid_mapping_attrs(crs_wkt: str, x: np.ndarray, y: np.ndarray) -> dict:
    """``spatial_ref`` as the input files hold it: CF grid-mapping parameters, the WKT under
    both names read by CF tools and GDAL, and the GeoTransform."""
    try:
        attrs = pyproj.CRS.from_wkt(crs_wkt).to_cf()
    except pyproj.exceptions.CRSError:
        attrs = {}
    attrs.update(crs_wkt=crs_wkt, spatial_ref=crs_wkt, GeoTransform=_geotransform(x, y))
    return attrs


class DailySMBFile:
    """A CF-compliant daily SMB NetCDF file being written: :meth:`add` takes pieces of
    consecutive days and writes them in blocks of whole file chunks (:func:`chunk_shape`), so
    that each chunk is compressed once; at most one block plus one piece is held. A context
    manager: the file is complete when it closes (give it a temporary path, ``atomic_path``)."""

    def __init__(self, path, tensors, model_name: str):
        self.first_day, self.n_days = None, 0
        self._buffer, self._held = [], 0
        self._layout = chunk_shape(len(tensors.y), len(tensors.x))
        self._nc = nc = netCDF4.Dataset(path, "w", format="NETCDF4")
        try:
            nc.createDimension("time", None)
            nc.createDimension("y", len(tensors.y))
            nc.createDimension("x", len(tensors.x))
            nc.title = f"GlaUnTI model {model_name.upper()} daily surface mass balance, {tensors.name}"
            nc.Conventions = "CF-1.8"
            nc.glacier = tensors.name
            crs = nc.createVariable("spatial_ref", "i4")
            crs.setncatts(_grid_mapping_attrs(tensors.crs_wkt, tensors.x, tensors.y))
            for name, values in (("y", tensors.y), ("x", tensors.x)):
                var = nc.createVariable(name, "f8", (name,))
                var[:] = values
                var.setncatts({"standard_name": f"projection_{name}_coordinate", "units": "m",
                               "axis": name.upper(), "long_name": f"{name} coordinate of cell centre"})
            self._time = nc.createVariable("time", "i4", ("time",), chunksizes=(self._layout[0],))
            self._time.setncatts({"standard_name": "time", "axis": "T", "long_name": "day",
                                  "units": f"days since {np.datetime_as_string(tensors.first_date, unit='D')}",
                                  "calendar": "proleptic_gregorian"})
            self._smb = nc.createVariable(SMB_VARIABLE, "f4", ("time", "y", "x"), zlib=True, shuffle=True,
                                          complevel=4, fill_value=np.float32(np.nan), chunksizes=self._layout)
            self._smb.setncatts(_smb_attrs())
        except BaseException:
            nc.close()
            raise

    def add(self, day: int, data: np.ndarray) -> None:
        """Append ``data`` (n, H, W) for the days from ``day`` on (consecutive with the last)."""
        if self.first_day is None:
            self.first_day = day
        elif day != self.first_day + self.n_days + self._held:
            raise ValueError(f"daily SMB piece starts at day {day}, expected "
                             f"{self.first_day + self.n_days + self._held} (pieces must be consecutive)")
        self._buffer.append(data)
        self._held += len(data)
        days = self._layout[0]
        while self._held >= days:
            joined = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
            self._write(joined[:days])
            rest = joined[days:]
            self._buffer, self._held = [rest] if len(rest) else [], len(rest)

    def _write(self, data: np.ndarray) -> None:
        start = self.first_day + self.n_days
        self._time[self.n_days: self.n_days + len(data)] = np.arange(start, start + len(data), dtype=np.int32)
        self._smb[self.n_days: self.n_days + len(data)] = data
        self.n_days += len(data)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        try:
            if kind is None and self._held:
                self._write(np.concatenate(self._buffer))
                self._buffer, self._held = [], 0
        finally:
            self._nc.close()
        return False


def write_netcdf(path, tensors, chunks: Iterator[tuple[int, np.ndarray]], model_name: str) -> tuple[int, int]:
    """Stream daily SMB chunks into a CF-compliant NetCDF file (atomically).

    ``chunks`` yields ``(first_day, smb)`` pieces of consecutive days as :func:`iter_daily_smb`
    does; they are written in blocks of whole file chunks (:class:`DailySMBFile`).
    Returns (first_day, number of days) written.
    """
    with atomic_path(path) as tmp, DailySMBFile(tmp, tensors, model_name) as file:
        for day, data in chunks:
            file.add(day, data)
    return file.first_day, file.n_days
