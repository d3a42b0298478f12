"""A whole region in one command: every glacier of an outline file (or of a catchment) prepared,
run with the published (or calibrated) models, evaluated against WGMS where linked, and
assembled into one product. docs/region.md describes the outputs and options.

Phases, each resumable (finished work is kept when its key, a checksum of its inputs and
options, matches):

1. selection (main process): the outlines, their WGMS links, the region manifest
   ``OUT_DIR/region.json`` (a rerun with other inputs or options is refused);
2. preparation, one task per glacier: the own-glacier path (``dataloader.prepare``) into a
   staging data folder, then moved into ``OUT_DIR/data/<id>``; a glacier that cannot be
   prepared is skipped with its reason;
3. inference, one task per shape class of the whole region (``core.execute.sets.GlacierSet``'s CPU plan,
   fixed by the glaciers alone, so results do not depend on the number of workers):
   ``core.workflows.infer_many`` streams each glacier's daily SMB into :class:`SummarySink`, which
   reduces it in memory to a small summary file (``OUT_DIR/work/<model>/<id>.npz``); the daily
   maps are written only with ``maps``;
4. assembly (main process), streaming one glacier at a time: ``region.nc``, ``glaciers.csv``,
   ``mean_annual_smb.tif``, ``region.png``.

Tasks run in this process, or on a Dask cluster (a local one of spawned worker processes, or a
running scheduler); they write their files to OUT_DIR and return small dicts, never arrays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import constants
from core.apps.cli import one_line
from core.apps.own_glacier import finish_annual_series
from core.evaluate.metrics import metrics, season_window
from core.execute.distributed import temporary_environ
from core.infer.calendar import BatchCalendar
from core.infer.netcdf import TERM_ATTRS
from core.io import atomic_path, atomic_write_json, atomic_write_text
from core.models import published_params_path
from dataloader.errors import DataError
from dataloader.prepare.climate import MONTHLY_WARNING
from glaunti.layouts import inference_layout
from glaunti.ti_model import TERMS

FORMAT_VERSION = 1
CELL_KM2 = 0.01  # one 100 m cell
NODATA = -9999.0
# A glacier-wide balance (m w.e.) over an area (km²) in Gt: 1 m w.e. = 1000 kg m⁻², 1 km² = 1e6 m².
GT_PER_M_KM2 = 1e-3
# ... and in m³ of water: 1 m w.e. over 1 km² is 1e6 m³.
M3_PER_M_KM2 = 1e6
MODELS = "abcd"


@dataclass(frozen=True)
class RegionSources:
    """The region's input files (paths as given). ``wgms_links``: the RGI–WGMS link table
    (columns WGMS_ID, RGI50_ID or RGI60_ID); ``wgms_folder``: ``mbdata_WGMS-NNNNN.csv`` and
    ``profile_WGMS-NNNNN.csv``; ``within``: a polygon file (e.g. a catchment)."""

    outlines: Path
    dem: Path
    temperature: Path
    precipitation: Path
    orography: Path
    wgms_links: Path | None = None
    wgms_folder: Path | None = None
    within: Path | None = None


@dataclass(frozen=True)
class RegionOptions:
    """What to run: the selection, the own-glacier options, the models and their weights."""

    outline_ids: tuple[str, ...] = ()
    min_area_km2: float = 0.0
    first_year: int = constants.initialisation_period_start_year
    last_year: int | None = None
    monthly_climate: bool = False
    epsg: int | None = None
    margin_m: float = 500.0
    models: str = "d"
    params_paths: dict = field(default_factory=dict)  # model -> calibrated weights; default: published
    maps: bool = False
    region: str = "ALP"  # index.csv's region code (informational)


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _say(verbose: bool, text: str) -> None:
    if verbose:
        print(text, flush=True)


# ---------------------------------------------------------------------------------------------
# 1. Selection
# ---------------------------------------------------------------------------------------------

def _field(frame, candidates, path, what) -> str:
    for column in candidates:
        if column in frame.columns:
            return column
    raise DataError(path, f"columns {list(frame.columns)}", f"hold no {what} field, expected one of "
                                                           f"{list(candidates)}")


def read_links(path: Path) -> dict[str, int]:
    """RGI id -> WGMS id from the published link table (RGI 5 or 6 ids)."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as error:
        raise DataError(path, None, f"could not be read as CSV ({error})") from error
    rgi_columns = [c for c in ("RGI50_ID", "RGI60_ID", "RGI_ID") if c in table.columns]
    if "WGMS_ID" not in table.columns or not rgi_columns:
        raise DataError(path, f"columns {list(table.columns)}",
                        "lack WGMS_ID and RGI50_ID/RGI60_ID, expected the RGI–WGMS link table")
    links = {}
    for i, row in table.iterrows():
        try:
            wgms = int(row["WGMS_ID"])
        except ValueError:
            raise DataError(path, f"WGMS_ID row {i + 2}", f"is {row['WGMS_ID']!r}, expected an integer") from None
        for column in rgi_columns:
            if row[column].strip():
                links[row[column].strip()] = wgms
    return links


def select_outlines(sources: RegionSources, options: RegionOptions) -> list[dict]:
    """One dict per selected outline, sorted by id: ``id``, ``name``, ``outline_area_km2``,
    ``lon``/``lat`` (centroid), and where linked ``wgms_id``, ``wgms_name``, ``glacier_wide``,
    ``profile`` (files, for a glacier the RGI defines as WGMS's) or ``wgms_part_of`` (the WGMS
    glacier's RGI id, for a part of a glacier the outline file divides)."""
    import shapely

    from dataloader.prepare.outlines import ID_FIELDS, NAME_FIELDS, equal_area_km2, read_vector

    path = Path(sources.outlines)
    frame = read_vector(path)
    id_field = _field(frame, ID_FIELDS, path, "outline id")
    name_field = next((c for c in NAME_FIELDS if c in frame.columns), None)
    frame = frame.to_crs(4326)
    ids = frame[id_field].astype(str).str.strip()
    if ids.duplicated().any():
        raise DataError(path, f"field {id_field}", f"repeats ids {sorted(set(ids[ids.duplicated()]))}, "
                                                   "expected one outline per id")
    chosen = np.ones(len(frame), dtype=bool)
    if options.outline_ids:
        unknown = sorted(set(options.outline_ids) - set(ids))
        if unknown:
            raise DataError(path, f"field {id_field}", f"has no outline {unknown} (--outline_id)")
        chosen &= ids.isin(options.outline_ids).to_numpy()
    geometries = shapely.make_valid(frame.geometry.to_numpy())
    centroids = shapely.centroid(geometries)
    if sources.within is not None:
        within = read_vector(Path(sources.within)).to_crs(4326)
        area = shapely.union_all(shapely.make_valid(within.geometry.to_numpy()))
        chosen &= shapely.contains(area, centroids)
    links = read_links(Path(sources.wgms_links)) if sources.wgms_links is not None else {}
    folder = Path(sources.wgms_folder) if sources.wgms_folder is not None else None
    outlines = []
    for i in np.flatnonzero(chosen):
        area_km2 = equal_area_km2(geometries[i])
        if area_km2 < options.min_area_km2:
            continue
        name = "" if name_field is None else str(frame[name_field].iloc[i] or "").strip()
        # RGI 5's attribute tables hold a one-character placeholder for glaciers without a name.
        outline = {"id": ids.iloc[i], "name": name if len(name) > 1 else "",
                   "outline_area_km2": round(area_km2, 4),
                   "lon": float(centroids[i].x), "lat": float(centroids[i].y)}
        base = outline["id"].split("_d")[0]  # RGI 5 divides some glaciers: <id>_d01, <id>_d02, ...
        wgms = links.get(outline["id"], links.get(base))
        if wgms is not None:
            outline["wgms_id"] = wgms
            records = {}
            if folder is not None:
                for kind in ("mbdata", "profile"):
                    candidate = folder / f"{kind}_WGMS-{wgms:05d}.csv"
                    if candidate.is_file():
                        records[kind] = str(candidate)
            if outline["id"] in links:
                outline["glacier_wide"] = records.get("mbdata")
                outline["profile"] = records.get("profile")
            else:
                outline["wgms_part_of"] = base
                outline["wgms_mbdata"] = records.get("mbdata")
            if records.get("mbdata"):
                outline["wgms_name"] = _wgms_name(Path(records["mbdata"]))
        outlines.append(outline)
    return sorted(outlines, key=lambda o: o["id"])


