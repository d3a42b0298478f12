"""Model C on a real glacier pair: steady and first epoch, compile time, and where a year's time goes.

    python benchmarks/c_pair.py --data_folder DATA --epochs 3 [--profile] [--json out.json]
    python benchmarks/c_pair.py --train DATA1/Vernagtferner --val DATA2/Kesselwandferner --epochs 5

DATA holds one training glacier (fold 2) and one validation glacier (fold 1) in the published
layout, e.g. prepared with ``prepare_glacier.py`` from ``examples/hintereisferner/sources``:
Hintereisferner (``--outline_id RGI50-11.00897 --glacier_wide mbdata_WGMS-00491.csv --profile
profile_WGMS-00491.csv --fold 2``, 49×70) and Kesselwandferner (``--outline_id RGI50-11.00787
--margin_m 1000 --fold 1``, 51×51; its observations only matter for the loss value, not the time).
Or any pair: ``--train`` and ``--val`` name two prepared glacier folders (``DATA/NAME``, from any
datasets); they are linked into a temporary dataset with folds 2 and 1 (the training glacier's
``normalisation_factors.pkl``). The figures say whether the training glacier is seasonal
(winter and summer balances) in how many of its years: a seasonal year costs C about twice.

C starts from the published A (``params/published/a.eqx``, fresh corrector) and is trained as
``train_c.py`` does (``core.train.loop.train``): an epoch is the forward+gradient pass over the
training glaciers, the Adam step and the forward pass over the validation glaciers, which on
several CPU devices runs beside the next epoch's gradient. Figures: the validation pass before
training (compiles the forward), the first epoch (compiles the gradient), the median steady
epoch (the log's ``epoch_time_s`` of epochs 2..N-1: each epoch's own gradient, step and the part
of its validation the next gradient does not hide), and the seconds XLA spent
compiling. ``--profile`` times the pieces of
one study year of the training glacier, each compiled alone: the three channel runs, the
corrector, the corrected run, the year's forward, its forward+gradient, and its
forward+gradient rematerialised as in the year walk.

The persistent compilation cache is off unless ``--cache``: compile times are real.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_folder", default=None, help="Folder with the prepared glacier pair")
    p.add_argument("--train", default=None, help="Training glacier folder DATA/NAME (with --val)")
    p.add_argument("--val", default=None, help="Validation glacier folder DATA/NAME (with --train)")
    p.add_argument("--epochs", type=int, default=3, help="Steady epochs after the first (default 3)")
    p.add_argument("--cpu_devices", type=int, default=None,
                   help="Expose N CPU devices (default: one per core, at most 8)")
    p.add_argument("--cache", action="store_true", help="Use the persistent compilation cache")
    p.add_argument("--profile", action="store_true", help="Time the pieces of one study year")
    p.add_argument("--repeats", type=int, default=5, help="Best of N for --profile (default 5)")
    p.add_argument("--json", default=None, help="Write the figures here")
    args = p.parse_args(argv)
    if (args.data_folder is None) == (args.train is None or args.val is None) or \
            (args.data_folder is not None and (args.train or args.val)):
        p.error("give either --data_folder or both --train and --val")
    return args


def pair_folder(train: Path, val: Path, into: Path) -> Path:
    """A dataset in ``into`` holding ``train`` (fold 2) and ``val`` (fold 1), two prepared glacier
    folders ``DATA/NAME`` linked in; their index rows come from their own datasets."""
    import csv
    import os
    import shutil

    rows = []
    for folder, fold in ((Path(train).resolve(), 2), (Path(val).resolve(), 1)):
        with open(folder.parent / "index.csv", newline="") as f:
            row = next((r for r in csv.DictReader(f) if r["name"] == folder.name), None)
        if row is None:
            raise SystemExit(f"{folder.name} is not in {folder.parent / 'index.csv'}")
        os.symlink(folder, into / folder.name)
        rows.append(dict(row, fold=str(fold)))
    shutil.copy(Path(train).resolve().parent / "normalisation_factors.pkl", into / "normalisation_factors.pkl")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(into / "index.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return into


def seasonal_years(arrays) -> dict:
    """How many of a glacier's years (spin-up included) have winter and summer balances."""
    import numpy as np

    seasonal = np.asarray(arrays.seasonal, bool)
    return {"seasonal_years": int(seasonal.sum()), "years": int(seasonal.size)}


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _best(fn, repeats: int) -> tuple[float, float]:
    """(first call incl. compile, best of ``repeats`` later calls), seconds of wall time."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return first, best


def profile_year(model, arrays, repeats: int) -> dict:
    """Seconds (best of ``repeats``) of the pieces of one study year of ``arrays`` (exact layout),
    each jitted alone, from the SWE that the spin-up leaves."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from glaunti.glacier import published_precision, scan_block, walk_years, year_step
    from glaunti.ti_corr_model import computed_channels
    from glaunti.ti_model import apply_corrections, ti_step

    k = arrays.n_spinup  # the first study year
    swe, *_ = jax.jit(lambda a: walk_years(model, a, model.initial_state(a.shape), 0, k - 1))(arrays)
    valid = arrays.day_valid[k]
    no_flag = jnp.zeros_like(valid)
    mask = arrays.outlines[k]

    def block(step, state):
        return scan_block(step, state, arrays, k, valid, no_flag, False, state.shape)

    @jax.jit
    def channels(swe):
        with published_precision():
            return computed_channels(model.ti, swe, block)

    chan = channels(swe)

    @jax.jit
    def corrector(corr, chan):
        with published_precision():
            return corr(jnp.concatenate([chan, arrays.fields[k]]), arrays.climate_monthly[k],
                        arrays.n_months[k])

    corrections = corrector(model.corrector, chan)
    base = jax.lax.stop_gradient(model.ti).constrained()

    @jax.jit
    def corrected(corrections, swe):
        params, shift = apply_corrections(base, corrections)
        return block(ti_step(params, shift, True), swe)[:2]

    trainable, static = eqx.partition(model, model.trainable_filter())

    def year_loss(trainable, swe):
        m = eqx.combine(trainable, static)
        state, acc, corr, _ = year_step(m, arrays, k, swe, custom_vjp=True)
        return jnp.sum((acc[0] + acc[1]) * mask) + jnp.sum(corr**2 * mask) + jnp.sum(state * mask)

    forward = jax.jit(year_loss)
    gradient = jax.jit(jax.value_and_grad(year_loss, argnums=(0, 1)))
    # As in the year walk: the year rematerialised (keeping what the model's policy names).
    remat = jax.checkpoint(year_loss, policy=getattr(model, "year_remat_policy", None))
    remat_gradient = jax.jit(jax.value_and_grad(remat, argnums=(0, 1)))
    pieces = {
        "channels_3_runs": lambda: channels(swe),
        "corrector": lambda: corrector(model.corrector, chan),
        "corrected_run": lambda: corrected(corrections, swe),
        "year_forward": lambda: forward(trainable, swe),
        "year_forward_gradient": lambda: gradient(trainable, swe),
        "year_forward_gradient_remat": lambda: remat_gradient(trainable, swe),
    }
    return {name: _best(fn, repeats)[1] for name, fn in pieces.items()}


