"""Writing the twin: one glacier's files, the whole dataset folder, and the command line.

    python -m dataloader.synthetic OUT_DIR --preset {tiny,demo,science,bench} [--seed N]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

import constants
from dataloader.layout import (
    INDEX_COLUMNS,
    POINT_SMB_COLUMNS,
    TOTAL_SMB_COLUMNS,
    replace_folder,
    write_csv,
    write_daily,
    write_facies,
    write_normalisation_factors,
    write_static,
    write_yearly,
)
from dataloader.synthetic.presets import FACIES_FROM, PRESETS, GlacierSpec, glacier_specs
from dataloader.synthetic.twin import INTERNAL_START, GlacierTwin, regional_weathers, simulate_glacier

# The climate files start on 1 October before the first balance year of the initialisation period.
FILE_START = np.datetime64(f"{constants.initialisation_period_start_year - 1}-10-01")


def write_glacier(twin: GlacierTwin, folder: Path) -> None:
    """The files of one glacier (docs/data_format.md), climate from 1989-10-01 to 31 Dec of max_year."""
    folder.mkdir(parents=True)
    g = twin.geometry
    grid = (g.x, g.y, g.epsg)
    offset = int((FILE_START - INTERNAL_START).astype(int))
    n_days = twin.climate.temperature.shape[1] - offset

    def expand(series: np.ndarray):
        # Nearest-neighbour resampling of the coarse cells onto the grid: constant over blocks.
        return lambda d0, d1: series[:, offset + d0:offset + d1].T[:, g.block_id]

    write_daily(folder / "temperature.nc", "temperature_2m",
                {"units": "degC", "long_name": "daily mean 2 m air temperature at orography height"},
                *grid, FILE_START, n_days, expand(twin.climate.temperature))
    write_daily(folder / "precipitation.nc", "total_precipitation_sum",
                {"units": "m", "long_name": "daily total precipitation (m water equivalent per day)"},
                *grid, FILE_START, n_days, expand(twin.climate.precipitation))
    write_static(folder / "orography.nc", "elevation",
                 {"units": "m", "long_name": "reanalysis model orography height"}, g.orography, *grid)
    write_yearly(folder / "dem.nc", {
        "z": ({"units": "m", "long_name": "surface elevation"}, g.z),
        "zstddev": ({"units": "m", "long_name": "sub-cell standard deviation of elevation"}, g.zstddev),
    }, g.years, *grid)
    write_yearly(folder / "outlines.nc", {
        "outlines": ({"units": "1", "long_name": "glacier mask (1 = glacier)"},
                     g.mask.astype(np.float32)),
    }, g.years, *grid)
    write_csv(folder / "total_smb.csv", TOTAL_SMB_COLUMNS, twin.glacier_wide)
    if twin.stakes:
        write_csv(folder / "point_smb.csv", POINT_SMB_COLUMNS, twin.stakes)
    if twin.facies is not None:
        write_facies(folder / "facies.nc", twin.facies_years, twin.facies, *grid)


def _index_rows(twins: list[tuple[str, GlacierSpec]]) -> list[dict]:
    return [{"name": name, "wgms_name": name.upper(), "fold": spec.fold, "region": spec.region,
             "max_year": spec.max_year, "height": spec.shape[0], "width": spec.shape[1]}
            for name, spec in twins]


def _prepare_target(out_dir: Path) -> None:
    """Refuse to replace a folder that is not a dataset (a typo must not delete someone's work)."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a folder")
        if any(out_dir.iterdir()) and not (out_dir / "index.csv").exists():
            raise FileExistsError(f"{out_dir} is not empty and holds no index.csv; "
                                  "refusing to replace it with a synthetic dataset")


def _make_glacier(task: tuple) -> tuple[str, float]:
    """Simulate and write one glacier (runs in a worker process when jobs > 1)."""
    name, spec, index, seed, weather, facies_from, folder = task
    start = time.perf_counter()
    twin = simulate_glacier(name, spec, index, seed, weather, facies_from)
    write_glacier(twin, folder)
    return name, time.perf_counter() - start


def default_jobs(preset: str) -> int:
    """Worker processes of the command line: one per CPU core (at most 4); tiny is faster
    in-process."""
    return 1 if preset == "tiny" else max(1, min(4, os.cpu_count() or 1))


def generate(out_dir: str | os.PathLike, preset: str = "tiny", seed: int = 0,
             verbose: bool = False, jobs: int = 1) -> Path:
    """Write the ``preset`` twin for ``seed`` to ``out_dir`` and return its path.

    The dataset is built in a temporary folder beside ``out_dir`` and renamed into place, so
    an interrupted run never leaves a half-written dataset (an existing dataset there is
    replaced only once the new one is complete). Glaciers are independent (each has its own
    random stream), so ``jobs`` > 1 worker processes build them in parallel with identical
    results; each holds one glacier in memory at a time. Workers are spawned, i.e. they import
    the caller's main module: call with jobs > 1 only from a module or script whose top level
    is guarded by ``if __name__ == "__main__"`` (the command line does so)."""
    out_dir = Path(out_dir)
    specs = glacier_specs(preset, seed)
    jobs = max(1, int(jobs))
    _prepare_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        weathers = regional_weathers([s for _, s in specs], seed)
        tasks = [(name, spec, index, seed, weathers[spec.region], FACIES_FROM[preset], tmp / name)
                 for index, (name, spec) in enumerate(specs)]
        report = {name: spec for name, spec in specs}

        def done(name: str, seconds: float) -> None:
            if verbose:
                spec = report[name]
                grid = f"{spec.shape[0]:>3}x{spec.shape[1]:<3}"
                print(f"  {name:<28} {spec.region:<4} fold {spec.fold} {grid} {spec.max_year}"
                      f"  {seconds:5.1f} s", flush=True)

        if jobs == 1:
            for task in tasks:
                done(*_make_glacier(task))
        else:
            # Largest glaciers first, so that no long job starts last.
            tasks.sort(key=lambda t: -t[1].shape[0] * t[1].shape[1] * (t[1].max_year - 1985))
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context) as pool:
                for result in as_completed([pool.submit(_make_glacier, t) for t in tasks]):
                    done(*result.result())
        write_csv(tmp / "index.csv", [(c, None) for c in INDEX_COLUMNS], _index_rows(specs))
        write_normalisation_factors(tmp / "normalisation_factors.pkl")
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataloader.synthetic",
                                     description="Write the synthetic twin of the GlaUnTI dataset "
                                                 "(docs/synthetic_twin.md).")
    parser.add_argument("out_dir", help="dataset folder to write (replaced if it holds a dataset)")
    parser.add_argument("--preset", choices=PRESETS, default="tiny",
                        help="tiny: seconds, 6 small glaciers to 1998; demo: 14 glaciers to 2008; "
                             "science: 36 small glaciers to 2006 (24 for training); "
                             "bench: 32 glaciers up to 100x150 cells to 2024")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="worker processes (default: one per CPU core, at most 4; 1 for tiny); "
                             "the result does not depend on it")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if not args.quiet:
        print(f"synthetic twin '{args.preset}' (seed {args.seed}) -> {args.out_dir}", flush=True)
    try:
        jobs = default_jobs(args.preset) if args.jobs is None else args.jobs
        path = generate(args.out_dir, args.preset, args.seed, verbose=not args.quiet, jobs=jobs)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"done in {time.perf_counter() - start:.1f} s, {size / 1e6:.1f} MB", flush=True)
    return 0