def _wgms_name(mbdata: Path) -> str | None:
    try:
        names = pd.read_csv(mbdata, dtype=str, usecols=["NAME"])["NAME"].dropna().str.strip()
    except (ValueError, OSError):
        return None
    return names.iloc[0] if len(names) else None


def check_shared_inputs(sources: RegionSources, options: RegionOptions) -> None:
    """Inputs every glacier needs are opened once here: a file that does not open or has wrong
    units stops the region at once, with the own-glacier path's one-line error."""
    from dataloader.prepare.climate import open_climate
    from dataloader.prepare.grid import open_raster

    for path in (sources.dem, sources.temperature, sources.precipitation, sources.orography):
        if not Path(path).is_file():
            raise DataError(path, None, "is missing (input file)")
    with open_raster(sources.dem):
        pass
    open_climate(sources.temperature, sources.precipitation, sources.orography,
                 monthly=options.monthly_climate).close()
    if sources.wgms_folder is not None and not Path(sources.wgms_folder).is_dir():
        raise DataError(sources.wgms_folder, None, "is not a folder (--wgms_folder)")


def _source_files(sources: RegionSources) -> dict[str, Path]:
    files = {k: Path(v) for k, v in dataclasses.asdict(sources).items()
             if v is not None and k != "wgms_folder"}
    for key in ("outlines", "within"):
        if key in files and files[key].suffix == ".shp":  # a shapefile is several files
            for suffix in (".shx", ".dbf", ".prj", ".cpg"):
                if files[key].with_suffix(suffix).exists():
                    files[f"{key}{suffix}"] = files[key].with_suffix(suffix)
    return files


def manifest(sources: RegionSources, options: RegionOptions, outlines: list[dict]) -> dict:
    """What the product is made of: inputs with checksums, options, models and weights, the
    selected outlines. Two runs with equal manifests make the same product."""
    models = {}
    for model in options.models:
        params = Path(options.params_paths.get(model) or published_params_path(model))
        if not params.is_file():
            raise DataError(params, None, f"is missing (weights of model {model.upper()})")
        models[model] = {"params": str(params), "sha256": _sha256(params)}
    records = sorted({p for o in outlines for k in ("glacier_wide", "profile", "wgms_mbdata")
                      if (p := o.get(k))})
    return {
        "format": FORMAT_VERSION,
        "inputs": {k: {"path": str(p), "sha256": _sha256(p)} for k, p in _source_files(sources).items()},
        "records": {p: _sha256(p) for p in records},
        "options": {k: v for k, v in dataclasses.asdict(options).items() if k not in ("models", "params_paths")},
        "models": models,
        "outlines": [o["id"] for o in outlines],
    }


def _comparable(m: dict) -> dict:
    """A manifest without the paths (the same files named differently make the same product),
    as JSON holds it (tuples are lists)."""
    m = json.loads(json.dumps(m, default=str))
    return {"format": m["format"], "inputs": {k: v["sha256"] for k, v in m["inputs"].items()},
            "records": sorted(m["records"].values()), "options": m["options"],
            "models": {k: v["sha256"] for k, v in m["models"].items()}, "outlines": m["outlines"]}


def claim_out_dir(out_dir: Path, current: dict) -> None:
    """Write ``OUT_DIR/region.json``, or check that the one there is this product's: a rerun
    continues the same product; other inputs or options are refused (a new OUT_DIR starts a
    new product)."""
    path = out_dir / "region.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
            before = _comparable(old)
        except (ValueError, KeyError) as error:
            raise DataError(path, None, f"is not a region manifest ({error}); give a new OUT_DIR") from None
        now = _comparable(current)
        if before != now:
            changed = sorted(k for k in now if now[k] != before.get(k))
            detail = [f"{k}: {before['options'].get(k)!r} -> {now['options'][k]!r}"
                      for k in now["options"] if now["options"][k] != before["options"].get(k)]
            raise ValueError(f"{path}: this OUT_DIR holds a product made with other {', '.join(changed)}"
                             f"{' (' + '; '.join(detail) + ')' if detail else ''}; rerun the same "
                             "command to continue it, or give a new OUT_DIR")
        # Same product: keep the manifest as first written (its paths may differ in spelling only).
        return
    atomic_write_json(path, current)


# ---------------------------------------------------------------------------------------------
# 2. Preparation (a task per glacier)
# ---------------------------------------------------------------------------------------------

def _marker(out_dir: Path, kind: str, name: str) -> Path:
    return out_dir / "work" / kind / f"{name}.json"


def _reuse(path: Path, key: str) -> dict | None:
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except ValueError:
        return None
    return result if result.get("key") == key else None