def main(argv=None) -> dict:
    args = _parse(argv)
    from core.execute import distributed

    distributed.setup(cpu_devices=args.cpu_devices, compilation_cache=args.cache)
    import jax

    events = defaultdict(float)
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: events.__setitem__(name, events[name] + secs))

    import csv
    import tempfile

    import core.train.loop
    from core.execute.sets import GlacierSet
    from core.models import initial_model, published_params_path
    from core.train.loop import TrainConfig, train
    from dataloader import Dataset
    from glaunti.layouts import layout_for, make_arrays

    if args.data_folder is None:
        pair = tempfile.TemporaryDirectory()
        args.data_folder = str(pair_folder(Path(args.train), Path(args.val), Path(pair.name)))
    dataset = Dataset(Path(args.data_folder))
    model = initial_model("c", start_path=published_params_path("a"))
    layout = layout_for(model)
    train_set = GlacierSet(dataset, dataset.train_names, False, layout=layout, passes=args.epochs + 1)
    val_set = GlacierSet(dataset, dataset.val_names, False, layout=layout, passes=args.epochs + 2)
    compile_key = "/jax/core/compile/backend_compile_duration"

    # Wall and CPU time where the training loop closes each epoch (it logs the epoch's time then).
    marks = [(time.perf_counter(), _cpu_seconds())]
    set_epoch_time = core.train.loop.Log.set_epoch_time

    def mark(log, epoch, seconds):
        marks.append((time.perf_counter(), _cpu_seconds()))
        set_epoch_time(log, epoch, seconds)

    core.train.loop.Log.set_epoch_time = mark
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(epochs=args.epochs + 1, learning_rate=1e-3, params_path=Path(tmp) / "c.eqx",
                             log_path=Path(tmp) / "c.csv", checkpoint=False, show_progress=False)
        train(model, train_set, val_set, config)
        rows = list(csv.DictReader(open(config.log_path)))
    core.train.loop.Log.set_epoch_time = set_epoch_time
    initial_validation = max(float(r["epoch_time_s"]) for r in rows if r["epoch"] == "0")
    # Wall time: the log's epoch_time_s (the epoch's own work, core.train.loop). CPU time: between
    # two closings of the loop, i.e. epoch e+1's gradient and step with epoch e's validation.
    walls = [float(next(r["epoch_time_s"] for r in rows if r["epoch"] == str(e))) for e in range(1, args.epochs + 2)]
    between = [b[0] - a[0] for a, b in zip(marks[1:], marks[2:])]
    cpus = [b[1] - a[1] for a, b in zip(marks[1:], marks[2:])]
    per_epoch = {}
    for r in rows:
        per_epoch.setdefault((r["epoch"], r["subset"]), []).append(float(r["loss"]))
    train_losses = [per_epoch[(str(e), "train")] for e in range(1, args.epochs + 2)]
    val_losses = [per_epoch[(str(e), "val")] for e in range(args.epochs + 2)]
    # The last epoch has no next gradient beside its validation: not a steady one.
    steady = walls[1:-1] if len(walls) > 2 else walls
    steady_cpus = cpus[1:] if len(cpus) > 1 else cpus
    out = {
        "train": {n: list(make_arrays(dataset.glacier(n)).shape) for n in dataset.train_names},
        "train_seasonal": {n: seasonal_years(make_arrays(dataset.glacier(n))) for n in dataset.train_names},
        "validation": {n: list(make_arrays(dataset.glacier(n)).shape) for n in dataset.val_names},
        "devices": len(jax.devices()),
        "initial_validation_s": initial_validation, "first_epoch_s": walls[0],
        "steady_epoch_s": statistics.median(steady), "steady_epoch_cpu_s": statistics.median(steady_cpus),
        "epochs_s": walls, "between_closings_s": between, "epochs_cpu_s": cpus,
        "compile_s": events.get(compile_key, 0.0),
        "train_losses": train_losses, "val_losses": val_losses,
    }
    if args.profile:
        name = dataset.train_names[0]
        out["profile_glacier"] = name
        out["profile_year_s"] = profile_year(model, make_arrays(dataset.glacier(name)), args.repeats)

    print(f"train {out['train']}  validation {out['validation']}  devices {out['devices']}")
    for n, count in out["train_seasonal"].items():
        kind = "seasonal" if count["seasonal_years"] == count["years"] else (
            "partly seasonal" if count["seasonal_years"] else "annual only")
        print(f"training glacier {n}: {kind} ({count['seasonal_years']} of {count['years']} years with "
              "winter and summer balances)")
    print(f"initial validation {initial_validation:.2f} s   first epoch {walls[0]:.2f} s   "
          f"steady epoch {out['steady_epoch_s']:.2f} s (CPU {out['steady_epoch_cpu_s']:.2f} s)   "
          f"XLA compile {out['compile_s']:.1f} s")
    print("epochs (s, the log's epoch_time_s):", " ".join(f"{w:.2f}" for w in walls))
    print("between closings (s):", " ".join(f"{w:.2f}" for w in between), "  CPU (s):",
          " ".join(f"{c:.2f}" for c in cpus))
    print("training losses:", train_losses)
    if args.profile:
        print(f"one study year of {out['profile_glacier']} (best of {args.repeats}, s):")
        for piece, seconds in out["profile_year_s"].items():
            print(f"  {piece:24s} {seconds:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
