"""The README's main job: synthetic twin → train A, B, C, D → evaluate every test glacier →
summary table and figure.

    python -m core.apps.demo [--data_folder data/demo] [--out_dir outputs/demo] [--preset demo]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from core.apps.cli import main_wrapper, positive_float, positive_int
from core.evaluate.summary import format_table, summarise
from core.io import atomic_write_json, atomic_write_text
from core.models import DESCRIPTIONS, EPOCHS, MODELS, STARTS_FROM
from core.workflows import calibrate, infer_and_evaluate_many
from dataloader import Dataset
from dataloader.synthetic import PRESETS
from glaunti.glacier import SEASONS

# Epochs of every model in the demo: enough for C to beat A on the twin's test glaciers; B, from
# random weights, is far from converged in any short run.
DEMO_EPOCHS = 10


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_folder", default="data/demo", help="Dataset folder; generated if absent")
    p.add_argument("--out_dir", default="outputs/demo", help="Where params, logs, SMB, evaluations go")
    p.add_argument("--preset", default="demo", choices=PRESETS,
                   help="Synthetic twin preset used when the data folder does not exist")
    p.add_argument("--seed", type=int, default=0, help="Twin and initialisation seed")
    epochs = p.add_mutually_exclusive_group()
    epochs.add_argument("--epochs", type=positive_int, default=DEMO_EPOCHS,
                        help=f"Epochs of every model (default {DEMO_EPOCHS}: a fifth of A, C and D's published "
                             "schedule, a tenth of B's; keeps the demo short)")
    epochs.add_argument("--epochs_scale", type=positive_float,
                        help="Instead: multiply each model's published epoch count (1: the published schedule)")
    p.add_argument("--models", default="abcd", help="Models to train and evaluate (default abcd)")
    p.add_argument("--no_real", action="store_true",
                   help="Skip the real region (every Oetztal glacier with the published D, against WGMS)")
    p.add_argument("--quiet", action="store_true", help="No progress bars")
    return p


def plot_predicted_vs_observed(eval_folders: dict[str, Path], path: Path) -> None:
    """One panel per model: predicted vs observed SMB, coloured by season; points are stakes,
    squares glacier-wide values."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"annual": "tab:purple", "winter": "tab:blue", "summer": "tab:red"}
    fig, axes = plt.subplots(1, len(eval_folders), figsize=(4.2 * len(eval_folders), 4.4), squeeze=False)
    for ax, (model, folder) in zip(axes[0], eval_folders.items()):
        evaluations = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
        lo, hi = 0.0, 0.0
        for scale, marker, size in (("point", "o", 10), ("glacier-wide", "s", 28)):
            for season in SEASONS:
                true = [v for ev in evaluations for v in ev["true_pred"][scale]["overall"][season]["true"]]
                pred = [v for ev in evaluations for v in ev["true_pred"][scale]["overall"][season]["pred"]]
                if true:
                    ax.scatter(true, pred, s=size, marker=marker, alpha=0.6, color=colours[season],
                               edgecolor="k" if scale == "glacier-wide" else "none", linewidth=0.5,
                               label=f"{scale} {season}")
                    lo, hi = min(lo, *true, *pred), max(hi, *true, *pred)
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8)
        ax.set_title(f"{model.upper()}: {DESCRIPTIONS[model]}", fontsize=10)
        ax.set_xlabel("observed SMB (m w.e.)")
        ax.set_aspect("equal", adjustable="datalim")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("predicted SMB (m w.e.)")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle("Test glaciers: predicted vs observed (circles: stakes, squares: glacier-wide)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def model_epochs(args, model: str) -> int:
    """``--epochs``, or the published count × ``--epochs_scale`` (at least 1)."""
    if args.epochs_scale is not None:
        return max(1, round(EPOCHS[model] * args.epochs_scale))
    return args.epochs


@main_wrapper
def main(argv=None):
    args = parser().parse_args(argv)
    data, out = Path(args.data_folder), Path(args.out_dir)
    t_start = time.perf_counter()
    if not (data / "index.csv").exists():
        from dataloader.synthetic import generate

        print(f"generating the synthetic twin ({args.preset}) in {data} ...", flush=True)
        generate(data, preset=args.preset, seed=args.seed)
    dataset = Dataset(data)
    print(f"{len(dataset.names)} glaciers: {len(dataset.train_names)} training, "
          f"{len(dataset.val_names)} validation, {len(dataset.test_names)} test", flush=True)

    eval_folders = {}
    for model in args.models:
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r} in --models")
        epochs = model_epochs(args, model)
        t0 = time.perf_counter()
        params = out / "params" / f"{model}.eqx"
        init = out / "params" / f"{STARTS_FROM[model]}.eqx" if model in STARTS_FROM else None
        _, state = calibrate(model, data_folder=data, epochs=epochs, params_path=params,
                             log_path=out / "logs" / f"{model}.csv", seed=args.seed,
                             init_params_path=init, show_progress=not args.quiet)
        print(f"model {model.upper()}: {epochs} epochs in {time.perf_counter() - t0:.1f} s, "
              f"best validation loss {state.best_val:.4f} at epoch {state.best_epoch}", flush=True)
        eval_folders[model] = out / "eval" / model
        tests = dataset.test_names
        infer_and_evaluate_many(model, tests, [out / "smb" / model / f"{g}.nc" for g in tests],
                                [eval_folders[model] / f"{g}.json" for g in tests], params_path=params,
                                data_folder=data)

    summary = summarise([eval_folders[m] for m in eval_folders])
    summary = {f"{m.upper()} ({DESCRIPTIONS[m]})": v for m, v in zip(eval_folders, summary.values())}
    table = format_table(summary)
    atomic_write_text(out / "summary.txt", table + "\n")
    atomic_write_json(out / "summary.json", summary)
    figure = out / "predicted_vs_observed.png"
    plot_predicted_vs_observed(eval_folders, figure)
    print()
    print(f"Test glaciers ({len(dataset.test_names)}), pooled:")
    print(table)
    if "b" in eval_folders and model_epochs(args, "b") < EPOCHS["b"]:
        print(f"B's GRU starts from random weights and is far from converged after "
              f"{model_epochs(args, 'b')} of its {EPOCHS['b']} published epochs: "
              "its numbers here say nothing about the model (--epochs_scale 1 runs the published schedule).")
    print(f"\nfigure: {figure}", flush=True)
    if not args.no_real:
        from core.apps.region import run_oetztal

        print("\nA real region from public sources (examples/oetztal: every RGI outline, published D, "
              "against WGMS):", flush=True)
        run_oetztal(out / "oetztal", verbose=not args.quiet)
    print(f"\nall outputs in {out}/  ({time.perf_counter() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
