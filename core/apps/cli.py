"""Command-line plumbing shared by the top-level scripts: argument parsers, the data folder,
and turning expected errors into one clear line on stderr (no traceback unless
``GLAUNTI_DEBUG=1``)."""

from __future__ import annotations

import argparse
import functools
import os
import sys

DEBUG_ENV = "GLAUNTI_DEBUG"


def add_data_folder(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data_folder", default=None,
        help="Dataset folder (default: $GLAUNTI_DATA_FOLDER, then constants.data_folder)",
    )


def add_climate_sources(parser: argparse.ArgumentParser) -> None:
    """The DEM and reanalysis options of ``prepare_glacier.py`` and ``run_region.py`` (one
    meaning for both)."""
    from pathlib import Path

    parser.add_argument("--dem", type=Path, required=True, help="DEM GeoTIFF (any CRS and resolution)")
    climate = parser.add_argument_group("climate (ERA5-Land or any CF NetCDF on a lat/lon grid)")
    climate.add_argument("--temperature", type=Path, required=True, help="2 m temperature (K or °C)")
    climate.add_argument("--precipitation", type=Path, required=True, help="Total precipitation (m)")
    climate.add_argument("--orography", type=Path, required=True,
                         help="Reanalysis orography: geopotential (m2 s-2) or height (m)")
    climate.add_argument("--monthly_climate", action="store_true",
                         help="Accept monthly means and disaggregate them to days (an approximation)")


def add_balance_years(group) -> None:
    """``--first_year`` and ``--last_year`` of a glacier prepared from public sources."""
    import constants

    group.add_argument("--first_year", type=int, default=constants.initialisation_period_start_year,
                       help="First balance year (the published spin-up starts in 1990)")
    group.add_argument("--last_year", type=int, help="Last balance year (default: the last the climate covers)")


def expected_errors() -> tuple[type[BaseException], ...]:
    from core.evaluate.summary import SummaryError
    from core.io import OutputError
    from core.train.loop import TrainingError
    from dataloader.errors import DataError
    from glaunti.params import ParamsError

    # OSError: a full disk, a vanished mount or an unwritable path is the environment, not a bug.
    return (DataError, ParamsError, TrainingError, OutputError, SummaryError, OSError, ValueError)


def one_line(err: BaseException) -> str:
    """The error's message on one line (a message quoted from a library may span several)."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__


def main_wrapper(main):
    """Run ``main()``; expected errors become ``error: <message>`` and exit code 2."""

    @functools.wraps(main)
    def wrapped(argv=None):
        # No global JAX setting here: the model code traces under float32 matmuls itself
        # (glaunti.glacier.at_published_precision).
        try:
            return main(argv)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except expected_errors() as err:
            if os.environ.get(DEBUG_ENV):
                raise
            print(f"error: {one_line(err)}", file=sys.stderr)
            return 2

    return wrapped


def _argument(text: str, convert, valid, expected: str):
    """``convert(text)`` if it converts and is ``valid``, else argparse's one-line error."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {expected}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"{text} is not {expected}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer ≥ 0 (a number of epochs)."""
    return _argument(text, int, lambda v: v >= 0, "an integer ≥ 0")


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (a demo's epochs)."""
    return _argument(text, int, lambda v: v >= 1, "an integer ≥ 1")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a learning rate)."""
    return _argument(text, float, lambda v: 0 < v < float("inf"), "a finite positive number")


def train_parser(model: str) -> argparse.ArgumentParser:
    from core.models import (
        DEFAULT_SEED,
        DESCRIPTIONS,
        EPOCHS,
        LEARNING_RATE,
        STARTS_FROM,
        log_path,
        params_path,
    )

    epochs = EPOCHS[model]
    parser = argparse.ArgumentParser(
        description=f"Calibrate model {model.upper()} ({DESCRIPTIONS[model]}) on the training folds; "
        f"keeps the best validation epoch.",
    )
    add_data_folder(parser)
    parser.add_argument("--epochs", type=non_negative_int, default=epochs,
                        help=f"Number of epochs (default {epochs}, the published schedule)")
    parser.add_argument("--learning_rate", type=positive_float, default=LEARNING_RATE,
                        help=f"Adam learning rate (default {LEARNING_RATE:g})")
    parser.add_argument("--params_path", default=str(params_path(model)),
                        help=f"Output params path (default {params_path(model)})")
    parser.add_argument("--log_path", default=str(log_path(model)), help=f"Output log path (default {log_path(model)})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"Random seed of the initialisation (default {DEFAULT_SEED}, the "
                        "authors' key: their initial parameters)")
    parser.add_argument("--resume", action="store_true",
                        help="Continue an interrupted run from its last completed epoch")
    if model in STARTS_FROM:
        base = STARTS_FROM[model]
        parser.add_argument("--init_params_path", default=str(params_path(base)),
                            help=f"Calibrated model {base.upper()} to start from (.eqx)")
    parser.add_argument("--quiet", action="store_true", help="No progress bar")
    return parser


def train_main(model: str):
    """The ``main`` of ``train_<model>.py``."""

    @main_wrapper
    def main(argv=None):
        from core.workflows import calibrate

        args = train_parser(model).parse_args(argv)
        calibrate(
            model, data_folder=args.data_folder, epochs=args.epochs, learning_rate=args.learning_rate,
            params_path=args.params_path, log_path=args.log_path, seed=args.seed, resume=args.resume,
            init_params_path=getattr(args, "init_params_path", None), show_progress=not args.quiet,
        )
        return 0

    return main
