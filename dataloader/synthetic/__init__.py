"""Synthetic twin of the GlaUnTI dataset.

Writes a complete dataset in the published on-disk layout (docs/data_format.md) from a small
simulated world: regional reanalysis-like climate on coarse cells, valley glaciers and ice caps
that retreat and thin, and a daily temperature-index truth whose parameters vary in space around
the published calibrated values. Glacier-wide balances, stake readings and facies maps are the
truth plus noise and the gaps of real monitoring. The processes and their parameters are
described in docs/synthetic_twin.md.

    python -m dataloader.synthetic OUT_DIR --preset {tiny,demo,science,bench} [--seed N]

or, from Python, ``generate(out_dir, preset="tiny", seed=0)``. The same seed gives the same
data (byte-identical CSV files, identical NetCDF contents), whatever the number of worker
processes. Each worker holds one glacier at a time, so memory stays bounded by the largest
glacier (~0.4 GB for 100 x 150 cells over 1990-2024).

Modules, from the world to the files:

    regions       every number that differs between the five glacier regions
    climate       regional weather, coarse reanalysis cells and their year-to-year errors,
                  the true local climate
    geometry      terrain, outlines, retreat, lowering, roughness, debris, shading, stake cells
    truth         truth parameters and the daily temperature-index truth
    observations  season dates, glacier-wide balances, stake readings, facies maps
    presets       which glaciers each preset asks for (`glacier_specs`)
    twin          one glacier simulated in memory (`simulate_glacier`)
    generator     its files, the dataset folder (`generate`) and the command line (`main`)

The file writers of the published layout are shared with the own-glacier path
(`dataloader.layout`).
"""

from dataloader.synthetic.generator import default_jobs, generate, main, write_glacier
from dataloader.synthetic.presets import PRESETS, GlacierSpec, glacier_specs
from dataloader.synthetic.twin import INTERNAL_START, GlacierTwin, regional_weathers, simulate_glacier

__all__ = [
    "INTERNAL_START",
    "PRESETS",
    "GlacierSpec",
    "GlacierTwin",
    "default_jobs",
    "generate",
    "glacier_specs",
    "main",
    "regional_weathers",
    "simulate_glacier",
    "write_glacier",
]
