"""One glacier of the twin in memory: its geometry, climate, truth and observations.

Each glacier is simulated from its own random stream (seed, index) and the shared weather of
its region, so glaciers are independent of each other and of the order they are built in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import constants
from dataloader.synthetic.climate import (
    HIDDEN_P_SIGMA,
    HIDDEN_T_SIGMA,
    BlockClimate,
    RegionalWeather,
    YearErrors,
    block_climate,
    draw_year_errors,
    regional_weather,
)
from dataloader.synthetic.geometry import Geometry, build_geometry, stake_cells
from dataloader.synthetic.observations import (
    Seasons,
    facies_maps,
    glacier_wide_rows,
    season_dates,
    stake_rows,
)
from dataloader.synthetic.presets import GlacierSpec
from dataloader.synthetic.regions import REGIONS
from dataloader.synthetic.truth import Truth, TruthParameters, run_truth, truth_parameters

# The truth starts five years before the first balance year so that the firn of the
# accumulation areas exists when the models' own spin-up (1990-1994) begins.
INTERNAL_START = np.datetime64("1984-10-01")
# Balance years for which the reanalysis's year-to-year errors are drawn: a fixed span, so that
# a region's errors are the same for all its glaciers whatever their last year.
ERROR_YEARS = np.arange(1984, 2051)


@dataclass(frozen=True)
class GlacierTwin:
    """Everything simulated for one glacier (the files are written from it)."""

    name: str
    spec: GlacierSpec
    geometry: Geometry
    seasons: Seasons
    climate: BlockClimate       # internal days from INTERNAL_START
    year_errors: YearErrors     # the reanalysis's errors of each year (regional + glacier)
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
    # and again by an amount the reanalysis misses (irreducible error of every model). The
    # reanalysis is also wrong by a different amount each year, partly shared by the region's
    # glaciers: own streams, so that these draws change nothing else.
    codes = list(REGIONS)
    year_errors = (draw_year_errors(ERROR_YEARS, "region",
                                    np.random.default_rng([seed, 5, codes.index(spec.region)]))
                   + draw_year_errors(ERROR_YEARS, "glacier", np.random.default_rng([seed, 4, index])))
    climate = block_climate(weather, region, area, geometry.block_orography,
                            mean_orography=float(geometry.orography[geometry.mask[0]].mean()),
                            t_bias=rng.normal(0.0, 0.4), p_factor=float(np.exp(rng.normal(0.0, 0.12))),
                            hidden_t_bias=rng.normal(0.0, HIDDEN_T_SIGMA),
                            hidden_p_factor=float(np.exp(rng.normal(0.0, HIDDEN_P_SIGMA))), rng=rng,
                            year_errors=year_errors)
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
                       year_errors=year_errors,
                       params=params, truth=truth, stake_cells=cells, glacier_wide=glacier_wide,
                       stakes=stakes, facies_years=facies_years, facies=facies)