def prepare_task(out_dir: str, outline: dict, common: dict) -> dict:
    """Prepare one glacier into ``OUT_DIR/data/<id>`` (a Dask task; also run in-process).
    Returns its status dict: ``status`` "done" (with the prepared area, grid and elevation range)
    or "skipped" with ``reason`` (the one-line error of the own-glacier path). Errors other than
    bad data (a bug, a full disk) propagate."""
    from dataloader.layout import replace_folder
    from dataloader.prepare.glacier import Options, Sources, prepare_glacier

    out_dir, name = Path(out_dir), outline["id"]
    key = _key([common["key"], outline])
    marker = _marker(out_dir, "prepared", name)
    done = _reuse(marker, key)
    if done is not None and (done["status"] != "done" or (out_dir / "data" / name / "provenance.json").exists()):
        return done
    staging = out_dir / "work" / "staging" / name
    shutil.rmtree(staging, ignore_errors=True)  # a killed run's half preparation
    s, o = common["sources"], common["options"]
    result = {"id": name, "key": key}
    outline = dict(outline)
    ended = _records_end(outline.get("glacier_wide"))
    if ended is not None and ended < o["first_year"]:
        # Records that end before the modelled period (Langtaler Ferner: 1963–1970) cannot be
        # compared, but the glacier can be modelled: it is prepared without them.
        result["records_left_out"] = f"WGMS records end in {ended}, before {o['first_year']}"
        outline["glacier_wide"] = outline["profile"] = None
    sources = Sources(outlines=Path(s["outlines"]), outline_ids=(name,), dem=Path(s["dem"]),
                      temperature=Path(s["temperature"]), precipitation=Path(s["precipitation"]),
                      orography=Path(s["orography"]),
                      glacier_wide=Path(outline["glacier_wide"]) if outline.get("glacier_wide") else None,
                      profile=Path(outline["profile"]) if outline.get("profile") else None)
    options = Options(first_year=o["first_year"], last_year=o["last_year"], monthly_climate=o["monthly_climate"],
                      epsg=o["epsg"], margin_m=o["margin_m"],
                      wgms_name=outline.get("wgms_name") or name.upper(), region=o["region"])
    t0 = time.perf_counter()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            provenance = prepare_glacier(staging, name, sources, options, verbose=False)
    except (DataError, ValueError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        result.update(status="skipped", reason=one_line(error))
        atomic_write_json(marker, result)
        return result
    finally:
        # The monthly-climate warning was printed once for the region (check_shared_inputs).
        rest = captured.getvalue().replace(MONTHLY_WARNING + "\n", "")
        if rest:
            print(rest, end="", file=sys.stderr)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    replace_folder(staging / name, out_dir / "data" / name)
    shutil.rmtree(staging, ignore_errors=True)
    area = provenance["diagnostics"]["glacier_area_km2"]
    result.update(status="done", area_km2=area["mask_last_year"], index=provenance["index"],
                  grid=provenance["grid"], seconds=round(time.perf_counter() - t0, 2))
    atomic_write_json(marker, result)
    return result


def _records_end(path) -> int | None:
    """The last year of a glacier-wide record file (WGMS ``YEAR`` or published ``year``), None
    if it has none that reads (the preparation then reports the file)."""
    if not path:
        return None
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        column = "YEAR" if "YEAR" in table.columns else "year"
        return int(pd.to_numeric(table[column], errors="raise").max())
    except (OSError, ValueError, KeyError, pd.errors.ParserError):
        return None


def write_index(out_dir: Path, prepared: list[dict]) -> None:
    """``OUT_DIR/data/index.csv`` of the prepared glaciers (written here only: tasks never share
    a file) and the published normalisation factors."""
    from dataloader.layout import INDEX_COLUMNS, write_csv, write_normalisation_factors

    data = out_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = [p["index"] for p in prepared if p["status"] == "done"]
    with atomic_path(data / "index.csv") as tmp:
        write_csv(tmp, [(c, None) for c in INDEX_COLUMNS], rows)
    if not (data / "normalisation_factors.pkl").exists():
        with atomic_path(data / "normalisation_factors.pkl") as tmp:
            write_normalisation_factors(tmp)


# ---------------------------------------------------------------------------------------------
# 3. Inference (a task per shape class)
# ---------------------------------------------------------------------------------------------

def shape_classes(data_folder: Path, names: list[str], model_name: str, params: str) -> list[list[str]]:
    """The glaciers in groups that share a compiled function: the shape classes of the CPU plan
    of the whole set (``core.execute.sets.GlacierSet``). The plan depends on the glaciers only, so the
    groups, and each glacier's numbers, are the same for any number of workers."""
    from core.execute.sets import GlacierSet
    from core.models import load_model, uses_facies
    from dataloader import Dataset

    layout = inference_layout(load_model(model_name, params))
    if layout is None:
        return [[n] for n in names]
    glacier_set = GlacierSet(Dataset(data_folder), names, uses_facies(model_name), layout=layout,
                             batch_bytes=1, target="cpu")
    classes: dict[tuple, list[int]] = {}
    for batch in glacier_set.batches():
        classes.setdefault((batch.key, batch.grid), []).extend(batch.indices)
    return [[names[i] for i in sorted(members)] for members in classes.values()]


def _summary_path(out_dir: Path, model: str, name: str) -> Path:
    return out_dir / "work" / model / f"{name}.npz"


def infer_task(out_dir: str, model: str, params: str, names: list[str], keys: dict[str, str],
               latitudes: dict[str, float], maps: bool) -> list[dict]:
    """Run ``model`` on one shape class of glaciers (a Dask task; also run in-process) and reduce
    each glacier's daily SMB, as it streams out of the model, to its summary file
    (:class:`GlacierSummary`); the daily maps are written only with ``maps``. Returns
    ``{"id", "mean_annual"}`` per glacier."""
    # Each task is one independent process's work: never a jax.distributed group, even inside
    # a SLURM job whose variables would start one (core.distributed.setup). A Dask worker is one
    # thread: Dask spreads the classes over workers, not XLA over cores.
    settings = {"GLAUNTI_DISTRIBUTED": "0"}
    if _on_dask_worker() and not os.environ.get("GLAUNTI_CPU_DEVICES"):
        settings["GLAUNTI_CPU_DEVICES"] = "1"
    with temporary_environ(settings):
        return _infer_task(Path(out_dir), model, params, names, keys, latitudes, maps)


def _infer_task(out_dir: Path, model: str, params: str, names: list[str], keys: dict[str, str],
                latitudes: dict[str, float], maps: bool) -> list[dict]:
    from core.infer.netcdf import BatchFiles
    from core.workflows import infer_many

    if not all(_summary_fresh(_summary_path(out_dir, model, n), keys[n]) for n in names):
        # A class is rerun whole, so that a glacier's numbers never depend on which of its
        # class's glaciers a killed run had finished.
        map_paths = {n: out_dir / "maps" / model / f"{n}.nc" for n in names}
        summaries: dict[str, dict] = {}

        def open_sink(model_object, batch, tensors):
            batch_names = [names[i] for i in batch.indices]
            files = (BatchFiles(tensors, [map_paths[n] for n in batch_names], model, model_object.TERMS)
                     if maps else None)
            return SummarySink(tensors, batch_names, [latitudes[n] for n in batch_names],
                               bool(model_object.TERMS), summaries, files)

        def done(batch, tensors):
            for i in batch.indices:
                with atomic_path(_summary_path(out_dir, model, names[i])) as tmp, open(tmp, "wb") as f:
                    np.savez(f, key=keys[names[i]], **summaries.pop(names[i]))

        if maps:
            map_paths[names[0]].parent.mkdir(parents=True, exist_ok=True)
            for path in map_paths.values():  # a killed run's half-written maps (the class's only writer)
                for stale in path.parent.glob(f".{path.name}.*.tmp"):
                    stale.unlink()
        _summary_path(out_dir, model, names[0]).parent.mkdir(parents=True, exist_ok=True)
        infer_many(model, names, open_sink, done, params_path=params, data_folder=out_dir / "data")
    out = []
    for name in names:
        with np.load(_summary_path(out_dir, model, name)) as z:
            out.append({"id": name, "mean_annual": float(np.mean(z["annual"]))})
    return out


def _on_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


def _summary_fresh(path: Path, key: str) -> bool:
    if not path.exists():
        return False
    try:
        with np.load(path) as z:
            return str(z["key"]) == key
    except (OSError, ValueError, KeyError):
        return False


class GlacierSummary:
    """The glacier-wide numbers of one glacier's daily SMB, built as its final calendar days
    stream in (:meth:`add`; at most about two balance years of maps are held).

    :meth:`result` gives: ``first_date`` (datetime64[D] of ``daily[0]``), ``daily`` (T,)
    glacier-wide SMB (m w.e. d⁻¹; each year's days over that year's mask), ``years`` (Y,) the
    study years, ``annual``/``winter``/``summer`` (Y,) m w.e. (annual as
    ``core.evaluate.metrics.evaluate`` sums it: inclusive window, float32; winter/summer: the
    record's seasons where it has them, else the hemisphere's default midseason date splitting
    the year), ``mean_map`` (H, W) mean annual SMB (NaN off the last year's glacier), ``x`` (W,),
    ``y`` (H,), ``crs_wkt``, ``area_km2``, ``z_min``, ``z_max`` (m, glacier cells of the last
    year); for a model with day terms also ``terms`` (T, 3): the glacier-wide snowfall, rainfall
    and melt (m w.e. d⁻¹, ``glaunti.ti_model.TERMS``)."""

    def __init__(self, tensors, latitude: float):
        from dataloader.prepare.observations import balance_year_dates

        self.tensors = tensors
        self.study = np.flatnonzero(tensors.study)
        self.years = np.asarray(tensors.years)[self.study]
        self.defaults = balance_year_dates(self.years, latitude)
        self.annual, self.winter, self.summer = (np.full(len(self.study), np.nan, np.float32) for _ in range(3))
        self.totals = np.zeros((len(tensors.y), len(tensors.x)), np.float64)
        self.first_day, self.n_days, self.done = None, 0, 0
        self.held, self.held_day = [], None  # final days not yet summarised, from held_day on
        self.daily_years: list[tuple[int, np.ndarray]] = []  # (first day, glacier-wide SMB) per year
        self.terms: list[np.ndarray] = []

    def add(self, day: int, smb: np.ndarray, terms: np.ndarray | None = None) -> None:
        """The final daily SMB (n, H, W) of the days from ``day`` on, and their day terms."""
        if self.first_day is None:
            self.first_day = self.held_day = day
        self.held.append(smb)
        self.n_days += len(smb)
        if terms is not None:
            self.terms.append(terms)
        self._summarise_finished_years()

    def _summarise_finished_years(self) -> None:
        tensors = self.tensors
        held = None
        while self.done < len(self.study):
            j, k = self.done, int(self.study[self.done])
            begin, end = season_window(tensors, k, "annual")
            if end >= self.first_day + self.n_days:
                break
            if held is None:
                held = np.concatenate(self.held) if len(self.held) > 1 else self.held[0]
            block = held[begin - self.held_day:end - self.held_day + 1]  # (L, H, W) float32
            mask = np.asarray(tensors.outlines[k], dtype=np.float32)
            area = mask.sum()
            self.daily_years.append((begin, np.tensordot(block, mask, axes=2) / area))
            self.annual[j] = (block.sum(axis=0) * mask).sum() / area
            if tensors.seasonal[k]:
                (wb, we), (sb, se) = season_window(tensors, k, "winter"), season_window(tensors, k, "summer")
            else:
                mid = int((np.datetime64(self.defaults["midseason_date"].iloc[j].date(), "D") - tensors.first_date)
                          .astype(int))
                (wb, we), (sb, se) = (begin, mid - 1), (mid, end)  # winter + summer = annual
            self.winter[j] = (block[wb - begin:we - begin + 1].sum(axis=0) * mask).sum() / area
            self.summer[j] = (block[sb - begin:se - begin + 1].sum(axis=0) * mask).sum() / area
            self.totals += block.sum(axis=0, dtype=np.float64)
            self.done += 1
            # Keep the days from the next year's first on (it may share this year's last day);
            # days not modelled between two years (zeros on the calendar) are still to come.
            keep = (int(season_window(tensors, int(self.study[self.done]), "annual")[0])
                    if self.done < len(self.study) else end + 1)
            keep = min(keep, self.first_day + self.n_days)
            held = held[keep - self.held_day:]
            self.held, self.held_day = [held], keep

    def result(self) -> dict[str, np.ndarray]:
        tensors = self.tensors
        if self.done != len(self.study):
            raise RuntimeError(f"{tensors.name}: the daily SMB ended before balance year "
                               f"{int(self.years[self.done])} was complete")
        daily = np.full(self.n_days, np.nan)
        for begin, values in self.daily_years:  # a later year's mask wins on a shared day
            daily[begin - self.first_day:begin - self.first_day + len(values)] = values
        last = np.asarray(tensors.outlines[-1]) >= 0.5
        mean_map = (self.totals / len(self.study)).astype(np.float32)
        mean_map[~last] = np.nan
        z = np.asarray(tensors.elevation[-1])[last]
        terms = {"terms": np.concatenate(self.terms).astype(np.float32)} if self.terms else {}
        return {"first_date": np.datetime64(tensors.first_date + np.timedelta64(self.first_day, "D"), "D"),
                "daily": daily, "years": self.years.astype(np.int32), "annual": self.annual,
                "winter": self.winter, "summer": self.summer, "mean_map": mean_map,
                "x": np.asarray(tensors.x), "y": np.asarray(tensors.y), "crs_wkt": np.asarray(tensors.crs_wkt),
                "area_km2": np.float64(last.sum() * CELL_KM2), "z_min": np.float32(z.min()),
                "z_max": np.float32(z.max()), **terms}


class SummarySink:
    """The consumer of a batch's years (``core.infer.runner.run_batches``): each glacier's days
    placed on its calendar (``core.infer.calendar.BatchCalendar``) and summarised as they become
    final (:class:`GlacierSummary`), and, given ``files`` (``BatchFiles``), also written as daily
    maps. On a clean close each glacier's summary (:meth:`GlacierSummary.result`) is put in
    ``results`` under its name."""

    def __init__(self, tensors, names, latitudes, terms: bool, results: dict, files=None):
        self.tensors, self.names, self.results, self.files = list(tensors), list(names), results, files
        self.calendar = BatchCalendar(self.tensors, terms)
        self.summaries = [GlacierSummary(t, lat) for t, lat in zip(self.tensors, latitudes)]

    def __enter__(self) -> SummarySink:
        if self.files is not None:
            self.files.__enter__()
        return self

    def add(self, k: int, series: np.ndarray, terms: np.ndarray | None = None) -> None:
        for i, day, smb, day_terms in self.calendar.add(k, series, terms):
            self.summaries[i].add(day, smb, day_terms)
        if self.files is not None:
            self.files.add(k, series, terms)

    def __exit__(self, kind, value, traceback):
        if kind is None:
            try:
                for i, day, smb, day_terms in self.calendar.finish():
                    self.summaries[i].add(day, smb, day_terms)
                for name, summary in zip(self.names, self.summaries):
                    self.results[name] = summary.result()
            except BaseException as err:
                if self.files is not None:
                    self.files.__exit__(type(err), err, err.__traceback__)
                raise
        if self.files is not None:
            self.files.__exit__(kind, value, traceback)
        return False


# ---------------------------------------------------------------------------------------------
# Running tasks: in this process or on Dask
# ---------------------------------------------------------------------------------------------

class Runner:
    """Runs tasks in this process (``workers`` 0, no scheduler), on a local Dask cluster of
    ``workers`` spawned processes with one thread each, or on the Dask scheduler at
    ``scheduler``. A context manager (the local cluster is closed on exit)."""

    def __init__(self, workers: int = 0, scheduler: str | None = None, verbose: bool = True):
        self.workers, self.scheduler, self.verbose = workers, scheduler, verbose
        self.client = self.cluster = None

    def __enter__(self) -> Runner:
        if self.scheduler or self.workers:
            import dask
            from distributed import Client, LocalCluster

            if self.scheduler:
                self.client = Client(self.scheduler)
            else:
                # JAX runs threads of its own: a forked child of a process that started them
                # can deadlock, so workers are spawned (Dask's default, made explicit).
                dask.config.set({"distributed.worker.multiprocessing-method": "spawn"})
                # silence_logs: the nanny's notes (e.g. that it ends a worker still running JAX's
                # threads at shutdown) are not the user's concern; errors still show.
                self.cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                            dashboard_address=None, silence_logs=logging.ERROR)
                self.client = Client(self.cluster)
        return self

    def __exit__(self, *exc) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def map(self, fn, args: list[tuple], description: str) -> list:
        """``[fn(*a) for a in args]``, in order; a task's exception is raised here (the
        other tasks are cancelled)."""
        from tqdm import tqdm

        bar = tqdm(total=len(args), desc=description, disable=not self.verbose, unit="task")
        try:
            if self.client is None:
                results = []
                for a in args:
                    results.append(fn(*a))
                    bar.update()
                return results
            from distributed import as_completed

            # pure=False: a task writes files, so Dask must run it even where arguments repeat.
            # A task lost with its worker is rescheduled by Dask (distributed.scheduler.allowed-failures).
            futures = [self.client.submit(fn, *a, pure=False) for a in args]
            try:
                for future in as_completed(futures):
                    future.result()  # raises the task's exception, with its traceback
                    bar.update()
            except BaseException:
                self.client.cancel(futures)
                raise
            return [f.result() for f in futures]
        finally:
            bar.close()


