"""Calibrate model D (GlaUnTI with facies; starts from params/c.eqx) → params/d.eqx, logs/d.csv. See --help."""

import sys

from core.apps.cli import train_main

main = train_main("d")

if __name__ == "__main__":
    sys.exit(main())
