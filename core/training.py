"""Full-batch calibration of models A–D (MODEL.md §7) with checkpoint/resume.

One optimiser step per epoch on the sum of the per-glacier gradients over all training glaciers
(global-norm clipping at 5, then Adam). Validation loss (mean data loss over validation glaciers)
is computed before the first step and after every step; the best epoch's parameters are kept.
Each glacier's loss and gradient come from one compiled function (spin-up and all study years),
compiled once per glacier shape and reused every epoch.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from core.io import atomic_path, atomic_write_text
from core.loss import aux_to_python, glacier_loss
from core.models import trainable_filter
from glaunti.params import save_params

CLIP_NORM = 5.0
LOG_COLUMNS = ["timestamp", "epoch", "glacier", "subset", "loss", "epoch_time_s"]


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or gradient, missing inputs); names glacier and epoch."""


@dataclass
class TrainConfig:
    epochs: int = 50
    learning_rate: float = 1e-3
    params_path: Path = Path("params/a.eqx")
    log_path: Path = Path("logs/a.csv")
    resume: bool = False
    checkpoint: bool = True
    show_progress: bool = True


def make_optimiser(learning_rate: float):
    return optax.chain(optax.clip_by_global_norm(CLIP_NORM), optax.adam(learning_rate))


def _loss(trainable, static, arrays):
    return glacier_loss(eqx.combine(trainable, static), arrays)


# Module-level compiled functions: their caches persist across epochs and across runs in one
# process, so a glacier shape compiles once.
loss_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(_loss, has_aux=True))
loss_only = eqx.filter_jit(_loss)


def make_loss_and_grad():
    """The compiled ``(trainable, static, arrays) -> ((loss, terms), grad)`` and
    ``(trainable, static, arrays) -> (loss, terms)``."""
    return loss_and_grad, loss_only


@dataclass
class Checkpoint:
    """What a resumed run needs: the current and best parameters, optimiser state, counters."""

    trainable: object
    best_trainable: object
    opt_state: object
    epoch: int
    best_epoch: int
    best_val: float

    def save(self, path: Path) -> None:
        tree = (self.trainable, self.best_trainable, self.opt_state,
                np.int64(self.epoch), np.int64(self.best_epoch), np.float64(self.best_val))
        with atomic_path(path) as tmp:
            eqx.tree_serialise_leaves(tmp, tree)

    @classmethod
    def load(cls, path: Path, like: "Checkpoint") -> "Checkpoint":
        template = (like.trainable, like.best_trainable, like.opt_state,
                    np.int64(0), np.int64(0), np.float64(0.0))
        try:
            t, b, o, e, be, bv = eqx.tree_deserialise_leaves(path, template)
        except Exception as err:  # a truncated or foreign file
            raise TrainingError(f"{path}: cannot read training checkpoint ({err}); delete it or run without --resume") from None
        return cls(t, b, o, int(e), int(be), float(bv))


def checkpoint_path(params_path: Path) -> Path:
    return Path(str(params_path) + ".ckpt")


class Log:
    """The per-glacier, per-epoch CSV log, rewritten atomically after every epoch."""

    def __init__(self, path: Path, resume_epoch: int | None):
        self.path = Path(path)
        self.rows: list[dict] = []
        self.columns = list(LOG_COLUMNS)
        if resume_epoch is not None and self.path.exists():
            with open(self.path, newline="") as f:
                for row in csv.DictReader(f):
                    if int(row["epoch"]) <= resume_epoch:
                        self.add(row)

    def add(self, row: dict) -> None:
        for key in row:
            if key not in self.columns:
                self.columns.append(key)
        self.rows.append(row)

    def flush(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())


def _check_finite(value, what: str, glacier: str, epoch: int) -> None:
    if not np.all(np.isfinite(value)):
        raise TrainingError(
            f"non-finite {what} for glacier '{glacier}' at epoch {epoch}; "
            "the last good parameters are kept in the params file"
        )


