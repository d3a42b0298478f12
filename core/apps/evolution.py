"""Glacier evolution driven by GlaUnTI: OGGM flowline dynamics with GlaUnTI's mass balance, and
OGGM's own monthly temperature-index model side by side (docs/evolution.md).

The workflow (:func:`evolve`), for a glacier prepared in the published layout:
1. GlaUnTI's daily SMB for every balance year (the prepared glacier; for a projection a copy
   prepared from the reanalysis extended by a GCM with the delta method,
   :mod:`core.apps.projection_climate`), reduced to SMB–elevation relations
   (:mod:`core.apps.smb_elevation`);
2. an OGGM glacier directory from the outline and the local DEM, elevation-band flowlines, the
   ice-thickness inversion from the apparent mass balance of the GlaUnTI relations over the
   historical years, the present-day glacier, and the dynamical run from the outline's year to
   ``until`` with GlaUnTI's mass balance;
3. the same with OGGM's ``MonthlyTIModel`` calibrated (``mb_calibration_from_scalar_mb``) on the
   mean observed glacier-wide balance of the same historical years, driven by the same monthly
   climate in OGGM's custom-climate format;
4. ``evolution.nc`` (volume, area, length per year and model), ``evolution.png`` and
   ``summary.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from core.apps import projection_climate as pc
from core.apps.oggm_offline import import_oggm
from core.apps.smb_elevation import SMBElevation, mass_balance_model_class, monthly_sums, reduce_fields
from core.io import atomic_path, atomic_write_json
from core.models import published_params_path
from core.workflows import infer_and_evaluate
from dataloader.errors import DataError

MODELS = ("glaunti", "oggm_ti")
DEFAULT_REFERENCE = (1981, 2010)
REPORT_YEARS = (2018, 2050, 2100)
PRCP_FAC = 2.5


@dataclass(frozen=True)
class EvolutionInputs:
    """What :func:`evolve` needs. ``outline_ids`` of several parts are merged into one outline."""

    data_folder: Path
    name: str
    outlines: Path
    outline_ids: tuple[str, ...]
    dem: Path
    model: str = "d"
    params_path: Path | None = None
    until: int | None = None
    gcm_temperature: Path | None = None
    gcm_precipitation: Path | None = None
    reference_period: tuple[int, int] = DEFAULT_REFERENCE
    start_year: int | None = None  # default: the year after the outline's date


def _say(verbose: bool, text: str) -> None:
    if verbose:
        print(text, flush=True)


def read_provenance(data_folder: Path, name: str) -> dict:
    path = Path(data_folder) / name / "provenance.json"
    if not path.exists():
        raise DataError(path, None, "not found: prepare the glacier with prepare_glacier.py first "
                                    "(the evolution reads its climate sources from there)")
    provenance = json.loads(path.read_text())
    sources = provenance.get("diagnostics", {}).get("climate", {}).get("sources")
    if not sources or not all(k in sources for k in ("temperature", "precipitation", "orography")):
        raise DataError(path, "field 'diagnostics.climate.sources'",
                        "missing: expected the temperature, precipitation and orography files")
    return provenance


def observed_annual(data_folder: Path, name: str) -> pd.Series:
    """Observed glacier-wide annual balances (m w.e.) by balance year, from total_smb.csv."""
    path = Path(data_folder) / name / "total_smb.csv"
    table = pd.read_csv(path)
    if "annual_balance" not in table or "year" not in table:
        raise DataError(path, "columns 'year', 'annual_balance'", "missing")
    return table.set_index("year")["annual_balance"].dropna()


def relation_from_smb(smb_path: Path, data_folder: Path, name: str) -> SMBElevation:
    """GlaUnTI's daily SMB file reduced to SMB–elevation relations, study year by study year."""
    from dataloader import Dataset

    tensors = Dataset(data_folder).glacier(name)
    study = np.flatnonzero(tensors.study)
    fields = []
    with xr.open_dataset(smb_path) as ds:
        dates = ds["time"].values.astype("datetime64[D]")
        for k in study:
            begin = tensors.first_date + np.timedelta64(int(tensors.begin_day[k]), "D")
            end = tensors.first_date + np.timedelta64(int(tensors.end_day[k]), "D")
            inside = (dates >= begin) & (dates <= end)
            daily = ds["smb"][np.flatnonzero(inside)].to_numpy()
            fields.append(monthly_sums(daily, dates[inside], [begin], [end])[0])
    return reduce_fields(tensors.years[study], np.stack(fields), np.asarray(tensors.outlines)[study],
                         np.asarray(tensors.elevation)[study])


