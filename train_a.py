"""Calibrate model A (the temperature-index model) → params/a.eqx, logs/a.csv. See --help."""

import sys

from core.apps.cli import train_main

main = train_main("a")

if __name__ == "__main__":
    sys.exit(main())
