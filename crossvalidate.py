"""Cross-validate over the folds of a dataset: for each test fold k (validation fold k+1, the
others training) calibrate A → B → C → D with the published schedule and evaluate them on fold
k, fine-tune A on each test glacier's own early years as a local baseline, and end with the
pooled table, the spread across folds and a figure. Resumable: run the same command again to
continue (docs/crossvalidation.md)."""

import argparse
import sys

from core.apps.cli import add_data_folder, main_wrapper, positive_float


def parser():
    from core.models import DEFAULT_SEED, EPOCHS, FINETUNE_EPOCHS

    p = argparse.ArgumentParser(description=__doc__)
    add_data_folder(p)
    p.add_argument("--out_dir", default="outputs/crossvalidation",
                   help="Output folder (default outputs/crossvalidation); an existing one is continued")
    p.add_argument("--folds", type=int, nargs="+", default=None, metavar="K",
                   help="Test folds to run (default: every fold of index.csv)")
    p.add_argument("--models", default="abcd",
                   help="Models to calibrate in each fold (default abcd; C needs A, D needs C)")
    p.add_argument("--epochs_scale", type=positive_float, default=1.0,
                   help="Multiply the published epochs ("
                        + ", ".join(f"{m.upper()} {n}" for m, n in EPOCHS.items())
                        + f", local fine-tuning {FINETUNE_EPOCHS}; at least 1 each); default 1, the published schedule")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"Initialisation seed (default {DEFAULT_SEED}, the authors' key)")
    p.add_argument("--no_local", action="store_true",
                   help="Skip the locally calibrated baseline (A fine-tuned on each test glacier's early years)")
    p.add_argument("--keep_smb", action="store_true",
                   help="Keep the daily SMB NetCDF of every model and test glacier (fold_<k>/smb/)")
    p.add_argument("--export", metavar="DIR", default=None,
                   help="Only copy the completed folds' evaluation files (no weights) from --out_dir to DIR, "
                        "a folder that summarise.py reads and crossvalidate.py continues")
    p.add_argument("--quiet", action="store_true", help="No progress bars")
    return p


@main_wrapper
def main(argv=None):
    args = parser().parse_args(argv)
    from core.apps.crossvalidation import crossvalidate, export_results

    if args.export:
        folds = export_results(args.out_dir, args.export)
        print(f"{args.out_dir} → {args.export}: folds {folds}")
        return 0
    crossvalidate(data_folder=args.data_folder, out_dir=args.out_dir, folds=args.folds, models=args.models,
                  epochs_scale=args.epochs_scale, seed=args.seed, local_baseline=not args.no_local,
                  keep_smb=args.keep_smb, show_progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