def _outline_frame(path: Path, ids: tuple[str, ...]):
    """The RGI outline(s) ``ids`` as one row (parts dissolved; the first part's attributes)."""
    import geopandas as gpd

    frame = gpd.read_file(path)
    if "RGIId" not in frame:
        raise DataError(path, "column 'RGIId'", "missing: OGGM needs RGI-formatted outlines")
    rows = frame[frame["RGIId"].isin(ids)]
    missing = set(ids) - set(rows["RGIId"])
    if missing or not ids:
        raise DataError(path, "column 'RGIId'", f"has no outline {', '.join(sorted(missing)) or '(none given)'}")
    rows = rows.to_crs("EPSG:4326")
    if len(rows) > 1:
        merged = rows.iloc[[0]].copy()
        merged["geometry"] = [rows.geometry.union_all()]
        merged["Area"] = float(rows["Area"].sum())
        rows = merged
    return rows


def _flowlines(gdir, tasks) -> None:
    # With cfg.PATHS["dem_file"] set, define_glacier_region reads the user's DEM (no download).
    for task in (tasks.define_glacier_region, tasks.simple_glacier_masks, tasks.elevation_band_flowline,
                 tasks.fixed_dx_elevation_band_flowline, tasks.compute_downstream_line,
                 tasks.compute_downstream_bedshape):
        task(gdir)


def _invert(gdir, tasks) -> float:
    """Inversion from the apparent MB already on the flowlines; the present glacier; m³."""
    tasks.prepare_for_inversion(gdir)
    volume = float(tasks.mass_conservation_inversion(gdir))
    tasks.filter_inversion_output(gdir)
    tasks.init_present_time_glacier(gdir)
    return volume


def _glacier_dir(cfg, workflow, frame, folder: Path):
    cfg.PATHS["working_dir"] = str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return workflow.init_glacier_directories(frame, reset=True, force=True)[0]


