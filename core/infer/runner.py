"""Daily SMB inference over a glacier's study period, streamed year by year.

The state (SWE or GRU hidden state) is spun up over 1990–1994 and carried through the study
years; each study year is run in the series regime and its days are placed on the calendar.
Days covered by two periods (the midseason day, a shared year boundary) hold the sum of both
half-weighted values. Only about one year of daily fields is in memory at a time: the NetCDF
writer buffers one block of file chunks (at most MAP_VALUES values). The glaciers of a training
batch (``core.execute.sets``) can run as one vmapped computation, each written to its own file
(:func:`write_daily_smb_batch`), and the batches of a glacier set on several devices at once
(:func:`run_batches`, into files or any other consumer fed from one thread).
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
from glaunti.glacier import initial_state, masked_mean, walk_years, year_step
from glaunti.layouts import GlacierArrays, GlacierBatch


def _spin_up(model, arrays):
    """The state after the spin-up years, from the cold start (the engine's year walk)."""
    state = initial_state(model, arrays)
    if arrays.n_spinup:
        state = walk_years(model, arrays, state, 0, arrays.n_spinup - 1)[0]
    return state


def _series(model, arrays, k, state, terms=False):
    """Year k's daily SMB (L, H, W) and, with ``terms``, its glacier-wide day terms (L, 3): the
    outline-weighted means over the year's outlines (the reduction runs on the device, so only
    the means come back)."""
    state, _, _, out = year_step(model, arrays, k, state, series=True, terms=terms)
    if not terms:
        return state, (out, None)
    series, day_terms = out
    return state, (series, masked_mean(day_terms, arrays.outlines[k][None]))


_spun_up = eqx.filter_jit(_spin_up)
_series_step = eqx.filter_jit(_series)


@eqx.filter_jit
def _spun_up_batch(model, arrays):
    """:func:`_spin_up` of every glacier of a stacked batch (leading axis)."""
    return jax.vmap(lambda a: _spin_up(model, a))(arrays)


@eqx.filter_jit
def _series_step_batch(model, arrays, k, state, terms=False):
    """Year ``k`` of every glacier of a stacked batch: (states, (series (B, T, H, W), terms
    (B, T, 3) or None))."""
    return jax.vmap(lambda a, s: _series(model, a, k, s, terms))(arrays, state)


def _announce(model, arrays, describe: str, verbose: bool) -> float | None:
    """Note a new inference shape and, ``verbose``, say that it compiles; the start time or None."""
    shapes = tuple(np.shape(x) for x in jax.tree_util.tree_leaves(arrays))
    first, ready = claim_compile(("inference", type(model), shapes))
    ready.set()  # no device waits for an inference compile
    if not first:
        return None
    return announce_compile(f"model {getattr(model, 'kind', '?')} inference", describe) if verbose else None


def year_series(model, arrays: GlacierArrays, n_years: int, describe: str, verbose: bool = True,
                terms: bool = False) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """``(k, daily SMB of year k, its glacier-wide day terms or None)`` for the study years
    ``k < n_years`` of one glacier (series (L, H, W), terms (L, 3)) or of a stacked batch (arrays
    with a leading glacier axis: (B, L, H, W) and (B, L, 3), one vmapped computation): the state
    spun up over the spin-up years, then carried year by year. ``terms``: the model's ``TERMS``
    (``glaunti.ti_model.TERMS``). The first call of a new shape says that it compiles
    (``verbose``)."""
    batched = arrays.day_valid.ndim == 3
    t0 = _announce(model, arrays, describe, verbose)
    state = (_spun_up_batch if batched else _spun_up)(model, arrays)
    step = _series_step_batch if batched else _series_step
    for k in range(arrays.n_spinup, n_years):
        state, (series, day_terms) = step(model, arrays, jnp.int32(k), state, terms)  # traced k: one compile
        series = np.asarray(series)
        day_terms = None if day_terms is None else np.asarray(day_terms)
        if t0 is not None:
            progress_note(f"  compiled and ran its first year in {time.perf_counter() - t0:.1f} s")
            t0 = None
        yield k, series, day_terms


def iter_daily_smb(model, arrays: GlacierArrays, tensors, verbose: bool = True
                   ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_day, smb)`` chunks of consecutive calendar days covering the study period;
    ``smb`` is (n, H, W) float32 m w.e. per day, ``first_day`` a climate-day index."""
    height, width = arrays.shape
    calendar = Calendar(tensors)
    for k, series, _ in year_series(model, arrays, len(tensors.years), f"{height}×{width}", verbose):
        yield from calendar.add(k, series)
    yield from calendar.finish()


def batch_series(model, batch: GlacierBatch, tensors: Sequence, verbose: bool = True, terms: bool = False
                 ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """``(k, daily SMB (B, L, H, W) of year k, glacier-wide day terms (B, L, 3) or None)`` of a
    stacked batch (``core.execute.sets``: grids padded to the batch's, years and days to its
    buckets) on the batch's device (:func:`year_series`; a batch of one runs without vmap: the
    same numbers, cheaper on a CPU). ``tensors`` follow the batch's glaciers."""
    size = batch.size
    if len(tensors) != size:
        raise ValueError(f"a batch of {size} glaciers needs as many tensors, got {len(tensors)}")
    height, width = batch.grid
    describe = f"{height}×{width}, {size} glacier{'s' if size > 1 else ''}"
    arrays = batch.arrays if size > 1 else jax.tree_util.tree_map(lambda a: a[0], batch.arrays)
    for k, series, day_terms in year_series(model, arrays, max(len(t.years) for t in tensors), describe,
                                            verbose, terms):
        if size == 1:
            series, day_terms = series[None], None if day_terms is None else day_terms[None]
        yield k, series, day_terms


