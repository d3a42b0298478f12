"""Fine-tune model A on one glacier (per-glacier transfer learning): train on its early study
years, keep the epoch that is best on its later ones."""

import argparse
import sys

from core.apps.cli import add_data_folder, main_wrapper, non_negative_int, positive_float


def parser():
    from core import models

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("glacier", help="Glacier name")
    p.add_argument("--init_params_path", default=str(models.params_path("a")),
                   help=f"Init params path (default {models.params_path('a')})")
    p.add_argument("--final_params_path", default=None,
                   help=f"Final params path; default {models.params_path(models.finetuned_name('<glacier>'))}")
    p.add_argument("--log_path", default=None,
                   help=f"Log path; default {models.log_path(models.finetuned_name('<glacier>'))}")
    add_data_folder(p)
    p.add_argument("--epochs", type=non_negative_int, default=models.FINETUNE_EPOCHS,
                   help=f"Number of epochs (default {models.FINETUNE_EPOCHS})")
    p.add_argument("--learning_rate", type=positive_float, default=models.FINETUNE_LEARNING_RATE,
                   help=f"Learning rate (default {models.FINETUNE_LEARNING_RATE:g})")
    p.add_argument("--train_years", type=int, nargs=2, default=models.FINETUNE_TRAIN_YEARS, metavar=("FIRST", "LAST"),
                   help="Study years used for training (default %(default)s)")
    p.add_argument("--val_years", type=int, nargs=2, default=models.FINETUNE_VAL_YEARS, metavar=("FIRST", "LAST"),
                   help="Study years used to pick the best epoch (default %(default)s)")
    p.add_argument("--validation", choices=("carried", "rerun"), default="carried",
                   help="carried (default, published): the validation years continue the "
                        "epoch's training pass (its state at the end of the training years, "
                        "computed before the step) with the parameters after the step; no epoch-0 "
                        "candidate. rerun: run all years with the parameters after each step "
                        "(and the starting ones), so the kept parameters are exactly those "
                        "validated")
    p.add_argument("--resume", action="store_true", help="Continue an interrupted run")
    p.add_argument("--quiet", action="store_true", help="No progress bar")
    return p


@main_wrapper
def main(argv=None):
    args = parser().parse_args(argv)
    from core.workflows import finetune

    finetune(args.glacier, data_folder=args.data_folder, init_params_path=args.init_params_path,
             final_params_path=args.final_params_path, log_path=args.log_path, epochs=args.epochs,
             learning_rate=args.learning_rate, train_years=tuple(args.train_years),
             val_years=tuple(args.val_years), resume=args.resume, show_progress=not args.quiet,
             validation=args.validation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
