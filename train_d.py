"""Calibrate model D (see `python train_d.py --help`)."""

import sys

from core.cli import main_wrapper, train_parser
from core.run import calibrate


@main_wrapper
def main(argv=None):
    args = train_parser("d").parse_args(argv)
    calibrate(
        "d", data_folder=args.data_folder, epochs=args.epochs, learning_rate=args.learning_rate,
        params_path=args.params_path, log_path=args.log_path, seed=args.seed, resume=args.resume,
        init_params_path=getattr(args, "init_params_path", None), show_progress=not args.quiet,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
