"""Calibrate model C (GlaUnTI without facies; starts from params/a.eqx) → params/c.eqx, logs/c.csv. See --help."""

import sys

from core.apps.cli import train_main

main = train_main("c")

if __name__ == "__main__":
    sys.exit(main())
