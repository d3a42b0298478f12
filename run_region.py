"""Every glacier of an outline file (or of a catchment) in one command: prepared from public
sources as prepare_glacier.py does, run with the published (or calibrated) models, evaluated
against WGMS where linked, assembled into one product in OUT_DIR (region.nc, glaciers.csv,
mean_annual_smb.tif, region.png; the prepared glaciers under OUT_DIR/data/). Rerunning the same
command continues it. See docs/region.md. Example (the bundled Oetztal sources):

    S=examples/oetztal/sources
    python run_region.py outputs/oetztal --outlines $S/rgi_oetztal.shp --dem $S/srtm_oetztal.tif \\
        --temperature $S/sel_era5_land_monthly_t2m_1981-2018.nc \\
        --precipitation $S/sel_era5_land_monthly_prcp_1981-2018.nc \\
        --orography $S/sel_era5_land_invariant.nc --monthly_climate \\
        --wgms_links $S/rgi_wgms_links_20170217_RGIV5_oetztal.csv --wgms_folder $S [--workers 2]
"""

import argparse
import sys
from pathlib import Path

from core.apps.cli import add_balance_years, add_climate_sources, main_wrapper, non_negative_int


def _model_params(text: str) -> tuple[str, Path]:
    model, sep, path = text.partition("=")
    if not sep or model.strip().lower() not in "abcd" or len(model.strip()) != 1 or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MODEL=FILE.eqx, e.g. d=params/d.eqx")
    return model.strip().lower(), Path(path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path, help="Product folder (created; a rerun continues it)")
    p.add_argument("--outlines", type=Path, required=True,
                   help="Vector file of outlines (any CRS); each outline is one glacier, named by its id")
    add_climate_sources(p)
    selection = p.add_argument_group("selection (default: every outline of the file)")
    selection.add_argument("--outline_id", action="append", default=[],
                           help="Only this outline (repeatable)")
    selection.add_argument("--within", type=Path,
                           help="Polygon file (e.g. a catchment): outlines whose centroid lies inside")
    selection.add_argument("--min_area_km2", type=float, default=0.0, help="Leave out smaller outlines")
    obs = p.add_argument_group("observations (optional)")
    obs.add_argument("--wgms_links", type=Path, help="RGI–WGMS link table (WGMS_ID, RGI50_ID/RGI60_ID)")
    obs.add_argument("--wgms_folder", type=Path,
                     help="Folder of mbdata_WGMS-NNNNN.csv and profile_WGMS-NNNNN.csv")
    models = p.add_argument_group("models")
    models.add_argument("--models", default="d", help="Models to run, letters among abcd (default d)")
    models.add_argument("--params_path", action="append", type=_model_params, default=[], metavar="MODEL=FILE",
                        help="Calibrated weights of a model (default: the published weights)")
    years = p.add_argument_group("years and grid")
    add_balance_years(years)
    years.add_argument("--epsg", type=int,
                       help="CRS of every glacier grid and of the mosaic (default: UTM zones)")
    years.add_argument("--margin_m", type=float, default=500.0,
                       help="Terrain around each glacier's bounding box (m, default 500)")
    run = p.add_argument_group("where it runs")
    run.add_argument("--workers", type=non_negative_int, default=0,
                     help="Start a local Dask cluster of N spawned worker processes (default 0: this process)")
    run.add_argument("--scheduler", help="Address of a running Dask scheduler (e.g. tcp://host:8786)")
    p.add_argument("--maps", action="store_true",
                   help="Keep every glacier's daily SMB maps (OUT_DIR/maps/<model>/<id>.nc, 8-80 MB each)")
    p.add_argument("--quiet", action="store_true", help="Print only errors")
    return p


@main_wrapper
def main(argv=None):
    args = parser().parse_args(argv)
    if args.workers and args.scheduler:
        raise ValueError("give --workers (a local cluster) or --scheduler (a running one), not both")
    from core.apps.region import RegionOptions, RegionSources, run_region

    sources = RegionSources(outlines=args.outlines, dem=args.dem, temperature=args.temperature,
                            precipitation=args.precipitation, orography=args.orography,
                            wgms_links=args.wgms_links, wgms_folder=args.wgms_folder, within=args.within)
    options = RegionOptions(outline_ids=tuple(args.outline_id), min_area_km2=args.min_area_km2,
                            first_year=args.first_year, last_year=args.last_year,
                            monthly_climate=args.monthly_climate, epsg=args.epsg, margin_m=args.margin_m,
                            models=args.models.lower(), params_paths={m: str(p) for m, p in args.params_path},
                            maps=args.maps)
    run_region(args.out_dir, sources, options, workers=args.workers, scheduler=args.scheduler,
               verbose=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
