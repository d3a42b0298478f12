"""Calibration reproduces the authors' own runs step by step (tests/reference/training/).

The fixtures are the authors' initial parameters of B and C (PRNG key 42) and their training
logs of A, B and C on the tiny dataset: an epoch-0 validation, then three epochs of one training
glacier (Synthgletscher) and one validation glacier (Syntetbreen). Our train scripts run with
default arguments must start from the same parameters and log the same losses and terms.

Fine-tuning's published validation rule (the validation years continue each epoch's training
pass) is checked against a hand computation.
"""

from __future__ import annotations

import csv
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import reference_path
from core.cli import train_main
from core.data import with_study_years
from core.loss import data_loss, data_terms
from core.models import initial_model, load_model, trainable_filter
from core.run import finetune
from core.training import make_loss_and_grad, make_optimiser
from dataloader import Dataset
from glaunti.glacier import initial_state, layout_for, make_arrays, season_fields, walk_years
from glaunti.params import authors_tree, load_params

# Float32 summation order may differ, nothing else. Terms that are squared differences of nearly
# equal numbers (A's summer glacier-wide error is ~4e-6 m²) need an absolute floor.
RTOL, ATOL = 1e-4, 1e-6
KEY = ("epoch", "glacier", "subset")


def read_log(path) -> dict[tuple, dict]:
    with open(path, newline="") as f:
        return {tuple(row[k] for k in KEY): row for row in csv.DictReader(f)}


def as_number(text: str) -> float:
    return math.nan if text == "" else float(text)


def published_a():
    return reference_path("published_params", "a.eqx")