# ---------------------------------------------------------------------------------------------
# 4. Assembly
# ---------------------------------------------------------------------------------------------

def _code_version() -> str:
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[2], timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    try:
        from importlib.metadata import version

        package = version("glaunti")
    except Exception:  # not installed (running from a checkout)
        package = "unknown"
    return f"glaunti {package}" + (f", git {commit}" if commit else "")


def _wgms_comparisons(out_dir: Path, outlines: list[dict], done: set[str], models: str,
                      first_year: int, last_year: int | None) -> list[dict]:
    """Per WGMS glacier and model: observed and modelled annual balances (m w.e.) and their
    metrics. A WGMS glacier that the outline file divides is compared as the area-weighted mean
    of its parts' specific balances (all parts must be done)."""
    from dataloader.prepare.observations import read_glacier_wide

    groups: dict[int, list[dict]] = {}
    for o in outlines:
        if "wgms_id" in o:
            groups.setdefault(o["wgms_id"], []).append(o)
    out = []
    for wgms, parts in sorted(groups.items()):
        mbdata = parts[0].get("glacier_wide") or parts[0].get("wgms_mbdata")
        ids = [p["id"] for p in parts]
        entry = {"wgms_id": wgms, "name": parts[0].get("wgms_name") or ids[0], "ids": ids}
        if not mbdata:
            entry["reason"] = "no mbdata file in --wgms_folder"
        elif any(i not in done for i in ids):
            entry["reason"] = f"not every part done ({', '.join(i for i in ids if i not in done)})"
        if "reason" in entry:
            out.append(entry)
            continue
        with np.load(_summary_path(out_dir, models[0], ids[0])) as z:
            modelled_years = (int(z["years"][0]), int(z["years"][-1]))
        try:
            observed, _ = read_glacier_wide(mbdata, first_year, modelled_years[1])
        except DataError:  # records outside the modelled period: nothing to compare
            ended = _records_end(mbdata)
            entry["reason"] = (f"no WGMS year within the modelled {modelled_years[0]}–{modelled_years[1]}"
                               + (f" (records end in {ended})" if ended is not None else ""))
            out.append(entry)
            continue
        observed = dict(zip(observed["year"].astype(int), observed["annual_balance"].astype(float)))
        for model in models:
            weighted, total_area, years = None, 0.0, None
            for i in ids:
                with np.load(_summary_path(out_dir, model, i)) as z:
                    years, area = z["years"], float(z["area_km2"])
                    weighted = z["annual"] * area if weighted is None else weighted + z["annual"] * area
                    total_area += area
            modelled = weighted / total_area
            pairs = [(observed[y], float(m)) for y, m in zip(years.tolist(), modelled)
                     if y in observed and np.isfinite(observed[y])]
            entry[model] = {"years": [int(y) for y, m in zip(years.tolist(), modelled)
                                      if y in observed and np.isfinite(observed[y])],
                            "observed": [p[0] for p in pairs], "modelled": [p[1] for p in pairs],
                            "metrics": metrics([p[0] for p in pairs], [p[1] for p in pairs])}
        out.append(entry)
    return out