def evolve(inputs: EvolutionInputs, out_dir: Path, verbose: bool = True) -> dict:
    """Run the workflow (module docstring); returns the summary written to ``summary.json``."""
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    provenance = read_provenance(inputs.data_folder, inputs.name)
    frame = _outline_frame(inputs.outlines, inputs.outline_ids)  # bad ids fail before the inference
    sources = provenance["diagnostics"]["climate"]["sources"]
    projection = inputs.gcm_temperature is not None or inputs.gcm_precipitation is not None
    if projection and (inputs.gcm_temperature is None or inputs.gcm_precipitation is None):
        raise ValueError("a projection needs both --gcm_temperature and --gcm_precipitation")

    # 1. Monthly climate, GlaUnTI's SMB and its relations.
    t_ref, p_ref = pc.read_reanalysis_monthly(Path(sources["temperature"]), Path(sources["precipitation"]))
    observed = observed_annual(inputs.data_folder, inputs.name)
    last_balance_year = int(provenance["index"]["max_year"])
    until = inputs.until if inputs.until is not None else last_balance_year
    if projection:
        gcm_t, gcm_p = pc.read_gcm(inputs.gcm_temperature, inputs.gcm_precipitation)
        t_all, p_all = pc.delta_projection(t_ref, p_ref, gcm_t, gcm_p, inputs.reference_period, until)
        label = (f"reanalysis to {pd.Timestamp(t_ref['time'].values[-1]):%Y-%m}, then its "
                 f"{inputs.reference_period[0]}-{inputs.reference_period[1]} monthly climatology plus the "
                 f"anomalies of {Path(inputs.gcm_temperature).name} (delta method)")
        t_file, p_file = pc.write_reanalysis_like(out_dir / "climate", t_all, p_all, label)
        smb_folder = out_dir / "glaunti_data"
        _say(verbose, f"projection climate to {until}: preparing {inputs.name} again in {smb_folder}")
        _prepare_projection(inputs, provenance, t_file, p_file, Path(sources["orography"]), smb_folder, until,
                            verbose)
    else:
        if until != last_balance_year:
            raise ValueError(f"--until {until}: without a GCM the run ends with the prepared climate "
                             f"({last_balance_year}); give --gcm_temperature/--gcm_precipitation to go further")
        t_all, p_all, label = t_ref, p_ref, "reanalysis"
        smb_folder = Path(inputs.data_folder)
    smb_path = out_dir / "smb" / f"{inputs.model}.nc"
    # The published weights unless a file is given (not a params/<model>.eqx trained here).
    params_path = Path(inputs.params_path or published_params_path(inputs.model))
    t0 = time.perf_counter()
    infer_and_evaluate(inputs.model, inputs.name, smb_path, out_dir / "smb" / f"{inputs.model}_eval.json",
                       params_path=params_path, data_folder=smb_folder)
    seconds_inference = time.perf_counter() - t0
    relation = relation_from_smb(smb_path, smb_folder, inputs.name)
    _say(verbose, f"GlaUnTI {inputs.model.upper()}: SMB {relation.years[0]}–{relation.years[-1]} "
                  f"({seconds_inference:.0f} s), reduced to SMB–elevation relations")
    climate_file = pc.write_oggm_custom(out_dir / "climate" / "oggm_custom_climate.nc", t_all, p_all,
                                        Path(sources["orography"]), label)

    # 2.–3. OGGM, offline.
    t0 = time.perf_counter()
    cfg = import_oggm(out_dir, verbose=verbose)
    from oggm import exceptions as oggm_errors
    from oggm import tasks, workflow
    from oggm.core import flowline, massbalance

    cfg.PATHS["dem_file"] = str(Path(inputs.dem).resolve())
    cfg.PATHS["climate_file"] = str(climate_file.resolve())
    cfg.PARAMS["baseline_climate"] = "CUSTOM"
    cfg.PARAMS["store_model_geometry"] = False
    # OGGM's winter-precipitation factor is fitted to W5E5 1979–2019 only; with a custom climate
    # the precipitation factor is the constant OGGM used with HISTALP in the Alps (2.5).
    cfg.PARAMS["prcp_fac"] = PRCP_FAC
    start = inputs.start_year
    history = None
    results = {}
    # OGGM's own failures (a DEM it cannot use, a calibration that does not converge, a download
    # it would need) become one line naming the glacier and the model.
    oggm_failures = (oggm_errors.MassBalanceCalibrationError, oggm_errors.InvalidDEMError,
                     oggm_errors.InvalidGeometryError, oggm_errors.GeometryError, oggm_errors.NoInternetException)
    model = MODELS[0]
    try:
        for model in MODELS:
            gdir = _glacier_dir(cfg, workflow, frame, out_dir / "oggm" / model)
            _flowlines(gdir, tasks)
            # OGGM's convention: the outline shows the glacier at the end of its year (images of a
            # snow-free late summer), so the run starts with the next (balance) year.
            start = start if start is not None else int(gdir.rgi_date) + 1
            if not relation.years[0] <= start <= last_balance_year:
                raise ValueError(f"the run would start in {start}: expected a balance year with GlaUnTI SMB and "
                                 f"climate, {relation.years[0]}–{last_balance_year} (--start_year)")
            history = (start, last_balance_year)
            mb_years = (start, last_balance_year + 1)  # OGGM ranges exclude their end
            if model == "glaunti":
                mb = mass_balance_model_class()(relation, hemisphere=gdir.hemisphere)
                tasks.apparent_mb_from_any_mb(gdir, mb_model=mb, mb_years=mb_years)
                fls = gdir.read_pickle("inversion_flowlines")
                years = np.arange(*mb_years)
                on_flowlines = mb.get_specific_mb(fls=fls, year=years) / 1000.0
                on_grid = relation.glacier_wide[[relation.index(int(y)) for y in years]]
                inversion = _invert(gdir, tasks)
                flowline.flowline_model_run(gdir, mb_model=mb, ys=start, ye=until + 1, output_filesuffix="_glaunti")
            else:
                tasks.process_custom_climate_data(gdir)
                observed_years = observed.loc[start:last_balance_year]
                if observed_years.empty:
                    raise DataError(Path(inputs.data_folder) / inputs.name / "total_smb.csv", "column 'annual_balance'",
                                    f"has no value in {start}–{last_balance_year}: OGGM's TI is calibrated on it")
                ref_mb = float(observed_years.mean()) * 1000.0
                massbalance.mb_calibration_from_scalar_mb(
                    gdir, ref_mb=ref_mb, ref_period=f"{start}-01-01_{last_balance_year + 1}-01-01", overwrite_gdir=True)
                calibration = gdir.read_json("mb_calib")
                tasks.apparent_mb_from_any_mb(gdir, mb_years=mb_years)
                inversion_ti = _invert(gdir, tasks)
                tasks.run_from_climate_data(gdir, ys=start, ye=until + 1, output_filesuffix="_oggm_ti")
            with xr.open_dataset(gdir.get_filepath("model_diagnostics", filesuffix=f"_{model}")) as ds:
                results[model] = ds[["volume_m3", "area_m2", "length_m"]].load()
    except oggm_failures as err:
        raise ValueError(f"OGGM, {inputs.name}, {model}: {type(err).__name__}: {err}") from err
    seconds_oggm = time.perf_counter() - t0

    diagnostics = _write_diagnostics(out_dir / "evolution.nc", results, inputs, label, history)
    figure = plot(diagnostics, out_dir / "evolution.png", history, projection, inputs)
    summary = _summary(diagnostics, relation, history, on_flowlines, on_grid, observed, inversion, inversion_ti,
                       calibration, ref_mb, inputs, label)
    summary["seconds"] = {"glaunti_inference": round(seconds_inference, 1), "oggm": round(seconds_oggm, 1),
                          "total": round(time.perf_counter() - t_start, 1)}
    summary["params"] = str(params_path)
    summary["outputs"] = {"diagnostics": str(out_dir / "evolution.nc"), "figure": str(figure)}
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _prepare_projection(inputs, provenance, t_file, p_file, orography, folder, until, verbose) -> None:
    """The glacier prepared again from the extended climate (no observations: the projection
    is not evaluated), so that GlaUnTI's daily climate comes from the same disaggregation."""
    from dataloader.prepare.glacier import Options, Sources, prepare_glacier

    options = provenance.get("options", {})
    prepare_glacier(folder, inputs.name,
                    Sources(dem=Path(inputs.dem), temperature=t_file, precipitation=p_file, orography=orography,
                            outlines=Path(inputs.outlines), outline_ids=tuple(inputs.outline_ids)),
                    Options(first_year=int(options.get("first_year", 1990)), last_year=until,
                            balance_year_dates=options.get("balance_year_dates"), monthly_climate=True,
                            epsg=options.get("epsg"), margin_m=float(options.get("margin_m", 500.0)),
                            wgms_name=provenance["index"].get("wgms_name"), region=provenance["index"]["region"]),
                    verbose=verbose)


