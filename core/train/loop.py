"""Full-batch calibration of models A–D (docs/model.md §7): the training loop.

One optimiser step per epoch on the sum of the per-glacier gradients over all training glaciers
(global-norm clipping at 5, then Adam). The validation loss (mean data loss over the validation
glaciers) follows one of two published rules (``TrainConfig.validation``):

- ``"rerun"`` (calibration, train_*.py): the parameters before the first step (epoch 0) and
  after every step are run over all years of the validation glaciers; the best are kept.
- ``"carried"`` (fine-tuning, finetune.py: validation years of the training glacier): the
  validation years continue epoch e's training pass. The state at the end of the last training
  year comes from that pass (the parameters before step e); from there the parameters after
  step e run the validation years. There is no epoch-0 candidate; when the loss improves, the
  parameters after step e are kept.

The glaciers of a ``core.execute.sets.GlacierSet`` run in batches: glaciers of one shape bucket of the
training layouts (``glaunti.layouts``), stacked and run as one vmapped computation
(``core.train.loss.batch_loss``: spin-up and all study years, each glacier's loss and terms, the
gradient of their sum), as many per batch as a memory budget allows. One compiled function per
batch shape, reused every epoch; its first call says that it compiles. Other sets (fine-tuning's
single glacier) run glacier by glacier.

Batches are spread over every local device (``core.execute.sets.assign_devices``: a shape compiles
once per device it runs on, except that CPU devices load each other's compiles from the
persistent cache, ``core.execute.distributed.share_cpu_executables``) and, with ``jax.distributed``, over processes
(``core.execute.distributed``): each batch's losses and gradient are computed on its device, JAX's
asynchronous dispatch keeps the devices busy concurrently, and the batch gradients are summed
on the host in the fixed batch order. Batches depend only on the glaciers and the memory budget,
so the result is bit-identical whatever the number of devices or processes. Only process 0
writes params, checkpoints (``core.train.checkpoint``) and logs (``core.train.log``).

On several CPU devices of one process, epoch e's validation runs in a background thread, on the
devices after the training batches', while epoch e+1's gradient is computed: both need only the
parameters after step e, and with few large glaciers the gradient alone leaves cores idle.
Epochs are closed (log, best parameters, checkpoint) in order, so nothing else changes.
"""

from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from core.execute import distributed
from core.execute.compiles import announce_compile, claim_compile, compiled_signatures, progress_note
from core.execute.sets import GlacierList, Glaciers, compile_owners
from core.models import LEARNING_RATE, log_path, params_path, save_model
from core.train.checkpoint import Checkpoint, CheckpointError, checkpoint_path
from core.train.log import Log, log_row
from core.train.loss import aux_to_python, batch_loss, glacier_loss
from glaunti.glacier import run_glacier
from glaunti.layouts import GlacierBatch

__all__ = ["CLIP_NORM", "VALIDATION_RULES", "Evaluation", "GlacierResult", "TrainConfig", "TrainingError",
           "epoch_gradient", "evaluate_glaciers", "loss_and_grad", "loss_only", "make_optimiser",
           "overlaps_validation", "sum_gradients", "train"]

