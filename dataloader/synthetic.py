"""Synthetic twin of the GlaUnTI dataset.

Writes a complete dataset in the published on-disk layout (docs/data_format.md) from a small simulated world: regional reanalysis-like climate on coarse cells,
valley glaciers and ice caps that retreat and thin, and a daily temperature-index truth whose
parameters vary in space around the published calibrated values. Glacier-wide balances, stake
readings and facies maps are the truth plus noise and the gaps of real monitoring. The
processes and their parameters are described in docs/synthetic_twin.md.

    python -m dataloader.synthetic OUT_DIR --preset {tiny,demo,bench} [--seed N]

or, from Python, ``generate(out_dir, preset="tiny", seed=0)``. The same seed gives the same
data (byte-identical CSV files, identical NetCDF contents), whatever the number of worker
processes. Each worker holds one glacier at a time, so memory stays bounded by the largest
glacier (~0.4 GB for 100 x 150 cells over 1990-2024).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import constants
from dataloader._synthetic_climate import (
    HIDDEN_P_SIGMA,
    HIDDEN_T_SIGMA,
    BlockClimate,
    RegionalWeather,
    block_climate,
    regional_weather,
)
from dataloader._synthetic_geometry import Geometry, build_geometry, stake_cells
from dataloader.layout import (
    INDEX_COLUMNS,
    POINT_SMB_COLUMNS,
    TOTAL_SMB_COLUMNS,
    write_csv,
    write_daily,
    write_facies,
    write_normalisation_factors,
    write_static,
    write_yearly,
)
from dataloader._synthetic_observations import (
    Seasons,
    facies_maps,
    glacier_wide_rows,
    season_dates,
    stake_rows,
)
from dataloader._synthetic_regions import REGIONS
from dataloader._synthetic_truth import Truth, TruthParameters, run_truth, truth_parameters

PRESETS = ("tiny", "demo", "science", "bench")

# The truth starts five years before the first balance year so that the firn of the
# accumulation areas exists when the models' own spin-up (1990-1994) begins.
INTERNAL_START = np.datetime64("1984-10-01")
FILE_START = np.datetime64(f"{constants.initialisation_period_start_year - 1}-10-01")



@dataclass(frozen=True)
class GlacierSpec:
    """What a preset asks for one glacier; everything else is drawn from the seed."""

    region: str
    fold: int
    shape: tuple[int, int]   # (height, width) in 100 m cells
    kind: str                # 'valley' (incl. outlet glaciers) or 'icecap'
    max_year: int
    stakes: int              # number of stakes; 0 = no point_smb.csv
    facies_years: int        # number of facies maps; 0 = no facies.nc
    seasonal: str            # 'all', 'none' or 'mixed' years with a midseason date
    boundary: str            # 'shared', 'next', 'mixed' or 'fixed' year boundaries


def _tiny_specs(rng: np.random.Generator) -> list[GlacierSpec]:
    end = 1998
    return [
        GlacierSpec("ALP", 0, (12, 16), "valley", end, 5, 2, "all", "shared"),
        GlacierSpec("ICL", 0, (16, 12), "valley", end, 4, 0, "mixed", "mixed"),
        GlacierSpec("SCA", 1, (16, 12), "icecap", end, 4, 2, "mixed", "next"),
        GlacierSpec("PYR", 1, (12, 16), "valley", end, 4, 0, "all", "fixed"),
        GlacierSpec("ALP", 2, (12, 16), "valley", end, 0, 2, "none", "fixed"),
        GlacierSpec("SVAL", 3, (16, 12), "icecap", end, 5, 2, "mixed", "shared"),
    ]


def _demo_specs(rng: np.random.Generator) -> list[GlacierSpec]:
    # Few distinct grid shapes, so that compiled model functions are shared between glaciers.
    a, b, c, d = (16, 24), (24, 16), (24, 24), (24, 32)
    end = 2008
    return [
        GlacierSpec("ALP", 0, d, "valley", end, 8, 3, "all", "shared"),
        GlacierSpec("ALP", 0, a, "valley", end, 6, 0, "mixed", "mixed"),
        GlacierSpec("SCA", 0, c, "icecap", end, 7, 3, "mixed", "next"),
        GlacierSpec("ICL", 0, d, "valley", end, 8, 3, "all", "mixed"),
        GlacierSpec("ALP", 1, b, "valley", end, 6, 3, "all", "shared"),
        GlacierSpec("SCA", 1, a, "valley", 2007, 6, 0, "mixed", "next"),
        GlacierSpec("SVAL", 1, c, "icecap", end, 6, 3, "mixed", "shared"),
        GlacierSpec("ALP", 2, d, "valley", end, 8, 3, "all", "shared"),
        GlacierSpec("ALP", 2, a, "valley", end, 0, 0, "none", "fixed"),
        GlacierSpec("SCA", 2, c, "icecap", end, 7, 3, "all", "mixed"),
        GlacierSpec("PYR", 2, a, "valley", 2006, 5, 0, "all", "fixed"),
        GlacierSpec("ALP", 3, b, "valley", end, 6, 3, "mixed", "next"),
        GlacierSpec("ICL", 3, d, "valley", end, 7, 0, "mixed", "mixed"),
        GlacierSpec("SVAL", 3, a, "valley", end, 6, 3, "all", "shared"),
    ]


def _science_specs(rng: np.random.Generator) -> list[GlacierSpec]:
    # Far more training glaciers (24) than demo's 7, on the demo's small grids so that the
    # published schedule of A, C and D runs in about 25 minutes on two cores.
    regions = ["ALP"] * 14 + ["SCA"] * 9 + ["SVAL"] * 5 + ["ICL"] * 5 + ["PYR"] * 3
    shapes = [(16, 24), (24, 16), (24, 24)]
    specs = []
    for code in regions:
        region = REGIONS[code]
        kind = "icecap" if rng.random() < region.icecap_share else "valley"
        shape = shapes[int(rng.integers(len(shapes)))]
        max_year = 2006 if rng.random() < 0.85 else 2005
        # Stakes on every glacier: the check pools point errors over only six test glaciers.
        stakes = int(rng.integers(5, 9))
        facies = 3 if rng.random() < 0.8 else 0
        seasonal = str(rng.choice(["all", "all", "mixed", "none"]))
        boundary = str(rng.choice(["shared", "next", "mixed", "fixed"]))
        specs.append(GlacierSpec(code, 0, shape, kind, max_year, stakes, facies, seasonal, boundary))
    # Folds 0..5 round-robin over the region-sorted list: 6 test, 6 validation, 24 training.
    return [GlacierSpec(**{**s.__dict__, "fold": i % 6}) for i, s in enumerate(specs)]


def _bench_specs(rng: np.random.Generator) -> list[GlacierSpec]:
    # Regional shares of the published dataset (38 ALP, 21 SCA, 9 SVAL, 8 ICL, 2 PYR of 78).
    regions = ["ALP"] * 15 + ["SCA"] * 8 + ["SVAL"] * 4 + ["ICL"] * 3 + ["PYR"] * 2
    specs = []
    for i, code in enumerate(regions):
        region = REGIONS[code]
        if i == 0:
            shape = (100, 150)
        elif i == 15:
            shape = (96, 128)
        else:
            # Log-uniform sizes: many small glaciers, a few large ones.
            shape = (int(np.exp(rng.uniform(np.log(28), np.log(100)))),
                     int(np.exp(rng.uniform(np.log(28), np.log(150)))))
        kind = "icecap" if rng.random() < region.icecap_share else "valley"
        max_year = 2024 if rng.random() < 0.85 else int(rng.choice([2016, 2019, 2021, 2022]))
        cells = shape[0] * shape[1]
        stakes = int(np.clip(cells // 250, 4, 20)) if rng.random() < 0.8 else 0
        facies = int(rng.integers(4, 8)) if rng.random() < 0.7 else 0
        seasonal = str(rng.choice(["all", "all", "mixed", "none"]))
        boundary = str(rng.choice(["shared", "next", "mixed", "fixed"]))
        specs.append(GlacierSpec(code, 0, shape, kind, max_year, stakes, facies, seasonal, boundary))
    # Folds 0..5 dealt round-robin over the region-sorted list: every fold spans regions.
    return [GlacierSpec(**{**s.__dict__, "fold": i % 6}) for i, s in enumerate(specs)]


_SPEC_BUILDERS = {"tiny": _tiny_specs, "demo": _demo_specs, "science": _science_specs,
                  "bench": _bench_specs}
# First year from which facies maps may exist (satellite archive of the preset's period).
_FACIES_FROM = {"tiny": 1996, "demo": 2003, "science": 2001, "bench": 2016}


def glacier_specs(preset: str, seed: int = 0) -> list[tuple[str, GlacierSpec]]:
    """The (name, spec) list of a preset; names and the bench layout depend on the seed."""
    if preset not in _SPEC_BUILDERS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    rng = np.random.default_rng([seed, 1])
    specs = _SPEC_BUILDERS[preset](rng)
    names: list[str] = []
    used_stems: set[str] = set()
    for i, spec in enumerate(specs):
        region = REGIONS[spec.region]
        while True:
            fresh = [s for s in region.name_stems if s not in used_stems] or list(region.name_stems)
            stem = str(rng.choice(fresh))
            # The first glacier gets the region's first pattern ('{} Ferner'): a name with a space.
            pattern = region.name_patterns[0 if i == 0 else rng.integers(len(region.name_patterns))]
            name = pattern.format(stem)
            if name.lower() not in {n.lower() for n in names}:
                break
        used_stems.add(stem)
        names.append(name)
    return list(zip(names, specs))


@dataclass(frozen=True)
class GlacierTwin:
    """Everything simulated for one glacier (the files are written from it)."""

    name: str
    spec: GlacierSpec
    geometry: Geometry
    seasons: Seasons
    climate: BlockClimate       # internal days from INTERNAL_START
    params: TruthParameters
    truth: Truth
    stake_cells: np.ndarray
    glacier_wide: list[dict]
    stakes: list[dict]
    facies_years: list[int]
    facies: np.ndarray | None


def _last_day(max_year: int) -> np.datetime64:
    return np.datetime64(f"{max_year}-12-31")


def regional_weathers(specs: list[GlacierSpec], seed: int) -> dict[str, RegionalWeather]:
    """One weather series per region, shared by its glaciers, long enough for all of them."""
    last = max(_last_day(s.max_year) for s in specs)
    dates = np.arange(INTERNAL_START, last + 1)
    codes = list(REGIONS)
    return {code: regional_weather(REGIONS[code], dates,
                                   np.random.default_rng([seed, 2, codes.index(code)]))
            for code in sorted({s.region for s in specs})}


def simulate_glacier(name: str, spec: GlacierSpec, index: int, seed: int,
                     weather: RegionalWeather, facies_from: int) -> GlacierTwin:
    """Everything about glacier number ``index`` of a preset, from its own random stream
    (``seed``, ``index``) and its region's shared ``weather``; facies maps only for years from
    ``facies_from`` on."""
    region = REGIONS[spec.region]
    rng = np.random.default_rng([seed, 3, index])
    area = region.areas[int(rng.integers(len(region.areas)))]
    geometry = build_geometry(region, area, spec.kind, *spec.shape, spec.max_year,
                              constants.initialisation_period_start_year, rng)
    seasons = season_dates(geometry.years, region, spec.boundary, spec.seasonal, rng)

    n_days = int((_last_day(spec.max_year) - INTERNAL_START).astype(int)) + 1
    fields = RegionalWeather.__dataclass_fields__
    weather = RegionalWeather(*(getattr(weather, f)[:n_days] for f in fields))
    # The glacier's climate differs a little from the regional mean (seen by the reanalysis),
    # and again by an amount the reanalysis misses (irreducible error of every model).
    climate = block_climate(weather, region, area, geometry.block_orography,
                            mean_orography=float(geometry.orography[geometry.mask[0]].mean()),
                            t_bias=rng.normal(0.0, 0.4), p_factor=float(np.exp(rng.normal(0.0, 0.12))),
                            hidden_t_bias=rng.normal(0.0, HIDDEN_T_SIGMA),
                            hidden_p_factor=float(np.exp(rng.normal(0.0, HIDDEN_P_SIGMA))), rng=rng)
    params = truth_parameters(geometry, region, rng)
    windows = np.stack([(seasons.begin - INTERNAL_START).astype(int),
                        (seasons.mid - INTERNAL_START).astype(int),
                        (seasons.end - INTERNAL_START).astype(int)], axis=1)
    cells = stake_cells(geometry, spec.stakes, rng) if spec.stakes else np.zeros(0, dtype=np.int64)
    late_summer = np.array([(np.datetime64(f"{y}-08-01") - INTERNAL_START).astype(int)
                            for y in geometry.years])
    truth = run_truth(climate, region.z_ref, geometry, params, windows, late_summer, cells)

    study_start = constants.study_period_start_year
    glacier_wide = glacier_wide_rows(geometry.years, study_start, seasons, truth, geometry, rng)
    prefix = "".join(w[0] for w in name.replace("'", " ").split()).upper()[:2]
    if len(prefix) < 2:
        prefix = name[:2].upper()
    ids = [f"{prefix}{i + 1:02d}" for i in range(cells.size)]
    stakes = stake_rows(geometry.years, study_start, seasons, truth, geometry, cells, ids,
                        INTERNAL_START, rng) if cells.size else []
    facies_years: list[int] = []
    facies = None
    candidates = [int(y) for y in geometry.years if y >= facies_from]
    if spec.facies_years and candidates:
        count = min(spec.facies_years, len(candidates))
        facies_years = sorted(int(y) for y in rng.choice(candidates, size=count, replace=False))
        facies = facies_maps(geometry.years, facies_years, truth, geometry, region, rng)
    return GlacierTwin(name=name, spec=spec, geometry=geometry, seasons=seasons, climate=climate,
                       params=params, truth=truth, stake_cells=cells, glacier_wide=glacier_wide,
                       stakes=stakes, facies_years=facies_years, facies=facies)


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
        tasks = [(name, spec, index, seed, weathers[spec.region], _FACIES_FROM[preset], tmp / name)
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
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataloader.synthetic",
                                     description=__doc__.split("\n\n")[0])
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


if __name__ == "__main__":
    sys.exit(main())