def _write_diagnostics(path: Path, results: dict, inputs: EvolutionInputs, label: str, history) -> xr.Dataset:
    """Volume, area and length per year (OGGM's diagnostics) of both models in one file."""
    ds = xr.concat([results[m].expand_dims(model=[m]) for m in MODELS], "model")
    ds["volume_m3"].attrs = {"units": "m3", "long_name": "glacier ice volume"}
    ds["area_m2"].attrs = {"units": "m2", "long_name": "glacier area"}
    ds["length_m"].attrs = {"units": "m", "long_name": "glacier length (main flowline)"}
    ds["time"].attrs = {"units": "year", "long_name": "OGGM float year: t = Y + 1 is the end of (balance) year Y"}
    ds["model"].attrs = {"long_name": f"glaunti: GlaUnTI {inputs.model.upper()} mass balance; oggm_ti: OGGM "
                                      "MonthlyTIModel calibrated on the observed mean balance"}
    ds.attrs = {"title": f"{inputs.name}: OGGM flowline evolution", "climate": label,
                "historical_years": f"{history[0]}-{history[1]}", "source": "glaunti evolve_glacier.py"}
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp)
    return ds


def _at_end_of(ds: xr.Dataset, year: int, variable: str, model: str) -> float | None:
    t = year + 1
    if t not in ds["time"].values:
        return None
    return float(ds[variable].sel(model=model, time=t))


