"""The real-glacier part of the main job: prepare Hintereisferner from the bundled public sources,
run the published A, C and D on it, evaluate them against the WGMS records, and draw a map of
the mean annual SMB and the annual glacier-wide series, observed against modelled.

    python -m core.apps.own_glacier [--data_folder data/real] [--out_dir outputs/demo/real]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from core.apps.cli import main_wrapper
from core.evaluate.metrics import season_window
from core.io import atomic_path, atomic_write_text
from core.models import label, published_params_path
from core.workflows import infer_and_evaluate
from dataloader import Dataset

REPOSITORY = Path(__file__).resolve().parents[1]
SOURCES = REPOSITORY / "examples" / "hintereisferner" / "sources"
NAME = "Hintereisferner"


def hintereisferner_sources():
    """The bundled Hintereisferner inputs (RGI 5 outline, SRTM, ERA5-Land monthly, WGMS)."""
    from dataloader.prepare.glacier import Sources

    return Sources(
        outlines=SOURCES / "rgi_oetztal.shp", outline_ids=("RGI50-11.00897",),
        dem=SOURCES / "srtm_oetztal.tif",
        temperature=SOURCES / "sel_era5_land_monthly_t2m_1981-2018.nc",
        precipitation=SOURCES / "sel_era5_land_monthly_prcp_1981-2018.nc",
        orography=SOURCES / "sel_era5_land_invariant.nc",
        glacier_wide=SOURCES / "mbdata_WGMS-00491.csv",
    )


def prepare_hintereisferner(data_folder: Path, verbose: bool = True) -> dict:
    """Prepare the glacier (about 10 s) unless the same sources were prepared there already."""
    from dataloader.prepare.glacier import Options, prepare_glacier

    provenance = Path(data_folder) / NAME / "provenance.json"
    sources = hintereisferner_sources()
    if provenance.exists():
        done = json.loads(provenance.read_text())
        if set(done.get("inputs", {})) == {str(p) for p in sources.files()}:
            return done
    return prepare_glacier(data_folder, NAME, sources,
                           Options(monthly_climate=True, wgms_name="HINTEREIS F.", region="ALP"),
                           verbose=verbose)


def run_published(data_folder: Path, name: str, out_dir: Path, models: str = "acd") -> dict[str, dict]:
    """Daily SMB and evaluation of ``name`` for each published model; returns the evaluations."""
    evaluations = {}
    for model in models:
        params = published_params_path(model)
        t0 = time.perf_counter()
        evaluations[model] = infer_and_evaluate(model, name, out_dir / "smb" / f"{model}.nc",
                                                out_dir / "eval" / f"{model}.json", params_path=params,
                                                data_folder=data_folder)
        print(f"  {model.upper()} (published weights {params.relative_to(REPOSITORY)}): "
              f"{_annual_line(evaluations[model])}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return evaluations


def _annual_line(evaluation: dict) -> str:
    m = evaluation["metrics"]["glacier-wide"]["overall"]["annual"]
    if m["n"] < 2:
        return f"glacier-wide annual n={m['n']}"
    return f"glacier-wide annual n={m['n']} r={m['pearson_r']:.2f} RMSE={m['rmse']:.2f} bias={m['bias']:+.2f} m w.e."


def mean_annual_smb(smb_path: Path, data_folder: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over the study years of each balance year's summed daily SMB (m w.e. a⁻¹), NaN off
    the glacier of the last year; with the grid's x and y. Sums inclusive windows of the daily
    series, as the evaluation does."""
    import xarray as xr

    tensors = Dataset(data_folder).glacier(name)
    with xr.open_dataset(smb_path) as ds:
        daily = ds["smb"]
        first_day = int((daily["time"].values[0].astype("datetime64[D]") - tensors.first_date).astype(int))
        totals = []
        for k in np.flatnonzero(tensors.study):
            begin, end = season_window(tensors, int(k), "annual")
            totals.append(daily[begin - first_day:end - first_day + 1].sum("time", dtype=np.float64).to_numpy())
    field = np.mean(totals, axis=0)
    field[np.asarray(tensors.outlines[-1]) < 0.5] = np.nan
    return field, np.asarray(tensors.x), np.asarray(tensors.y)


def finish_annual_series(ax, ylabel: str, title: str) -> None:
    """The look of an annual-balance series panel (this figure's and the region's)."""
    ax.axhline(0, color="0.6", lw=0.6)
    ax.set_xlabel("balance year")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot(evaluations: dict[str, dict], out_dir: Path, data_folder: Path, name: str) -> Path:
    """Left: the last model's mean annual SMB map; right: annual glacier-wide balances, WGMS
    against each model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    facies_maps = bool(np.any(Dataset(data_folder).glacier(name).has_facies))
    fig, (ax_map, ax_series) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1, 1.5]})
    model = list(evaluations)[-1]
    field, x, y = mean_annual_smb(out_dir / "smb" / f"{model}.nc", data_folder, name)
    limit = float(np.nanmax(np.abs(field)))
    image = ax_map.imshow(field, cmap="RdBu", vmin=-limit, vmax=limit,
                          extent=(x[0] - 50, x[-1] + 50, y[-1] - 50, y[0] + 50))
    fig.colorbar(image, ax=ax_map, label="mean annual SMB (m w.e. a$^{-1}$)", shrink=0.85)
    ax_map.set_title(f"{name}: model {model.upper()}, mean of the study years", fontsize=10)
    ax_map.set_xlabel("easting (m)")
    ax_map.set_ylabel("northing (m)")
    ax_map.ticklabel_format(style="plain")
    ax_map.tick_params(labelsize=7)

    observed = None
    for model, evaluation in evaluations.items():
        per_year = evaluation["true_pred"]["glacier-wide"]["per_year"]["annual"]
        years = sorted(int(y) for y in per_year)
        if observed is None:
            observed = [per_year[str(y)]["true"][0] for y in years]
            ax_series.plot(years, observed, "k-o", ms=4, lw=1.6, label="WGMS")
        pred = [per_year[str(y)]["pred"][0] for y in years]
        ax_series.plot(years, pred, "-o", ms=3, lw=1, label=label(model, facies_maps))
    finish_annual_series(ax_series, "glacier-wide annual balance (m w.e.)",
                         "published weights against WGMS (no calibration on this glacier)")
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def run(data_folder: Path, out_dir: Path, models: str = "acd") -> dict[str, dict]:
    """Prepare, run the published models, evaluate, plot, write ``summary.txt``."""
    t0 = time.perf_counter()
    provenance = prepare_hintereisferner(data_folder)
    print(f"{NAME}: published models on the prepared glacier "
          f"({provenance['index']['height']}×{provenance['index']['width']} cells)", flush=True)
    evaluations = run_published(data_folder, NAME, out_dir, models)
    figure = plot(evaluations, out_dir, data_folder, NAME)
    lines = [f"{NAME} (WGMS 491), published weights, glacier-wide annual balance against WGMS:"]
    lines += [f"  {m.upper()}: {_annual_line(e)}" for m, e in evaluations.items()]
    atomic_write_text(out_dir / "summary.txt", "\n".join(lines) + "\n")
    print(f"figure: {figure}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return evaluations


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_folder", type=Path, default=Path("data/real"), help="Where the glacier is prepared")
    p.add_argument("--out_dir", type=Path, default=Path("outputs/demo/real"), help="SMB, evaluations, figure")
    p.add_argument("--models", default="acd", help="Published models to run (default acd)")
    return p


@main_wrapper
def main(argv=None):
    args = parser().parse_args(argv)
    run(args.data_folder, args.out_dir, args.models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