@pytest.mark.parametrize("kind", ["b", "c"])
def test_initial_parameters_are_the_authors(kind):
    """Default seed (the authors' key 42): every leaf equal to theirs, bit for bit (C's TI
    parameters are the published A's, frozen)."""
    theirs = load_params(kind, reference_path("training", f"initial_{kind}.eqx"))
    ours = initial_model(kind, start_path=published_a() if kind == "c" else None)
    ours_leaves = jax.tree_util.tree_flatten_with_path(authors_tree(ours))[0]
    theirs_leaves = jax.tree_util.tree_leaves(authors_tree(theirs))
    assert len(ours_leaves) == len(theirs_leaves) == {"b": 7, "c": 56}[kind]
    for (path, a), b in zip(ours_leaves, theirs_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def train_three_epochs(kind, data, out):
    args = ["--data_folder", str(data), "--epochs", "3", "--params_path", str(out / f"{kind}.eqx"),
            "--log_path", str(out / f"{kind}.csv"), "--quiet"]
    if kind == "c":  # the authors' C starts from the published A
        args += ["--init_params_path", str(published_a())]
    assert train_main(kind)(args) == 0
    return read_log(out / f"{kind}.csv")


# C cannot follow the authors bit for bit past its first optimiser step, and nothing less works.
# On these tiny grids the corrector's 2-D bottleneck sees 1×1 (training glacier) and 2×1 cells
# (validation glacier): its per-channel RMS normalisation is then nearly x/|x|, whose derivative
# is a difference of two nearly equal float32 terms. Everything upstream of it (in_conv, the
# three down stages) gets gradients that are mostly that rounding, and Adam turns each element
# into a step of up to its learning rate whatever its size. Our forward pass already differs
# from the authors' in the last bits (epoch-1 training loss 3.4e-7, as for model A), so those
# steps differ. Measured: x·rsqrt(m+ε) instead of the published x/sqrt(m+ε) changes the first
# gradient of every upstream kernel by 3e-3 relative and its Adam step by up to the full
# learning rate; plain autodiff instead of the hand-written TI derivative moves the epoch-1
# validation loss by 2e-5; each variant keeps the rows compared here within 5e-4 (epoch-1
# validation) and 1.2e-3 (epoch 2) of the authors' and then spreads by 6–42 % at epoch 3, as far
# from each other as from the authors. Compared are therefore every term of the rows that do
# not depend on those steps (epoch-0 validation, epochs 1 and 2 training) at RTOL and the
# validation losses of epochs 1 and 2 at 2e-3; epoch 3 is not comparable.
C_ROWS = {("0", "Syntetbreen", "val"): RTOL, ("1", "Synthgletscher", "train"): RTOL,
          ("2", "Synthgletscher", "train"): RTOL, ("1", "Syntetbreen", "val"): (2e-3, "loss"),
          ("2", "Syntetbreen", "val"): (2e-3, "loss")}


@pytest.mark.parametrize("kind", ["a", "b", "c"])
def test_three_epochs_follow_the_authors_log(kind, tiny_reference_copy, tmp_path):
    ours = train_three_epochs(kind, tiny_reference_copy, tmp_path / "out")
    theirs = read_log(reference_path("training", f"authors_log_{kind}.csv"))
    assert set(ours) == set(theirs)  # the same glaciers, subsets and epochs (0 = validation only)
    rows = C_ROWS if kind == "c" else dict.fromkeys(theirs, RTOL)
    for key, rule in rows.items():
        rtol, only = rule if isinstance(rule, tuple) else (rule, None)
        for column, wanted in theirs[key].items():
            if column in KEY or column == "timestamp" or only not in (None, column):
                continue
            np.testing.assert_allclose(as_number(ours[key][column]), as_number(wanted), rtol=rtol,
                                       atol=ATOL, err_msg=f"model {kind.upper()} {key} {column}")


def _data_loss_from(model, arrays, first, state):
    """Data loss of the year indices ``first``… of ``arrays`` run from ``state`` (an independent
    route: an explicit year range instead of the trainer's invalid-day masks)."""
    _, season_smb, _, _ = walk_years(model, arrays, state, first)
    smb = jnp.concatenate([jnp.zeros((first,) + season_smb.shape[1:]), season_smb])
    return float(data_loss(data_terms(arrays, season_fields(smb))))


def test_finetune_validates_as_published(tiny_reference_copy, tmp_path):
    """"carried" (the authors' finetune.py): epoch e's validation years continue epoch e's
    training pass, i.e. they start from the state that the parameters before step e leave at the
    end of the training years and are run with the parameters after step e; there is no epoch-0
    candidate, and the parameters after the best epoch's step are kept. "rerun" validates the
    parameters after each step and the starting ones over all years."""
    glacier, train_years, val_years, epochs, lr = "Syntetbreen", (1995, 1996), (1997, 1998), 3, 1e-2
    model = load_model("a", published_a())
    tensors = Dataset(tiny_reference_copy).glacier(glacier)
    arrays = make_arrays(tensors, layout=layout_for(model))
    years = np.asarray(tensors.years)
    last_train = int(np.flatnonzero(years == train_years[1])[0])
    train_arrays = with_study_years(arrays, years, *train_years)
    val_arrays = with_study_years(arrays, years, *val_years)

    # By hand: full-batch Adam on the training years; each parameter set's validation loss
    # over all years (rerun) and continuing the previous set's training years (carried).
    value_and_grad, value = make_loss_and_grad()
    trainable, static = eqx.partition(model, trainable_filter(model))
    optimiser = make_optimiser(lr)
    opt_state = optimiser.init(trainable)
    params = [trainable]
    for _ in range(epochs):
        _, grad = value_and_grad(params[-1], static, train_arrays)
        updates, opt_state = optimiser.update(grad, opt_state, params[-1])
        params.append(eqx.apply_updates(params[-1], updates))
    models = [eqx.combine(p, static) for p in params]
    rerun = [float(value(p, static, val_arrays)[1]["data_loss"]) for p in params]
    carried = [math.nan]
    for before, after in zip(models[:-1], models[1:]):
        handover, *_ = walk_years(before, val_arrays, initial_state(before, val_arrays), 0, last_train)
        carried.append(_data_loss_from(after, val_arrays, last_train + 1, handover))
    # The handover matters (else this test could not tell the rules apart) and every loss is
    # distinct, so that the best epoch is unambiguous.
    assert all(abs(c - r) > 1e-6 * r for c, r in zip(carried[1:], rerun[1:]))
    assert len(set(rerun)) == len(rerun) and len(set(carried[1:])) == epochs

    for rule, expected, first_epoch in (("carried", carried, 1), ("rerun", rerun, 0)):
        out = tmp_path / rule
        best, _ = finetune(glacier, data_folder=tiny_reference_copy, init_params_path=published_a(),
                           final_params_path=out / "ft.eqx", log_path=out / "ft.csv", epochs=epochs,
                           learning_rate=lr, train_years=train_years, val_years=val_years,
                           show_progress=False, validation=rule)
        log = read_log(out / "ft.csv")
        val_epochs = sorted(int(e) for e, _, subset in log if subset == "val")
        assert val_epochs == list(range(first_epoch, epochs + 1)), rule
        logged = [float(log[(str(e), glacier, "val")]["data_loss"]) for e in val_epochs]
        np.testing.assert_allclose(logged, [expected[e] for e in val_epochs], rtol=1e-6, err_msg=rule)
        best_epoch = val_epochs[int(np.argmin(logged))]
        for a, b in zip(jax.tree_util.tree_leaves(best), jax.tree_util.tree_leaves(models[best_epoch])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, err_msg=rule)
        assert eqx.tree_equal(load_model("a", out / "ft.eqx"), best)