def _summary(ds, relation, history, on_flowlines, on_grid, observed, inversion, inversion_ti, calibration,
             ref_mb, inputs, label) -> dict:
    start, last = history
    rho = 900.0  # OGGM's default ice density; the summary's conversion only
    area = ds["area_m2"].sel(model="glaunti", time=[start, last + 1]).mean().item()
    dv = (ds["volume_m3"].sel(model="glaunti", time=last + 1) - ds["volume_m3"].sel(model="glaunti", time=start)).item()
    years = np.arange(start, last + 1)
    grid_sum = float(relation.glacier_wide[[relation.index(int(y)) for y in years]].sum())
    table = {}
    for year in REPORT_YEARS:
        table[str(year)] = {m: {"volume_km3": _km3(_at_end_of(ds, year, "volume_m3", m)),
                                "area_km2": _km2(_at_end_of(ds, year, "area_m2", m))} for m in MODELS}
    return {
        "glacier": inputs.name, "model": inputs.model, "climate": label, "historical_years": [start, last],
        "binning": {
            "years": [int(y) for y in years],
            "adapter_on_flowlines_m_we": [round(float(v), 4) for v in on_flowlines],
            "glacier_wide_on_grid_m_we": [round(float(v), 4) for v in on_grid],
            "max_abs_difference_m_we": round(float(np.max(np.abs(on_flowlines - on_grid))), 4),
            "mean_difference_m_we": round(float(np.mean(on_flowlines - on_grid)), 4),
        },
        "mass_change": {
            "volume_change_km3": round(dv / 1e9, 4),
            "as_m_we_over_mean_area": round(dv * rho / 1000.0 / area, 3),
            "sum_of_glaunti_glacier_wide_balances_m_we": round(grid_sum, 3),
            "sum_of_observed_balances_m_we": round(float(observed.loc[start:last].sum()), 3),
        },
        "inversion_volume_km3": {"glaunti": round(inversion / 1e9, 4), "oggm_ti": round(inversion_ti / 1e9, 4)},
        "oggm_ti_calibration": {"ref_mb_mm_we": round(ref_mb, 1),
                                **{k: calibration[k] for k in ("melt_f", "prcp_fac", "temp_bias")}},
        "end_of_year": table,
    }


def _km3(v):
    return None if v is None else round(v / 1e9, 4)


def _km2(v):
    return None if v is None else round(v / 1e6, 3)


def plot(ds: xr.Dataset, path: Path, history, projection: bool, inputs: EvolutionInputs) -> Path:
    """Volume and area over time, GlaUnTI against OGGM's TI; the projection shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = {"glaunti": f"GlaUnTI {inputs.model.upper()} (OGGM dynamics)",
             "oggm_ti": "OGGM TI, calibrated on WGMS mean"}
    for ax, variable, scale, unit in ((axes[0], "volume_m3", 1e9, "volume (km$^3$)"),
                                      (axes[1], "area_m2", 1e6, "area (km$^2$)")):
        for model, colour in zip(MODELS, ("C0", "C3")):
            ax.plot(ds["time"], ds[variable].sel(model=model) / scale, color=colour, lw=1.5, label=names[model])
        if projection:
            ax.axvspan(history[1] + 1, float(ds["time"][-1]), color="0.9", zorder=0)
            gcm = Path(inputs.gcm_temperature).stem
            ax.text(history[1] + 2, ax.get_ylim()[1], f"projection: one GCM ({gcm}),\na demonstration",
                    fontsize=7, va="top")
        ax.set_xlabel("OGGM year t (t = Y + 1: end of year Y)")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{inputs.name}: OGGM flowline evolution from the outline (t = {history[0]})", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