def write_region_netcdf(path: Path, out_dir: Path, done: list[dict], outlines: dict[str, dict],
                        region_manifest: dict, models: str) -> None:
    """``region.nc`` (CF-1.8), streamed one glacier at a time: the daily and seasonal glacier-wide
    balances per model and glacier, the glaciers' attributes, the regional series."""
    import netCDF4

    names = [d["id"] for d in done]
    starts, ends, all_years = [], [], set()
    for name in names:
        with np.load(_summary_path(out_dir, models[0], name)) as z:
            first = np.datetime64(z["first_date"].item(), "D")
            starts.append(first)
            ends.append(first + np.timedelta64(len(z["daily"]) - 1, "D"))
            all_years.update(z["years"].tolist())
    origin, stop = min(starts), max(ends)
    n_days = int((stop - origin).astype(int)) + 1
    years = np.array(sorted(all_years), dtype=np.int32)
    year_at = {int(y): i for i, y in enumerate(years)}
    n_models, n_glaciers = len(models), len(names)
    regional_daily = np.zeros((n_models, n_days))
    regional_terms = np.zeros((n_models, n_days, len(TERMS)))  # m w.e. d⁻¹ × km²
    model_has_terms = np.zeros((n_models, 1), bool)
    regional_annual = np.zeros((n_models, len(years)))
    daily_area = np.zeros((n_models, n_days))
    annual_area = np.zeros((n_models, len(years)))

    with atomic_path(path) as tmp:
        with netCDF4.Dataset(tmp, "w", format="NETCDF4") as nc:
            nc.createDimension("model", n_models)
            nc.createDimension("glacier", n_glaciers)
            nc.createDimension("time", n_days)
            nc.createDimension("year", len(years))
            nc.title = "GlaUnTI regional glacier surface mass balance"
            nc.Conventions = "CF-1.8"
            nc.institution = "GlaUnTI (run_region.py)"
            nc.source = _code_version()
            nc.history = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} run_region.py"
            nc.models = models.upper()
            for model in models:
                setattr(nc, f"weights_{model}", region_manifest["models"][model]["params"])
                setattr(nc, f"weights_{model}_sha256", region_manifest["models"][model]["sha256"])
            nc.inputs = json.dumps(region_manifest["inputs"])
            nc.wgms_records = json.dumps(region_manifest["records"])
            nc.options = json.dumps(region_manifest["options"])
            nc.comment = ("Glacier-wide values are means over each year's glacier cells (100 m grid); "
                          "regional values are area-weighted over the glaciers of this file. Days shared "
                          "by two model periods hold the sum of both half-weighted values.")
            crs = nc.createVariable("crs", "i4")
            crs.setncatts({"grid_mapping_name": "latitude_longitude", "longitude_of_prime_meridian": 0.0,
                           "semi_major_axis": 6378137.0, "inverse_flattening": 298.257223563,
                           "crs_wkt": 'GEOGCRS["WGS 84",ID["EPSG",4326]]', "epsg_code": "EPSG:4326"})

            def var(name, dtype, dims, attrs, fill=None, **kw):
                v = nc.createVariable(name, dtype, dims, fill_value=fill, **kw)
                v.setncatts(attrs)
                return v

            model_var = var("model", str, ("model",), {"long_name": "GlaUnTI model"})
            model_var[:] = np.array([m.upper() for m in models], dtype=object)
            glacier_var = var("glacier", str, ("glacier",),
                              {"long_name": "outline id (RGI)", "cf_role": "timeseries_id"})
            glacier_var[:] = np.array(names, dtype=object)
            t = var("time", "i4", ("time",), {"standard_name": "time", "axis": "T", "long_name": "day",
                                               "units": f"days since {origin}", "calendar": "proleptic_gregorian"})
            t[:] = np.arange(n_days, dtype=np.int32)
            y = var("year", "i4", ("year",), {"long_name": "balance year (labelled by the year it ends in)",
                                               "units": "1"})
            y[:] = years
            fields = {
                "name": (str, {"long_name": "glacier name"}),
                "wgms_id": ("i4", {"long_name": "WGMS id (-1: not linked)", "units": "1"}),
                "area": ("f8", {"long_name": "glacier area of the 100 m mask (last year)", "units": "km2"}),
                "outline_area": ("f8", {"long_name": "area of the outline (equal-area projection)", "units": "km2"}),
                "z_min": ("f4", {"long_name": "lowest glacier cell", "units": "m"}),
                "z_max": ("f4", {"long_name": "highest glacier cell", "units": "m"}),
                "lon": ("f8", {"standard_name": "longitude", "long_name": "outline centroid longitude",
                               "units": "degrees_east"}),
                "lat": ("f8", {"standard_name": "latitude", "long_name": "outline centroid latitude",
                               "units": "degrees_north"}),
            }
            glacier_vars = {k: var(k, d, ("glacier",), a) for k, (d, a) in fields.items()}
            coordinates = {"coordinates": "lat lon", "grid_mapping": "crs"}
            smb = var("smb", "f4", ("model", "glacier", "time"),
                      {"long_name": "glacier-wide daily surface mass balance", "units": "m d-1",
                       "comment": "metres of water equivalent per day", **coordinates}, np.float32(np.nan),
                      zlib=True, shuffle=True, complevel=4, chunksizes=(1, 1, min(n_days, 4096)))
            term_vars = [var(name, "f4", ("model", "glacier", "time"),
                             {"long_name": f"glacier-wide daily {name}", "units": "m d-1",
                              "comment": f"metres of water equivalent per day; {TERM_ATTRS[name][1]}; "
                                         "NaN for a model without a TI step (B)", **coordinates},
                             np.float32(np.nan), zlib=True, shuffle=True, complevel=4,
                             chunksizes=(1, 1, min(n_days, 4096)))
                         for name in TERMS]
            seasonal = {}
            for season in ("annual", "winter", "summer"):
                seasonal[season] = var(f"{season}_balance", "f4", ("model", "glacier", "year"),
                                       {"long_name": f"glacier-wide {season} balance", "units": "m",
                                        "comment": "metres of water equivalent", **coordinates},
                                       np.float32(np.nan))
            for i, name in enumerate(names):
                o = outlines[name]
                for m, model in enumerate(models):
                    with np.load(_summary_path(out_dir, model, name)) as z:
                        offset = int((np.datetime64(z["first_date"].item(), "D") - origin).astype(int))
                        daily = z["daily"]
                        smb[m, i, offset:offset + len(daily)] = daily.astype(np.float32)
                        area = float(z["area_km2"])
                        if "terms" in z:
                            model_has_terms[m] = True
                            terms = z["terms"]
                            for j, term_var in enumerate(term_vars):
                                term_var[m, i, offset:offset + len(daily)] = terms[:, j]
                            ok = np.isfinite(terms).all(axis=1)
                            regional_terms[m, offset:offset + len(daily)][ok] += terms[ok] * area
                        columns = [year_at[int(v)] for v in z["years"]]
                        for season in seasonal:
                            row = np.full(len(years), np.nan, dtype=np.float32)
                            row[columns] = z[season]
                            seasonal[season][m, i, :] = row
                        finite = np.isfinite(daily)
                        regional_daily[m, offset:offset + len(daily)][finite] += daily[finite] * area
                        daily_area[m, offset:offset + len(daily)][finite] += area
                        regional_annual[m, columns] += z["annual"].astype(np.float64) * area
                        annual_area[m, columns] += area
                        if m == 0:
                            glacier_vars["area"][i] = area
                            glacier_vars["z_min"][i] = z["z_min"]
                            glacier_vars["z_max"][i] = z["z_max"]
                glacier_vars["name"][i] = o.get("wgms_name") or o["name"]
                glacier_vars["wgms_id"][i] = o.get("wgms_id", -1)
                glacier_vars["outline_area"][i] = o["outline_area_km2"]
                glacier_vars["lon"][i] = o["lon"]
                glacier_vars["lat"][i] = o["lat"]
            with np.errstate(invalid="ignore", divide="ignore"):
                specific_daily = regional_daily / daily_area
                specific_annual = regional_annual / annual_area
            var("regional_smb", "f8", ("model", "time"),
                {"long_name": "regional area-weighted daily surface mass balance", "units": "m d-1",
                 "comment": "metres of water equivalent per day"}, np.nan)[:] = specific_daily
            var("regional_mass_change", "f8", ("model", "time"),
                {"long_name": "regional daily glacier mass change", "units": "Gt d-1"}, np.nan
                )[:] = regional_daily * GT_PER_M_KM2
            var("regional_annual_balance", "f8", ("model", "year"),
                {"long_name": "regional area-weighted annual balance", "units": "m",
                 "comment": "metres of water equivalent"}, np.nan)[:] = specific_annual
            var("regional_annual_mass_change", "f8", ("model", "year"),
                {"long_name": "regional annual glacier mass change", "units": "Gt"}, np.nan
                )[:] = regional_annual * GT_PER_M_KM2
            for name, long_name, term in (("melt_water_volume", "regional daily melt-water volume", "melt"),
                                          ("rainfall_volume", "regional daily rainfall on the glaciers", "rainfall")):
                j = TERMS.index(term)
                var(f"regional_{name}", "f8", ("model", "time"),
                    {"long_name": long_name, "units": "m3 d-1",
                     "comment": "cubic metres of water per day over the glaciers with a value "
                                "(glacier-wide daily value times the glacier's area); NaN for model B"},
                    np.nan)[:] = np.where(model_has_terms, regional_terms[..., j] * M3_PER_M_KM2, np.nan)
            var("regional_area", "f8", ("model", "year"),
                {"long_name": "area of the glaciers with a value", "units": "km2"})[:] = annual_area


