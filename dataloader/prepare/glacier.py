"""One glacier of the published layout from public sources: the steps of ``prepare_glacier.py``.

Everything is written into a temporary folder beside the target, read back with the project's
own reader (so a prepared glacier is known to load), and only then renamed into place; the
``index.csv`` row and ``normalisation_factors.pkl`` are written atomically too. docs/own_glacier.md
explains every choice (grid, masks, DEM aggregation, climate resampling, observations).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import constants
from dataloader import reader
from dataloader.errors import DataError
from dataloader.layout import (
    INDEX_COLUMNS,
    NORMALISATION_FACTORS,
    POINT_SMB_COLUMNS,
    TOTAL_SMB_COLUMNS,
    replace_folder,
    write_csv,
    write_facies,
    write_normalisation_factors,
    write_yearly,
)
from dataloader.prepare import climate as climate_sources
from dataloader.prepare import observations
from dataloader.prepare.facies import facies_fields
from dataloader.prepare.grid import grid_around
from dataloader.prepare.outlines import (
    icemapper_footprint,
    icemapper_masks,
    masks_for_years,
    rasterise_outline,
    read_vector_outline,
)
from dataloader.prepare.terrain import dem_fields


@dataclass(frozen=True)
class Sources:
    """The user's input files (paths as given). Exactly one of ``outlines`` and
    ``outline_rasters`` is set."""

    dem: Path
    temperature: Path
    precipitation: Path
    orography: Path
    outlines: Path | None = None
    outline_ids: tuple[str, ...] = ()
    outline_name: str | None = None
    outline_rasters: dict[int, Path] = field(default_factory=dict)  # year -> ICEmapper GeoTIFF
    glacier_wide: Path | None = None
    points: Path | None = None
    profile: Path | None = None
    facies: tuple[tuple[np.datetime64, Path, Path | None], ...] = ()  # (scene date, classes, confidence)

    def files(self) -> list[Path]:
        paths = [self.dem, self.temperature, self.precipitation, self.orography, self.outlines,
                 *self.outline_rasters.values(), self.glacier_wide, self.points, self.profile]
        for _, classes, confidence in self.facies:
            paths += [classes, confidence]
        paths = [Path(p) for p in paths if p is not None]
        if self.outlines is not None:  # a shapefile is several files
            stem = Path(self.outlines)
            paths += [stem.with_suffix(s) for s in (".shx", ".dbf", ".prj", ".cpg") if stem.suffix == ".shp"
                      and stem.with_suffix(s).exists()]
        return paths


@dataclass(frozen=True)
class Options:
    """How to prepare: the years, the season dates, the grid and the index.csv fields."""

    first_year: int = constants.initialisation_period_start_year
    last_year: int | None = None          # default: the last balance year the climate covers
    balance_year_dates: str | None = None  # "MM-DD,MM-DD,MM-DD": begin, midseason, end
    monthly_climate: bool = False
    fold: int = constants.test_fold
    region: str = "ALP"
    wgms_name: str | None = None
    epsg: int | None = None
    margin_m: float = 500.0
    outline_threshold: float = 0.5


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _say(verbose: bool, text: str) -> None:
    if verbose:
        print(text, flush=True)


def _years(climate, latitude: float, options: Options) -> np.ndarray:
    """first_year … last_year, checked against the climate period."""
    if options.first_year != constants.initialisation_period_start_year:
        raise ValueError(
            f"--first_year {options.first_year}: the published models spin up from "
            f"{constants.initialisation_period_start_year} (docs/data_format.md), so the layout starts there")
    last_day = np.datetime64(climate.last_day, "D")
    first_day = np.datetime64(climate.first_day, "D")
    candidates = np.arange(options.first_year, int(str(last_day)[:4]) + 2)
    dates = observations.balance_year_dates(candidates, latitude, options.balance_year_dates)
    covered = candidates[dates["end_date"].to_numpy().astype("datetime64[D]") <= last_day]
    if dates["begin_date"].iloc[0] < pd.Timestamp(first_day) or covered.size == 0:
        raise DataError(climate.paths["temperature"], "variable time",
                        f"covers {first_day} … {last_day}, expected at least "
                        f"{dates['begin_date'].iloc[0].date()} … {dates['end_date'].iloc[0].date()} "
                        f"(balance year {options.first_year})")
    last_year = int(covered[-1]) if options.last_year is None else options.last_year
    if last_year > covered[-1]:
        raise DataError(climate.paths["temperature"], "variable time",
                        f"ends on {last_day}, before the end of balance year {last_year} (--last_year); "
                        f"the last balance year it covers is {covered[-1]}")
    if last_year < constants.study_period_start_year:
        raise ValueError(f"--last_year {last_year}: the study period starts in "
                         f"{constants.study_period_start_year}")
    return np.arange(options.first_year, last_year + 1, dtype=np.int32)


def _outline(sources: Sources, options: Options):
    """(grid, years -> (Y, H, W) masks, diagnostics) from the vector outline or the ICEmapper rasters."""
    if (sources.outlines is None) == (not sources.outline_rasters):
        raise ValueError("give either --outlines (a vector file) or --outline_rasters (ICEmapper GeoTIFFs)")
    if sources.outlines is not None:
        outline, info = read_vector_outline(sources.outlines, ids=list(sources.outline_ids) or None,
                                            name=sources.outline_name)
        grid = grid_around(outline, epsg=options.epsg, margin_m=options.margin_m)
        mask = rasterise_outline(outline, grid)
        return grid, lambda years: np.broadcast_to(mask, (years.size, *mask.shape)), info
    outline = icemapper_footprint(sources.outline_rasters, threshold=options.outline_threshold)
    grid = grid_around(outline, epsg=options.epsg, margin_m=options.margin_m)
    masks = icemapper_masks(sources.outline_rasters, grid, threshold=options.outline_threshold)
    info = {"icemapper_years": sorted(int(y) for y in masks), "threshold": options.outline_threshold,
            "glacier_cells_per_raster": {int(y): int(m.sum()) for y, m in sorted(masks.items())}}
    return grid, lambda years: masks_for_years(masks, years), info


def _index_rows(path: Path, row: dict) -> list[dict]:
    """The rows of ``index.csv`` with ``row`` added or replacing the row of the same name."""
    rows = []
    if path.exists():
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        missing = [c for c in INDEX_COLUMNS if c not in table.columns]
        if missing:
            raise DataError(path, f"columns {missing}", f"are missing (found {list(table.columns)})")
        rows = [r for r in table[list(INDEX_COLUMNS)].to_dict("records") if r["name"] != row["name"]]
    return rows + [row]


def prepare_glacier(data_folder: str | os.PathLike, name: str, sources: Sources,
                    options: Options = Options(), verbose: bool = True) -> dict:
    """Write ``<data_folder>/<name>/`` in the published layout, its ``index.csv`` row and, if
    absent, ``normalisation_factors.pkl``. Returns the provenance record (also written as
    ``<name>/provenance.json``)."""
    data_folder = Path(data_folder)
    if not name or name != name.strip() or any(c in name for c in "/\\\n") or name.startswith("."):
        raise ValueError(f"glacier name {name!r}: expected a plain folder name")
    for path in sources.files():
        if not Path(path).is_file():
            raise DataError(path, None, "is missing (input file)")
    start = time.perf_counter()
    data_folder.mkdir(parents=True, exist_ok=True)
    tmp = data_folder / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        provenance = _prepare(tmp, name, sources, options, verbose)
        provenance["seconds"] = round(time.perf_counter() - start, 2)
        (tmp / "provenance.json").write_text(json.dumps(provenance, indent=1, default=str) + "\n")
        _say(verbose, "checking that the prepared files load ...")
        info = reader.GlacierInfo(**{k: provenance["index"][k] for k in INDEX_COLUMNS})
        reader.read_glacier(tmp, info, dict(NORMALISATION_FACTORS))
        replace_folder(tmp, data_folder / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    index = data_folder / "index.csv"
    index_tmp = data_folder / f".index.csv.tmp-{os.getpid()}"
    try:
        write_csv(index_tmp, [(c, None) for c in INDEX_COLUMNS], _index_rows(index, provenance["index"]))
        index_tmp.replace(index)
        factors = data_folder / "normalisation_factors.pkl"
        if not factors.exists():
            factors_tmp = data_folder / f".normalisation_factors.pkl.tmp-{os.getpid()}"
            write_normalisation_factors(factors_tmp)
            factors_tmp.replace(factors)
    finally:
        for leftover in data_folder.glob(f".*.tmp-{os.getpid()}"):
            leftover.unlink()
    _say(verbose, f"{name}: prepared in {data_folder / name} ({provenance['seconds']:.1f} s)")
    return provenance


def _prepare(folder: Path, name: str, sources: Sources, options: Options, verbose: bool) -> dict:
    t0 = time.perf_counter()
    # The outline fixes the grid; the climate fixes the years. Both are checked before any
    # large file is written.
    grid, masks_for, outline_info = _outline(sources, options)
    climate = climate_sources.open_climate(sources.temperature, sources.precipitation, sources.orography,
                                           monthly=options.monthly_climate)
    lon, lat = grid.lonlat()
    latitude = float(lat[grid.height // 2, grid.width // 2])
    years = _years(climate, latitude, options)
    masks = np.ascontiguousarray(masks_for(years), dtype=np.float32)
    _say(verbose, f"{name}: grid {grid.height} × {grid.width} cells of 100 m, EPSG:{grid.epsg}, "
                  f"{int(masks[-1].sum())} glacier cells in {years[-1]}; years {years[0]}–{years[-1]}")

    z, zstddev, dem_info = dem_fields(sources.dem, grid)
    z_years = np.broadcast_to(z, masks.shape)

    glacier_wide, obs_info = None, {}
    if sources.glacier_wide is not None:
        glacier_wide, obs_info["glacier_wide"] = observations.read_glacier_wide(
            sources.glacier_wide, int(years[0]), int(years[-1]))
    dates = observations.balance_year_dates(years, latitude, options.balance_year_dates)
    total_smb = observations.total_smb_table(years, dates, glacier_wide)
    dates = pd.DataFrame(total_smb)[["year", "begin_date", "midseason_date", "end_date"]]

    points = []
    if sources.points is not None:
        rows, obs_info["points"] = observations.read_points(sources.points, int(years[0]), int(years[-1]),
                                                            dates)
        points += rows
    if sources.profile is not None:
        rows, obs_info["profile"] = observations.profile_pseudo_stakes(sources.profile, years, dates, z_years,
                                                                       masks, lon, lat)
        points += rows

    first_date = np.datetime64(pd.Timestamp(dates["begin_date"].iloc[0]).date(), "D")
    last_date = np.datetime64(pd.Timestamp(dates["end_date"].iloc[-1]).date(), "D")
    _say(verbose, f"{name}: writing the daily climate {first_date} … {last_date} ...")
    climate_info = climate_sources.write_climate(folder, climate, grid.x, grid.y, grid.epsg, lon, lat,
                                                 first_date, last_date)
    write_yearly(folder / "dem.nc", {
        "z": ({"units": "m", "long_name": "surface elevation"}, z_years),
        "zstddev": ({"units": "m", "long_name": "standard deviation of elevation within the cell"},
                    np.broadcast_to(zstddev, masks.shape)),
    }, years, grid.x, grid.y, grid.epsg)
    write_yearly(folder / "outlines.nc", {"outlines": ({"units": "1", "long_name": "glacier mask"}, masks)},
                 years, grid.x, grid.y, grid.epsg)
    write_csv(folder / "total_smb.csv", TOTAL_SMB_COLUMNS, total_smb)
    if points:
        write_csv(folder / "point_smb.csv", POINT_SMB_COLUMNS, points)

    facies_info = None
    if sources.facies:
        year_of = _year_of_date(dates)
        masks_by_year = {int(y): masks[k] for k, y in enumerate(years)}
        facies_years, facies, facies_info = facies_fields(list(sources.facies), grid, year_of, masks_by_year)
        write_facies(folder / "facies.nc", facies_years, facies, grid.x, grid.y, grid.epsg)

    outline_area = outline_info.get("area_km2")
    mask_area = float(masks[-1].sum()) * 0.01
    index_row = {"name": name, "wgms_name": options.wgms_name or name.upper(), "fold": int(options.fold),
                 "region": options.region, "max_year": int(years[-1]), "height": grid.height,
                 "width": grid.width}
    return {
        "name": name,
        "index": index_row,
        "grid": {"epsg": grid.epsg, "x_left": grid.x_left, "y_top": grid.y_top, "height": grid.height,
                 "width": grid.width, "cell_m": 100.0},
        "inputs": {str(p): {"sha256": _sha256(Path(p)), "bytes": Path(p).stat().st_size}
                   for p in sources.files()},
        "options": {k: v for k, v in dataclasses.asdict(options).items()},
        "diagnostics": {
            "glacier_area_km2": {"mask_last_year": round(mask_area, 4),
                                 "outline": None if outline_area is None else round(float(outline_area), 4)},
            "outline": outline_info,
            "dem": dem_info,
            "climate": climate_info,
            "observations": obs_info,
            "facies": facies_info,
            "seconds_before_check": round(time.perf_counter() - t0, 2),
        },
        "software": {"glaunti": _version(), "python": sys.version.split()[0]},
    }


def _year_of_date(dates: pd.DataFrame):
    """date -> the balance year whose [begin_date, end_date] contains it (the later one where
    consecutive years share a boundary day), or None."""
    begins = dates["begin_date"].to_numpy().astype("datetime64[D]")
    ends = dates["end_date"].to_numpy().astype("datetime64[D]")
    years = dates["year"].to_numpy()

    def year_of(date) -> int | None:
        date = np.datetime64(date, "D")
        inside = np.flatnonzero((begins <= date) & (date <= ends))
        return int(years[inside[-1]]) if inside.size else None

    return year_of


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("glaunti")
    except Exception:  # not installed (running from a checkout)
        return "unknown"