CLIP_NORM = 5.0


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or gradient, missing inputs); names glacier and epoch."""


@dataclass
class TrainConfig:
    epochs: int = 50
    learning_rate: float = LEARNING_RATE
    params_path: Path = params_path("a")
    log_path: Path = log_path("a")
    resume: bool = False
    checkpoint: bool = True
    show_progress: bool = True
    validation: str = "rerun"  # or "carried": see the module docstring
    # Run epoch e's validation while epoch e+1's gradient is computed; None = where it pays
    # (``overlaps_validation``). The same numbers either way.
    overlap_validation: bool | None = None


VALIDATION_RULES = ("rerun", "carried")


def make_optimiser(learning_rate: float):
    return optax.chain(optax.clip_by_global_norm(CLIP_NORM), optax.adam(learning_rate))


def _loss(trainable, static, arrays):
    """Loss of one glacier ((loss, terms)) or of a :class:`GlacierBatch` ((Σ loss, (losses,
    terms))). The TI day step's hand-written VJP (glaunti.ti_model.ti_day_step_vjp): same
    forward values, about a quarter less work in the backward pass."""
    model = eqx.combine(trainable, static)
    if isinstance(arrays, GlacierBatch):
        return batch_loss(model, arrays, custom_vjp=True)
    return glacier_loss(model, arrays, custom_vjp=True)


def _carried_loss(trainables, static, inputs):
    """The "carried" validation loss of one glacier: ``trainables`` = (before, after) the step,
    ``inputs`` = (index of the last training year, the glacier's validation arrays).

    Years up to the last training year are run with the parameters before the step (the training
    pass's state), the later ones with those after it; a year is left out of a run by marking
    its days invalid, which leaves the state untouched and adds no balance.
    """
    before, after = trainables
    last_train_year, arrays = inputs
    up_to = (jnp.arange(arrays.n_years) <= last_train_year)[:, None]
    handover = run_glacier(eqx.combine(before, static),
                           eqx.tree_at(lambda a: a.day_valid, arrays, arrays.day_valid & up_to)).state
    rest = eqx.tree_at(lambda a: a.day_valid, arrays, arrays.day_valid & ~up_to)
    return glacier_loss(eqx.combine(after, static), rest, state=handover)


# Module-level compiled functions: their caches persist across epochs and across runs in one
# process, so a glacier shape compiles once. ``(trainable, static, arrays) -> ((loss, terms),
# grad)`` and ``-> (loss, terms)``; for a GlacierBatch the value is the batch's summed loss and
# ``terms`` is ``(losses (B,), terms {name: (B,)})``.
loss_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(_loss, has_aux=True))
loss_only = eqx.filter_jit(_loss)
carried_loss = eqx.filter_jit(_carried_loss)


def last_training_years(train_set, val_set) -> dict[str, int]:
    """Per validation glacier, the index of its last scored training year (for "carried").

    Raises TrainingError when a validation glacier is not a training glacier or has validation
    years that do not come after its training years (nothing could be carried into them)."""
    last = {}
    for name, arrays in train_set:
        study = np.flatnonzero(np.asarray(arrays.study))
        if study.size:
            last[name] = int(study[-1])
    for name, arrays in val_set:
        if name not in last:
            raise TrainingError(f"validation glacier '{name}' has no training years: the "
                                "'carried' rule continues a glacier's own training pass")
        first_val = np.flatnonzero(np.asarray(arrays.study))
        if first_val.size and first_val[0] <= last[name]:
            raise TrainingError(f"glacier '{name}': the validation years must come after the "
                                "training years for the 'carried' rule")
    return last


def overlaps_validation(placement: distributed.Placement) -> bool:
    """Whether validation should run beside the next epoch's gradient: on several CPU devices
    of one process, where the gradient of few glaciers leaves cores idle. Not on an
    accelerator, where both would share one device's memory budget (``core.execute.sets``) for little
    gain, nor across processes, whose gathers must come in the same order everywhere."""
    return (placement.n_processes == 1 and len(placement.devices) > 1
            and all(d.platform == "cpu" for d in placement.devices))


def _check_finite(value, what: str, glacier: str, epoch: int) -> None:
    if not np.all(np.isfinite(value)):
        raise TrainingError(
            f"non-finite {what} for glacier '{glacier}' at epoch {epoch}; "
            "the last good parameters are kept in the params file"
        )


class GlacierResult:
    """One glacier's loss and its terms (python numbers)."""

    __slots__ = ("index", "name", "loss", "terms")

    def __init__(self, index, name, loss, terms):
        self.index, self.name, self.loss, self.terms = index, name, loss, terms


class Evaluation(NamedTuple):
    """What :func:`evaluate_glaciers` returns: per-glacier results in glacier order; per work
    item (a batch, or one glacier), in item order, its glaciers' indices, its value (the summed
    loss of a batch) and flattened gradient (None without gradient); the gradient's tree
    structure."""

    results: list[GlacierResult]
    grads: list[tuple[tuple[int, ...], float, np.ndarray | None]]
    treedef: object


def evaluate_glaciers(fn, trainable, static, glacier_set, with_grad: bool,
                      placement: distributed.Placement | None = None, window: int = 2,
                      verbose: bool = True) -> Evaluation:
    """Loss (and gradient) of every glacier of ``glacier_set`` in its fixed order.

    ``fn`` is the compiled ``(trainable, static, arrays) -> ((value, aux), grad)`` (``with_grad``)
    or ``-> (value, aux)`` (:data:`loss_and_grad`, :data:`loss_only`). ``glacier_set`` is a
    ``core.execute.sets.Glaciers``: a ``GlacierSet`` runs batch by batch (``aux`` = (losses,
    terms)), a ``GlacierList`` glacier by glacier (``aux`` = terms). Work item ``j`` (batch or
    glacier) runs on the device ``placement`` gives index ``j``; every local device is driven by its own thread (XLA
    releases the GIL while it computes, so devices — CPU devices included — run concurrently),
    with at most ``window`` items in flight per device. Results of other processes are
    gathered. The first call of a new compiled shape is announced (``verbose``, process 0).
    """
    placement = placement or distributed.Placement()
    if placement.assignment is None:
        assignment = glacier_set.device_indices(len(placement.devices))
        if assignment is not None:
            placement = placement.assigned(assignment)
    names, work = list(glacier_set.names), glacier_set.items()
    items = [w.indices for w in work]
    local: dict[int, tuple] = {}
    treedefs = []
    largest = max((len(ix) for ix in items), default=1)
    what = f"model {getattr(static, 'kind', '?')} {'gradient' if with_grad else 'loss'}"
    announce = verbose and distributed.is_main_process()
    counter = {"new": 0, "total": 0}

    def run_device(device, indices):
        replica = jax.device_put((trainable, static), device)
        pending: deque = deque()

        def finish():
            j, out = pending.popleft()
            value = out[0][0] if with_grad else out[0]
            if with_grad:
                (_, aux), grad = out
                leaves, treedef = jax.tree_util.tree_flatten(grad)
                treedefs.append(treedef)
                flat = np.concatenate([np.ravel(np.asarray(g, np.float32)) for g in leaves]) if leaves \
                    else np.zeros(0, np.float32)
            else:
                _, aux = out
                flat = np.zeros(0, np.float32)
            losses, terms = aux if isinstance(aux, tuple) else (value, aux)
            keys = list(terms)  # insertion order of the loss: the log's column order
            n = len(items[j])
            per = np.zeros((largest, 1 + len(keys)), np.float32)
            per[:n] = np.stack([np.asarray(losses, np.float32).reshape(n)]
                               + [np.asarray(terms[k], np.float32).reshape(n) for k in keys], axis=1)
            local[j] = (keys, np.concatenate([np.asarray(value, np.float32).reshape(1), per.ravel(), flat]))

        def dispatch(j, first, ready, describe, arrays):
            if not first:
                pending.append((j, fn(*replica, arrays)))  # asynchronous dispatch
            else:
                counter["new"] += 1
                t0 = announce_compile(what, describe, counter["new"], counter["total"]) if announce else None
                try:
                    pending.append((j, fn(*replica, arrays)))  # traces and compiles, then dispatches
                finally:
                    ready.set()
                if t0 is not None:
                    progress_note(f"  compiled in {time.perf_counter() - t0:.1f} s")
            while len(pending) >= window:
                finish()

        # A shape another device is compiling waits until the end of this device's list: by
        # then its executable is in the persistent cache and loads instead of compiling again
        # (the gradients are summed in item order, so the order of computing does not matter).
        # Shapes that another device is to compile go last from the start.
        indices = sorted(indices, key=lambda j: compiler.get(j, device) != device)
        deferred = []
        for j, arrays in glacier_set.load([(j, device) for j in indices]):
            signature, describe = work[j].signature, work[j].describe
            first, ready = claim_compile((id(fn), type(static), signature))
            if share and not first and not ready.is_set():
                deferred.append((j, ready, describe, arrays))
            else:
                dispatch(j, first, ready, describe, arrays)
            del arrays
        for j, ready, describe, arrays in deferred:
            ready.wait()
            dispatch(j, False, ready, describe, arrays)
        deferred.clear()
        while pending:
            finish()

    by_device: dict = {}
    for j in placement.local_indices(len(items)):
        by_device.setdefault(placement.device(j), []).append(j)
    counter["total"] = _new_signatures(work, fn, static, by_device)
    # CPU devices only: a deferred item holds its arrays until the end, which an accelerator's
    # memory budget does not allow for.
    share = (len(by_device) > 1 and distributed.executables_shared()
             and all(getattr(d, "platform", "cpu") == "cpu" for d in by_device))
    compiler = _compiling_devices(work, fn, static, by_device) if share else {}
    if not by_device and items:
        # This process owns no work item (more processes than items): it computes item 0
        # once, only to learn the layout of the gathered rows, and contributes nothing.
        run_device(placement.devices[0], [0])
        layout_row = local.pop(0)
    else:
        layout_row = None
        if len(by_device) == 1:
            run_device(*next(iter(by_device.items())))
        else:
            with ThreadPoolExecutor(len(by_device)) as pool:
                for future in [pool.submit(run_device, d, idx) for d, idx in by_device.items()]:
                    future.result()
    treedef = treedefs[0] if treedefs else None

    if not local and layout_row is None:
        return Evaluation([], [], treedef)
    keys, first_row = local[min(local)] if local else layout_row
    if placement.n_processes > 1:
        rows = distributed.gather_rows({j: r for j, (_, r) in local.items()}, len(items), len(first_row),
                                       placement)
    else:
        rows = [local[j][1] for j in range(len(items))]
    width = 1 + len(keys)
    per_glacier: dict[int, np.ndarray] = {}
    grads = []
    for j, indices in enumerate(items):
        row = np.asarray(rows[j], np.float32)
        per = row[1:1 + largest * width].reshape(largest, width)
        for position, i in enumerate(indices):
            per_glacier[i] = per[position]
        grads.append((indices, float(row[0]), row[1 + largest * width:] if with_grad else None))
    results = [GlacierResult(i, name, float(per_glacier[i][0]),
                             aux_to_python(dict(zip(keys, per_glacier[i][1:]))))
               for i, name in enumerate(names)]
    return Evaluation(results, grads, treedef)


def _new_signatures(work, fn, static, by_device) -> int:
    """How many of this process's work items will compile anew."""
    mine = [j for indices in by_device.values() for j in indices]
    return len({work[j].signature for j in mine} - compiled_signatures(fn, static))


def _compiling_devices(work, fn, static, by_device) -> dict:
    """Work item → the device that compiles its new shape (:func:`core.execute.sets.compile_owners`)."""
    return compile_owners([w.signature for w in work], by_device, compiled_signatures(fn, static))


def sum_gradients(grads, treedef, trainable):
    """Σ of the work items' flattened gradients in item order (numpy float32), as a tree."""
    total = None
    for _, _, grad in grads:
        total = grad.copy() if total is None else total + grad
    leaves = jax.tree_util.tree_leaves(trainable)
    out, offset = [], 0
    for leaf in leaves:
        size = int(np.size(leaf))
        out.append(jnp.asarray(total[offset:offset + size].reshape(np.shape(leaf)), jnp.float32))
        offset += size
    return jax.tree_util.tree_unflatten(treedef, out)


def epoch_gradient(value_and_grad, trainable, static, train_set, placement=None, epoch: int = 0,
                   verbose: bool = True):
    """The summed gradient of one epoch and the per-glacier results (raises on non-finite)."""
    results, grads, treedef = evaluate_glaciers(value_and_grad, trainable, static, train_set, True, placement,
                                                verbose=verbose)
    if not results:
        raise TrainingError("no training glaciers: the training set is empty")
    for r in results:
        _check_finite(r.loss, "training loss", r.name, epoch)
    for indices, value, grad in grads:
        names = "', '".join(results[i].name for i in indices)
        _check_finite(value, "training loss", names, epoch)
        _check_finite(grad, "gradient", names, epoch)
    return sum_gradients(grads, treedef, trainable), results


def train(model, train_set: Glaciers, val_set: Glaciers, config: TrainConfig):
    """Calibrate ``model`` and return the best one with the final training state.

    Args:
        model: the initial model (A, B, C or D).
        train_set, val_set: the training and validation glaciers (``core.execute.sets.Glaciers``:
            a ``GlacierSet`` of a dataset's glaciers, or a ``GlacierList`` of arrays; "carried"
            validation iterates both as ``(name, arrays)``, so it takes ``GlacierList`` s). Each
            process loads only its own work items, directly onto their devices.
    """
    if config.validation not in VALIDATION_RULES:
        raise ValueError(f"unknown validation rule {config.validation!r}; expected one of "
                         f"{', '.join(VALIDATION_RULES)}")
    carried = config.validation == "carried"
    filter_spec = model.trainable_filter()
    trainable, static = eqx.partition(model, filter_spec)
    optimiser = make_optimiser(config.learning_rate)
    value_and_grad, value = loss_and_grad, loss_only
    placement = distributed.Placement()
    main = distributed.is_main_process()

    state = Checkpoint(trainable, trainable, optimiser.init(trainable), 0, 0, math.inf)
    ckpt = checkpoint_path(config.params_path)
    resumed = config.resume and ckpt.exists()
    if resumed:
        try:
            state = Checkpoint.load(ckpt, state)
        except CheckpointError as err:
            raise TrainingError(str(err)) from None
    log = Log(config.log_path, state.epoch if resumed else None)
    handover = last_training_years(train_set, val_set) if carried else None

    def validate(trainable, epoch, t0=None, before=None, where=placement):
        """Mean validation data loss of ``trainable`` ("carried": continuing ``before``'s pass);
        its log rows take the time since ``t0`` (None: the epoch's time, set when it closes)."""
        if carried:
            pairs = GlacierList([(name, (np.int32(handover[name]), arrays)) for name, arrays in val_set])
            results = evaluate_glaciers(carried_loss, (before, trainable), static, pairs, False,
                                        where, verbose=config.show_progress).results
        else:
            results = evaluate_glaciers(value, trainable, static, val_set, False, where,
                                        verbose=config.show_progress).results
        losses = []
        for r in results:
            _check_finite(r.terms["data_loss"], "validation loss", r.name, epoch)
            losses.append(r.terms["data_loss"])
            log.add(log_row(epoch, r.name, "val", r.loss, r.terms, None if t0 is None else time.perf_counter() - t0))
        if not losses:
            raise TrainingError("no validation glaciers: the validation set is empty")
        return float(np.mean(losses))

    # Epoch e's validation needs only the parameters after step e, and so does epoch e+1's
    # gradient: where it pays (``overlaps_validation``) the validation runs in a background
    # thread, on the devices the gradient leaves idle, while the next gradient is computed.
    # Epoch e is closed (log, best parameters, checkpoint) only after its validation, in the
    # same order as without overlap, so the results and files are the same. XLA compiles a
    # function once per device it runs on, so the epoch-0 validation runs there too.
    overlap = config.overlap_validation
    if overlap is None:
        overlap = overlaps_validation(placement)
    val_placement = placement.shifted(len(train_set.items())) if overlap else placement
    if not resumed and not carried:
        t0 = time.perf_counter()
        state.best_val = validate(state.trainable, 0, t0, where=val_placement)
        state.best_epoch = 0
        if main:
            save_model(eqx.combine(state.best_trainable, static), config.params_path)
            log.flush()
            if config.checkpoint:
                state.save(ckpt)

    pool = ThreadPoolExecutor(1, thread_name_prefix="validation") if overlap else None
    # The epoch waiting for its validation: (epoch, results, future or value, seconds so far).
    pending = None

    def close_epoch() -> float:
        """Record the pending epoch: its validation loss, best parameters, log and checkpoint.
        Returns the seconds this took (they belong to the closed epoch, not the running one)."""
        nonlocal pending
        t_close = time.perf_counter()
        epoch, results, val, own = pending
        pending = None
        val = val.result() if hasattr(val, "result") else val
        if val < state.best_val:
            state.best_val, state.best_epoch, state.best_trainable = val, epoch, state.trainable
            if main:
                save_model(eqx.combine(state.best_trainable, static), config.params_path)
        # An epoch's time is its own work: its gradient and step (``own``), plus the part of its
        # validation the next gradient did not hide (the wait above) and the saving above. So the
        # last epoch, with no next gradient, carries its whole validation, and the times of all
        # epochs add up to the loop's wall time but for the file writing below (docs/performance.md,
        # "epoch_time_s").
        elapsed = own + time.perf_counter() - t_close
        log.set_epoch_time(epoch, elapsed)
        if main:
            log.flush()
            if config.checkpoint:
                state.save(ckpt)
        bar.set_postfix(train=f"{sum(r.loss for r in results):.4f}", val=f"{val:.4f}",
                        best=f"{state.best_val:.4f}@{state.best_epoch}", s=f"{elapsed:.2f}")
        bar.update(1)
        return time.perf_counter() - t_close

    bar = tqdm(total=config.epochs, initial=state.epoch, desc=f"training {config.params_path.stem}",
               disable=not (config.show_progress and main))
    try:
        for epoch in range(state.epoch + 1, config.epochs + 1):
            started, closing = time.perf_counter(), 0.0
            grads, results = epoch_gradient(value_and_grad, state.trainable, static, train_set, placement,
                                            epoch, verbose=config.show_progress)
            if pending is not None:
                closing = close_epoch()  # the last epoch's: not this one's time
            for r in results:
                log.add(log_row(epoch, r.name, "train", r.loss, r.terms, None))
            before = state.trainable
            updates, opt_state = optimiser.update(grads, state.opt_state, state.trainable)
            state.trainable = eqx.apply_updates(state.trainable, updates)
            state.opt_state = opt_state
            state.epoch = epoch
            if pool is None:
                val = validate(state.trainable, epoch, None, before)
                pending = (epoch, results, val, time.perf_counter() - started - closing)
                close_epoch()
            else:
                val = pool.submit(validate, state.trainable, epoch, None, before, val_placement)
                pending = (epoch, results, val, time.perf_counter() - started - closing)
        if pending is not None:
            close_epoch()
    finally:
        # An error in epoch e+1's gradient still closes epoch e (its parameters are good).
        if pending is not None:
            try:
                close_epoch()
            except Exception:
                pass  # the error already on its way out is the one to report
        if pool is not None:
            pool.shutdown(wait=True)
        bar.close()
    if main and not math.isfinite(state.best_val):  # "carried" with no epoch run: keep the start
        save_model(eqx.combine(state.best_trainable, static), config.params_path)
    distributed.sync("glaunti-train-end")
    return eqx.combine(state.best_trainable, static), state

