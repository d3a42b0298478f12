"""Daily SMB inference over a glacier's study period, streamed year by year.

The state (SWE or GRU hidden state) is spun up over 1990–1994 and carried through the study
years; each study year is run in the series regime and its days are placed on the calendar.
Days covered by two periods (the midseason day, a shared year boundary) hold the sum of both
half-weighted values. Only about one year of daily fields is in memory at a time: the NetCDF
writer buffers one block of file chunks (at most MAP_VALUES values). The glaciers of a training
batch (``core.execute.sets``) can run as one vmapped computation, each written to its own file
(:func:`write_daily_smb_batch`), and the batches of a glacier set on several devices at once
(:func:`write_daily_smb_batches`; the files are written from one thread).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Iterator, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from core.execute.compiles import announce_compile, claim_compile, progress_note
from core.execute.sets import whole_classes
from core.infer.calendar import Calendar
from core.infer.netcdf import BatchFiles
from glaunti.glacier import initial_state, walk_years, year_step
from glaunti.layouts import GlacierArrays, GlacierBatch


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


def year_series(model, arrays: GlacierArrays, n_years: int, describe: str, verbose: bool = True
                ) -> Iterator[tuple[int, np.ndarray]]:
    """``(k, daily SMB of year k)`` for the study years ``k < n_years`` of one glacier (series
    (L, H, W)) or of a stacked batch (arrays with a leading glacier axis: series (B, L, H, W),
    one vmapped computation): the state spun up over the spin-up years, then carried year by
    year. The first call of a new shape says that it compiles (``verbose``)."""
    batched = arrays.day_valid.ndim == 3
    t0 = _announce(model, arrays, describe, verbose)
    state = (_spun_up_batch if batched else _spun_up)(model, arrays)
    step = _series_step_batch if batched else _series_step
    for k in range(arrays.n_spinup, n_years):
        state, series = step(model, arrays, jnp.int32(k), state)  # traced k: one compile
        series = np.asarray(series)
        if t0 is not None:
            progress_note(f"  compiled and ran its first year in {time.perf_counter() - t0:.1f} s")
            t0 = None
        yield k, series


def iter_daily_smb(model, arrays: GlacierArrays, tensors, verbose: bool = True
                   ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_day, smb)`` chunks of consecutive calendar days covering the study period;
    ``smb`` is (n, H, W) float32 m w.e. per day, ``first_day`` a climate-day index."""
    height, width = arrays.shape
    calendar = Calendar(tensors)
    for k, series in year_series(model, arrays, len(tensors.years), f"{height}×{width}", verbose):
        yield from calendar.add(k, series)
    yield from calendar.finish()


def batch_series(model, batch: GlacierBatch, tensors: Sequence, verbose: bool = True
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """``(k, daily SMB (B, L, H, W) of year k)`` of a stacked batch (``core.execute.sets``:
    grids padded to the batch's, years and days to its buckets) on the batch's device
    (:func:`year_series`; a batch of one runs without vmap: the same numbers, cheaper on a
    CPU). ``tensors`` follow the batch's glaciers."""
    size = batch.size
    if len(tensors) != size:
        raise ValueError(f"a batch of {size} glaciers needs as many tensors, got {len(tensors)}")
    height, width = batch.grid
    describe = f"{height}×{width}, {size} glacier{'s' if size > 1 else ''}"
    arrays = batch.arrays if size > 1 else jax.tree_util.tree_map(lambda a: a[0], batch.arrays)
    for k, series in year_series(model, arrays, max(len(t.years) for t in tensors), describe, verbose):
        yield k, (series if size > 1 else series[None])


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
    (``core.execute.sets.whole_classes``). One pass does not pay for a class's second compile
    (compiles side by side do not finish sooner either: the demo twin's 4 test glaciers of one
    shape with model C took 14.9 s on one CPU device, 26.2 s split over two)."""
    return whole_classes(batches, n_devices)


class _Stopped(Exception):
    """A device thread was told to stop (another thread failed)."""


def write_daily_smb_batches(model, glacier_set, paths: Sequence, model_name: str, written=None,
                            devices=None, verbose: bool = True) -> None:
    """:func:`write_daily_smb_batch` for every batch of ``glacier_set`` (``core.execute.sets.GlacierSet``;
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
