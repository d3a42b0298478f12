"""Calibrate model B (the per-cell GRU baseline) → params/b.eqx, logs/b.csv. See --help."""

import sys

from core.apps.cli import train_main

main = train_main("b")

if __name__ == "__main__":
    sys.exit(main())