def _tree_add(a, b):
    return b if a is None else jax.tree_util.tree_map(jnp.add, a, b)


def train(
    model,
    train_set: Callable[[], Iterable[tuple[str, object]]],
    val_set: Callable[[], Iterable[tuple[str, object]]],
    config: TrainConfig,
):
    """Calibrate ``model`` and return the best one with the final training state.

    Args:
        model: the initial model (A, B, C or D).
        train_set, val_set: called once per epoch, each yields ``(glacier name, GlacierArrays)``
            one glacier at a time.
    """
    filter_spec = trainable_filter(model)
    trainable, static = eqx.partition(model, filter_spec)
    optimiser = make_optimiser(config.learning_rate)
    value_and_grad, value = make_loss_and_grad()

    state = Checkpoint(trainable, trainable, optimiser.init(trainable), 0, 0, math.inf)
    ckpt = checkpoint_path(config.params_path)
    resumed = config.resume and ckpt.exists()
    if resumed:
        state = Checkpoint.load(ckpt, state)
    log = Log(config.log_path, state.epoch if resumed else None)

    def validate(trainable, epoch, t0):
        losses = []
        for name, arrays in val_set():
            loss, terms = value(trainable, static, arrays)
            terms = aux_to_python(terms)
            _check_finite(terms["data_loss"], "validation loss", name, epoch)
            losses.append(terms["data_loss"])
            log.add(_row(epoch, name, "val", float(loss), terms, time.perf_counter() - t0))
        if not losses:
            raise TrainingError("no validation glaciers: the validation set is empty")
        return float(np.mean(losses))

    if not resumed:
        t0 = time.perf_counter()
        state.best_val = validate(state.trainable, 0, t0)
        state.best_epoch = 0
        save_params(eqx.combine(state.best_trainable, static), config.params_path)
        log.flush()
        if config.checkpoint:
            state.save(ckpt)

    bar = tqdm(range(state.epoch + 1, config.epochs + 1), desc=f"training {config.params_path.stem}",
               disable=not config.show_progress, initial=state.epoch, total=config.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        grads, train_losses = None, []
        for name, arrays in train_set():
            (loss, terms), grad = value_and_grad(state.trainable, static, arrays)
            terms = aux_to_python(terms)
            _check_finite(float(loss), "training loss", name, epoch)
            _check_finite(np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grad)]),
                          "gradient", name, epoch)
            grads = _tree_add(grads, grad)
            train_losses.append(float(loss))
            log.add(_row(epoch, name, "train", float(loss), terms, None))
        if grads is None:
            raise TrainingError("no training glaciers: the training set is empty")
        updates, opt_state = optimiser.update(grads, state.opt_state, state.trainable)
        state.trainable = eqx.apply_updates(state.trainable, updates)
        state.opt_state = opt_state
        val = validate(state.trainable, epoch, t0)
        state.epoch = epoch
        if val < state.best_val:
            state.best_val, state.best_epoch, state.best_trainable = val, epoch, state.trainable
            save_params(eqx.combine(state.best_trainable, static), config.params_path)
        elapsed = time.perf_counter() - t0
        for row in log.rows:
            if row["epoch"] == epoch and row["epoch_time_s"] in (None, ""):
                row["epoch_time_s"] = f"{elapsed:.3f}"
        log.flush()
        if config.checkpoint:
            state.save(ckpt)
        bar.set_postfix(train=f"{np.sum(train_losses):.4f}", val=f"{val:.4f}",
                        best=f"{state.best_val:.4f}@{state.best_epoch}", s=f"{elapsed:.2f}")
    return eqx.combine(state.best_trainable, static), state


def _row(epoch, glacier, subset, loss, terms, elapsed):
    row = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "epoch": epoch,
        "glacier": glacier,
        "subset": subset,
        "loss": loss,
        "epoch_time_s": "" if elapsed is None else f"{elapsed:.3f}",
    }
    row.update({k: ("" if v is None else v) for k, v in terms.items()})
    return row