def mosaic_grid(out_dir: Path, names: list[str], model: str, epsg: int | None, lon: float, lat: float):
    """(CRS, transform, height, width) of the common 100 m grid holding every glacier: ``epsg``,
    or the UTM zone of the region's centre; edges on multiples of 100 m."""
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.warp import transform_bounds

    from dataloader.prepare.grid import utm_epsg

    target = CRS.from_epsg(epsg or utm_epsg(lon, lat))
    bounds = []
    for name in names:
        with np.load(_summary_path(out_dir, model, name)) as z:
            x, y = z["x"], z["y"]
            crs = CRS.from_wkt(str(z["crs_wkt"]))
        box = (x[0] - 50, y[-1] - 50, x[-1] + 50, y[0] + 50)
        bounds.append(box if crs == target else transform_bounds(crs, target, *box, densify_pts=21))
    b = np.array(bounds)
    left, bottom = math.floor(b[:, 0].min() / 100) * 100, math.floor(b[:, 1].min() / 100) * 100
    right, top = math.ceil(b[:, 2].max() / 100) * 100, math.ceil(b[:, 3].max() / 100) * 100
    return target, Affine(100.0, 0.0, left, 0.0, -100.0, top), int(round((top - bottom) / 100)), \
        int(round((right - left) / 100))