def run_batch(model, batch: GlacierBatch, tensors: Sequence, sink, verbose: bool = True):
    """Feed a stacked batch's years (:func:`batch_series`, with the day terms of a model that
    has them) into ``sink``, a context manager with ``add(k, series, terms)`` (``BatchFiles``,
    or any consumer of the daily SMB): committed when it closes without an error. Returns it."""
    with sink:
        for k, series, day_terms in batch_series(model, batch, tensors, verbose, bool(model.TERMS)):
            sink.add(k, series, day_terms)
    return sink


def write_daily_smb_batch(model, batch: GlacierBatch, tensors: Sequence, paths: Sequence, model_name: str,
                          verbose: bool = True) -> list[tuple[int, int]]:
    """The daily SMB NetCDF files of the glaciers of one stacked batch (:func:`run_batch` into
    :class:`BatchFiles`), with the glacier-wide day terms of a model that has them: all or none
    are written. Returns (first_day, number of days) per file."""
    return run_batch(model, batch, tensors, BatchFiles(tensors, paths, model_name, model.TERMS), verbose).spans


def inference_devices(batches: Sequence, n_devices: int) -> list[int]:
    """The local device (index) of each batch of an inference: whole shape classes
    (``core.execute.sets.whole_classes``). One pass does not pay for a class's second compile
    (compiles side by side do not finish sooner either: the demo twin's 4 test glaciers of one
    shape with model C took 14.9 s on one CPU device, 26.2 s split over two)."""
    return whole_classes(batches, n_devices)


class _Stopped(Exception):
    """A device thread was told to stop (another thread failed)."""


def run_batches(model, glacier_set, open_sink, done=None, devices=None, verbose: bool = True) -> None:
    """:func:`run_batch` for every batch of ``glacier_set`` (``core.execute.sets.GlacierSet``)
    into ``open_sink(batch, tensors)`` (a context manager, e.g. :class:`BatchFiles`), the
    batches spread over the local ``devices`` by shape class (:func:`inference_devices`). One
    thread per device computes; this thread feeds every sink, because NetCDF/HDF5 is not safe
    from several threads. At most two years per device wait to be consumed. ``done(batch,
    tensors)`` is called (here) once a batch's sink is committed. A failure stops every device
    and closes every unfinished sink with the error (no half file is left)."""
    devices = list(jax.local_devices() if devices is None else devices)
    plan = glacier_set.batches()

    def glacier_tensors(batch):
        return [glacier_set.dataset.glacier(glacier_set.names[i]) for i in batch.indices]

    if len(devices) <= 1 or len(plan) <= 1:
        for _, batch, arrays in glacier_set.iter_batches([(b, None) for b in range(len(plan))]):
            tensors = glacier_tensors(batch)
            run_batch(model, arrays, tensors, open_sink(batch, tensors), verbose)
            if done is not None:
                done(batch, tensors)
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
                    for piece in batch_series(model, arrays, tensors, verbose, bool(model.TERMS)):
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
    sinks: dict[int, tuple[object, object, list]] = {}
    try:
        running = len(threads)
        while running:
            kind, b, payload = pieces.get()
            if kind == "start":
                batch, tensors = payload
                sink = open_sink(batch, tensors)
                sink.__enter__()
                sinks[b] = (sink, batch, tensors)
            elif kind == "year":
                sinks[b][0].add(*payload)
            elif kind == "end":
                sink, batch, tensors = sinks.pop(b)
                sink.__exit__(None, None, None)
                if done is not None:
                    done(batch, tensors)
            elif kind == "error":
                raise payload
            else:
                running -= 1
    except BaseException as err:
        stop.set()
        for sink, _, _ in sinks.values():
            with contextlib.suppress(Exception):
                sink.__exit__(type(err), err, err.__traceback__)
        raise
    finally:
        stop.set()
        for thread in threads:
            thread.join()
