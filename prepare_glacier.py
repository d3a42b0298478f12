"""Prepare your own glacier in the published layout from public sources, so that every script
(inference with the published weights, fine-tuning, training) runs on it.

Writes DATA_FOLDER/NAME/ (temperature.nc, precipitation.nc, orography.nc, dem.nc, outlines.nc,
total_smb.csv, optional point_smb.csv and facies.nc, provenance.json), adds or replaces NAME's
row of DATA_FOLDER/index.csv and writes normalisation_factors.pkl if absent. See
docs/own_glacier.md. Example (the bundled Hintereisferner sources):

    python prepare_glacier.py data/real Hintereisferner \\
        --outlines examples/hintereisferner/sources/rgi_oetztal.shp --outline_id RGI50-11.00897 \\
        --dem examples/hintereisferner/sources/srtm_oetztal.tif \\
        --temperature examples/hintereisferner/sources/sel_era5_land_monthly_t2m_1981-2018.nc \\
        --precipitation examples/hintereisferner/sources/sel_era5_land_monthly_prcp_1981-2018.nc \\
        --orography examples/hintereisferner/sources/sel_era5_land_invariant.nc --monthly_climate \\
        --glacier_wide examples/hintereisferner/sources/mbdata_WGMS-00491.csv
"""

import argparse
import sys
from pathlib import Path

import constants
from core.apps.cli import add_balance_years, add_climate_sources, main_wrapper


def _year_file(text: str) -> tuple[int, Path]:
    year, sep, path = text.partition("=")
    if not sep or not year.strip().isdigit() or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected YEAR=FILE.tif, e.g. 2017=outline_2017.tif")
    return int(year), Path(path)


def _facies_scene(text: str) -> tuple[str, Path, Path | None]:
    date, sep, files = text.partition("=")
    if not sep or not files:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected DATE=CLASSES.tif[,CONFIDENCE.tif], e.g. 2019-09-02=classes.tif")
    classes, _, confidence = files.partition(",")
    return date, Path(classes), Path(confidence) if confidence else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_folder", help="Dataset folder to write into (created if absent)")
    p.add_argument("name", help="Glacier name = folder name (may contain spaces)")
    outline = p.add_argument_group("outlines (one of)")
    outline.add_argument("--outlines", type=Path,
                         help="Vector file of outlines (shapefile, GeoPackage, GeoJSON; any CRS)")
    outline.add_argument("--outline_id", action="append", default=[],
                         help="Id of the glacier in --outlines (repeat for a glacier split in parts)")
    outline.add_argument("--outline_name", help="Name of the glacier in --outlines (instead of an id)")
    outline.add_argument("--outline_rasters", nargs="+", type=_year_file, metavar="YEAR=FILE.tif",
                         help="ICEmapper probability GeoTIFFs, one per year")
    outline.add_argument("--outline_threshold", type=float, default=0.5,
                         help="Glacier probability from which an ICEmapper cell is glacier (default 0.5)")
    add_climate_sources(p)
    obs = p.add_argument_group("observations (optional)")
    obs.add_argument("--glacier_wide", type=Path,
                     help="Glacier-wide balances: published total_smb.csv or WGMS/OGGM mbdata CSV")
    obs.add_argument("--points", type=Path, help="Point balances in the published point_smb.csv format")
    obs.add_argument("--profile", type=Path, help="WGMS elevation-band profile CSV (becomes pseudo-stakes)")
    p.add_argument("--facies", nargs="+", type=_facies_scene, default=[], metavar="DATE=CLASSES.tif[,CONF.tif]",
                   help="Facies-classifier GeoTIFFs (and confidence), one per scene")
    years = p.add_argument_group("years and seasons")
    add_balance_years(years)
    years.add_argument("--balance_year_dates", metavar="MM-DD,MM-DD,MM-DD",
                       help="Begin, midseason and end of the balance year where the observations give "
                            "no dates (default: the hydrological year of the hemisphere)")
    index = p.add_argument_group("index.csv and grid")
    index.add_argument("--fold", type=int, default=constants.test_fold,
                       help="Cross-validation fold (default 0 = test, i.e. evaluation only)")
    index.add_argument("--region", default="ALP", help="Region code (informational, default ALP)")
    index.add_argument("--wgms_name", help="Catalogue name (default: NAME in upper case)")
    index.add_argument("--epsg", type=int, help="CRS of the grid (default: UTM zone of the outline's centroid)")
    index.add_argument("--margin_m", type=float, default=500.0,
                       help="Terrain around the glacier's bounding box (m, default 500)")
    p.add_argument("--quiet", action="store_true", help="Print only errors")
    return p


@main_wrapper
def main(argv=None):
    args = parser().parse_args(argv)
    from dataloader.prepare.facies import parse_date
    from dataloader.prepare.glacier import Options, Sources, prepare_glacier

    sources = Sources(
        dem=args.dem, temperature=args.temperature, precipitation=args.precipitation,
        orography=args.orography, outlines=args.outlines, outline_ids=tuple(args.outline_id),
        outline_name=args.outline_name, outline_rasters=dict(args.outline_rasters or []),
        glacier_wide=args.glacier_wide, points=args.points, profile=args.profile,
        facies=tuple((parse_date(date, f"--facies {date}="), classes, confidence)
                     for date, classes, confidence in args.facies),
    )
    options = Options(first_year=args.first_year, last_year=args.last_year,
                      balance_year_dates=args.balance_year_dates, monthly_climate=args.monthly_climate,
                      fold=args.fold, region=args.region, wgms_name=args.wgms_name, epsg=args.epsg,
                      margin_m=args.margin_m, outline_threshold=args.outline_threshold)
    prepare_glacier(args.data_folder, args.name, sources, options, verbose=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