def write_mosaic(path: Path, out_dir: Path, names: list[str], model: str, epsg: int | None,
                 lon: float, lat: float) -> None:
    """``mean_annual_smb.tif``: every glacier's mean annual SMB (m w.e. a⁻¹) on the common grid,
    NODATA off glacier; written window by window (memory does not grow with the glaciers)."""
    import rasterio
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.warp import Resampling, reproject
    from rasterio.windows import Window

    crs, transform, height, width = mosaic_grid(out_dir, names, model, epsg, lon, lat)
    profile = {"driver": "GTiff", "height": height, "width": width, "count": 1, "dtype": "float32",
               "crs": crs, "transform": transform, "nodata": NODATA, "compress": "deflate",
               "tiled": True, "blockxsize": 256, "blockysize": 256}
    if height < 256 or width < 256:
        profile.update(tiled=False, blockxsize=None, blockysize=None)
        profile = {k: v for k, v in profile.items() if v is not None}
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w+", **profile) as dst:
            dst.write(np.full((height, width), NODATA, dtype=np.float32), 1)
            for name in names:
                with np.load(_summary_path(out_dir, model, name)) as z:
                    field, x, y = z["mean_map"], z["x"], z["y"]
                    source_crs = CRS.from_wkt(str(z["crs_wkt"]))
                if source_crs == crs:
                    col = int(round((x[0] - 50 - transform.c) / 100))
                    row = int(round((transform.f - (y[0] + 50)) / 100))
                    window = Window(col, row, field.shape[1], field.shape[0])
                    piece = field
                else:
                    source = Affine(100.0, 0.0, x[0] - 50, 0.0, -100.0, y[0] + 50)
                    piece = np.full((height, width), np.nan, dtype=np.float32)
                    reproject(field, piece, src_transform=source, src_crs=source_crs, dst_transform=transform,
                              dst_crs=crs, resampling=Resampling.nearest, src_nodata=np.nan, dst_nodata=np.nan)
                    rows, cols = np.nonzero(np.isfinite(piece))
                    if not rows.size:
                        continue
                    window = Window(cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)
                    piece = piece[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
                current = dst.read(1, window=window)
                # Neighbouring glaciers' grids overlap in their margins only: fill glacier cells.
                fill = np.isfinite(piece) & (current == NODATA)
                current[fill] = piece[fill]
                dst.write(current, 1, window=window)
            dst.update_tags(units="m w.e. a-1", model=model.upper(),
                            description="mean annual surface mass balance over the study years")
            dst.set_band_description(1, f"mean annual SMB, model {model.upper()} (m w.e. a-1)")


def write_glaciers_csv(path: Path, outlines: list[dict], prepared: dict[str, dict], means: dict,
                       comparisons: list[dict], models: str) -> pd.DataFrame:
    """``glaciers.csv``: one row per selected outline (status, reason, areas, mean annual
    balance and the WGMS comparison per model)."""
    by_id = {i: c for c in comparisons for i in c["ids"]}
    rows = []
    for o in outlines:
        p = prepared[o["id"]]
        row = {"id": o["id"], "name": o.get("wgms_name") or o["name"], "outline_area_km2": o["outline_area_km2"],
               "area_km2": p.get("area_km2"), "status": p["status"], "reason": p.get("reason", ""),
               "wgms_id": o.get("wgms_id", ""), "note": p.get("records_left_out", "")}
        comparison = by_id.get(o["id"])
        row["wgms_compared_as"] = "" if comparison is None else (
            comparison.get("reason") or ("area-weighted " + " + ".join(comparison["ids"])
                                         if len(comparison["ids"]) > 1 else "this glacier"))
        for model in models:
            row[f"mean_annual_balance_{model}"] = means.get((model, o["id"]))
            m = (comparison or {}).get(model, {}).get("metrics", {})
            row[f"wgms_n_{model}"] = m.get("n", "")
            row[f"wgms_r_{model}"] = m.get("pearson_r", "")
            row[f"wgms_rmse_{model}"] = m.get("rmse", "")
            row[f"wgms_bias_{model}"] = m.get("bias", "")
        rows.append(row)
    frame = pd.DataFrame(rows)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.4f")
    return frame


def plot_region(path: Path, out_dir: Path, outlines_path: Path, done: list[str], comparisons: list[dict],
                models: str) -> None:
    """``region.png``: the mosaic with the outlines, the regional annual balance per model, and
    the WGMS glaciers observed against modelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyogrio
    import rasterio

    fig, (ax_map, ax_series, ax_wgms) = plt.subplots(1, 3, figsize=(17, 5.2),
                                                     gridspec_kw={"width_ratios": [1.2, 1, 1]})
    with rasterio.open(out_dir / "mean_annual_smb.tif") as src:
        step = max(1, math.ceil(max(src.height, src.width) / 2000))  # a large region is drawn coarser
        field = src.read(1, out_shape=(src.height // step, src.width // step), masked=True).filled(np.nan)
        b = src.bounds
        crs = src.crs
    # The colour scale of most cells: a few cells of a steep tongue would wash out the rest.
    limit = float(np.nanpercentile(np.abs(field), 99)) if np.isfinite(field).any() else 1.0
    image = ax_map.imshow(field, cmap="RdBu", vmin=-limit, vmax=limit, extent=(b.left, b.right, b.bottom, b.top))
    frame = pyogrio.read_dataframe(outlines_path)
    id_column = next(c for c in frame.columns if frame[c].astype(str).isin(done).any())
    frame[frame[id_column].astype(str).isin(done)].to_crs(crs).boundary.plot(ax=ax_map, color="k", lw=0.4)
    fig.colorbar(image, ax=ax_map, label="mean annual SMB (m w.e. a$^{-1}$)", shrink=0.8)
    ax_map.set_title(f"{len(done)} glaciers, model {models[-1].upper()}, mean of the study years", fontsize=10)
    ax_map.ticklabel_format(style="plain")
    ax_map.tick_params(labelsize=7)
    ax_map.set_xlabel(f"easting (m, {crs.to_string()})", fontsize=8)

    import xarray as xr

    with xr.open_dataset(out_dir / "region.nc") as ds:
        for m, model in enumerate(models):
            ax_series.plot(ds["year"], ds["regional_annual_balance"][m], "-o", ms=3, label=model.upper())
    finish_annual_series(ax_series, "regional annual balance (m w.e.)", "area-weighted over the region's glaciers")

    lo, hi = 0.0, 0.0
    for c, comparison in enumerate(x for x in comparisons if models[-1] in x):
        entry = comparison[models[-1]]
        if not entry["observed"]:
            continue
        m = entry["metrics"]
        label = f"{comparison['name']} (n={m['n']}" + (f", r={m['pearson_r']:.2f})" if m["n"] > 1 else ")")
        ax_wgms.scatter(entry["observed"], entry["modelled"], s=14, color=f"C{c}", label=label)
        lo, hi = min(lo, *entry["observed"], *entry["modelled"]), max(hi, *entry["observed"], *entry["modelled"])
    ax_wgms.plot([lo, hi], [lo, hi], color="0.5", lw=0.8)
    ax_wgms.set_xlabel("WGMS annual balance (m w.e.)")
    ax_wgms.set_ylabel(f"model {models[-1].upper()} (m w.e.)")
    ax_wgms.set_title("WGMS glaciers, observed against modelled", fontsize=10)
    if ax_wgms.get_legend_handles_labels()[0]:
        ax_wgms.legend(fontsize=7)
    ax_wgms.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def wgms_table(comparisons: list[dict], models: str) -> str:
    """The WGMS glaciers' annual r / RMSE / bias per model, as text."""
    lines = [f"{'WGMS glacier':<22} {'id':>5} {'model':>5} {'n':>3} {'r':>6} {'RMSE':>6} {'bias':>6}  outlines"]
    for c in comparisons:
        if "reason" in c:
            lines.append(f"{c['name']:<22} {c['wgms_id']:>5}   not compared: {c['reason']}")
            continue
        for model in models:
            m = c[model]["metrics"]
            if m["n"] < 2:
                lines.append(f"{c['name']:<22} {c['wgms_id']:>5} {model.upper():>5} {m['n']:>3}")
                continue
            lines.append(f"{c['name']:<22} {c['wgms_id']:>5} {model.upper():>5} {m['n']:>3} {m['pearson_r']:>6.2f} "
                         f"{m['rmse']:>6.2f} {m['bias']:>+6.2f}  {' + '.join(c['ids'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The whole region
# ---------------------------------------------------------------------------------------------

def run_region(out_dir, sources: RegionSources, options: RegionOptions = RegionOptions(), workers: int = 0,
               scheduler: str | None = None, verbose: bool = True) -> dict:
    """Prepare, run, evaluate and assemble every selected glacier into ``out_dir``; returns a
    summary dict (``done``, ``skipped`` {id: reason}, ``comparisons``, ``seconds`` per phase,
    ``outputs``). Raises ValueError when no glacier could be done."""
    out_dir = Path(out_dir)
    seconds = {}
    t0 = time.perf_counter()
    bad = [m for m in options.models if m not in MODELS]
    if bad or not options.models:
        raise ValueError(f"--models {options.models!r}: expected letters among {MODELS!r}")
    check_shared_inputs(sources, options)
    outlines = select_outlines(sources, options)
    if not outlines:
        raise DataError(sources.outlines, None, "has no outline left after the selection "
                                                "(--outline_id, --within, --min_area_km2)")
    region_manifest = manifest(sources, options, outlines)
    out_dir.mkdir(parents=True, exist_ok=True)
    claim_out_dir(out_dir, region_manifest)
    seconds["select"] = time.perf_counter() - t0
    _say(verbose, f"{len(outlines)} outlines selected from {sources.outlines}; "
                  f"{sum('wgms_id' in o for o in outlines)} linked to WGMS")

    common = {"key": _key(_comparable(region_manifest)),
              "sources": {k: str(v) for k, v in dataclasses.asdict(sources).items() if v is not None},
              "options": dataclasses.asdict(options)}
    with Runner(workers, scheduler, verbose) as runner:
        if runner.client is not None:
            import jax

            # Only the workers compute: this process plans and assembles, and must not take
            # an accelerator's memory from them.
            jax.config.update("jax_platforms", "cpu")
        t = time.perf_counter()
        results = runner.map(prepare_task, [(str(out_dir), o, common) for o in outlines], "preparing")
        seconds["prepare"] = time.perf_counter() - t
        prepared = {r["id"]: r for r in results}
        done = [r for r in results if r["status"] == "done"]
        skipped = {r["id"]: r["reason"] for r in results if r["status"] != "done"}
        if not done:
            raise ValueError(f"{sources.outlines}: none of the {len(outlines)} selected glaciers could be "
                             f"prepared (first reason: {next(iter(skipped.values()))})")
        write_index(out_dir, done)
        names = [d["id"] for d in done]
        by_id = {o["id"]: o for o in outlines}
        latitudes = {n: by_id[n]["lat"] for n in names}
        t = time.perf_counter()
        means = {}
        for model in options.models:
            params = region_manifest["models"][model]["params"]
            keys = {n: _key([prepared[n]["key"], model, region_manifest["models"][model]["sha256"]]) for n in names}
            classes = shape_classes(out_dir / "data", names, model, params)
            _say(verbose, f"model {model.upper()}: {len(names)} glaciers in {len(classes)} shape classes")
            for group in runner.map(infer_task, [(str(out_dir), model, params, c, {n: keys[n] for n in c},
                                                  latitudes, options.maps) for c in classes],
                                    f"model {model.upper()}"):
                for g in group:
                    means[(model, g["id"])] = g["mean_annual"]
        seconds["infer"] = time.perf_counter() - t

    t = time.perf_counter()
    comparisons = _wgms_comparisons(out_dir, outlines, set(names), options.models, options.first_year,
                                    options.last_year)
    write_region_netcdf(out_dir / "region.nc", out_dir, done, by_id, region_manifest, options.models)
    lon = float(np.mean([by_id[n]["lon"] for n in names]))
    lat = float(np.mean([by_id[n]["lat"] for n in names]))
    write_mosaic(out_dir / "mean_annual_smb.tif", out_dir, names, options.models[-1], options.epsg, lon, lat)
    table = write_glaciers_csv(out_dir / "glaciers.csv", outlines, prepared, means, comparisons, options.models)
    atomic_write_json(out_dir / "wgms.json", comparisons)
    plot_region(out_dir / "region.png", out_dir, Path(sources.outlines), names, comparisons, options.models)
    seconds["assemble"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    with np.load(_summary_path(out_dir, options.models[0], names[0])) as z:
        n_days, n_years = len(z["daily"]), len(z["years"])
    work = {"glaciers": len(names), "skipped": len(skipped), "models": options.models,
            "workers": workers, "scheduler": bool(scheduler),
            # Study-period work of every model (the spin-up years come on top: 5 of 29 here).
            "glacier_years": len(names) * n_years * len(options.models),
            "cell_days": sum(prepared[n]["grid"]["height"] * prepared[n]["grid"]["width"] for n in names)
            * n_days * len(options.models),
            "seconds": {k: round(v, 2) for k, v in seconds.items()}}
    atomic_write_json(out_dir / "timings.json", work)
    text = wgms_table(comparisons, options.models)
    done_area = float(table.loc[table.status == "done", "area_km2"].sum())
    rgi_area = float(table.loc[table.status == "done", "outline_area_km2"].sum())
    summary_line = (f"{len(done)} of {len(outlines)} glaciers done ({done_area:.2f} km² of mask against "
                    f"{rgi_area:.2f} km² of outlines, {100 * (done_area / rgi_area - 1):+.1f} %), "
                    f"{len(skipped)} skipped")
    atomic_write_text(out_dir / "summary.txt", summary_line + "\n" + "\n".join(
        f"  skipped {k}: {v}" for k, v in skipped.items()) + "\n\n" + text + "\n")
    _say(verbose, "\n" + text)
    for name, reason in skipped.items():
        _say(verbose, f"skipped {name}: {reason}")
    _say(verbose, f"{summary_line}; outputs in {out_dir}/ ({seconds['total']:.0f} s: "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total") + ")")
    return {"done": names, "skipped": skipped, "comparisons": comparisons, "seconds": seconds,
            "outputs": {k: out_dir / k for k in ("region.nc", "glaciers.csv", "mean_annual_smb.tif", "region.png")},
            "area_km2": done_area, "outline_area_km2": rgi_area, "table": text}


# The bundled example (examples/oetztal/README.md: sources and attribution).
OETZTAL = Path(__file__).resolve().parents[2] / "examples" / "oetztal" / "sources"


def oetztal_sources(within_rofental: bool = False) -> RegionSources:
    """The bundled Oetztal inputs: the 20 RGI 5 outlines, SRTM, ERA5-Land monthly, the WGMS
    records of Hintereis-, Kesselwand-, Vernagt- and Langtaler Ferner and their links; with
    ``within_rofental`` only the outlines whose centroid lies in the Rofental catchment."""
    return RegionSources(
        outlines=OETZTAL / "rgi_oetztal.shp", dem=OETZTAL / "srtm_oetztal.tif",
        temperature=OETZTAL / "sel_era5_land_monthly_t2m_1981-2018.nc",
        precipitation=OETZTAL / "sel_era5_land_monthly_prcp_1981-2018.nc",
        orography=OETZTAL / "sel_era5_land_invariant.nc",
        wgms_links=OETZTAL / "rgi_wgms_links_20170217_RGIV5_oetztal.csv", wgms_folder=OETZTAL,
        within=OETZTAL / "rofental_hydrosheds.shp" if within_rofental else None)


def run_oetztal(out_dir, models: str = "d", workers: int | None = None, verbose: bool = True) -> dict:
    """The real part of ``make demo``: every Oetztal outline with the published ``models``
    (:func:`run_region` on :func:`oetztal_sources`). ``workers`` None: a local Dask cluster of
    two workers where there are two cores (in one process a shape class runs at a time, on one
    device; docs/performance.md), else this process."""
    if workers is None:
        workers = 2 if (os.cpu_count() or 1) >= 2 else 0
    return run_region(out_dir, oetztal_sources(), RegionOptions(monthly_climate=True, models=models),
                      workers=workers, verbose=verbose)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use run_region.py")
