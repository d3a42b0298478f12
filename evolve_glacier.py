"""Glacier evolution with GlaUnTI's mass balance in OGGM's flowline model, next to OGGM's own
temperature-index model, for a glacier prepared with prepare_glacier.py; optionally projected
with a GCM by the delta method (docs/evolution.md). Needs the optional extra: pip install -e '.[oggm]'.

Writes OUT_DIR/evolution.nc (volume, area, length per year and model), evolution.png,
summary.json, GlaUnTI's daily SMB (smb/) and OGGM's glacier directories (oggm/). Runs offline:
OGGM's and salem's sample-data folders come from examples/oggm_init/ into OUT_DIR/oggm_home.
Example (Hintereisferner, prepared as in docs/own_glacier.md, projected to 2100 with CCSM4 RCP2.6):

    python evolve_glacier.py data/real Hintereisferner \\
        --outlines examples/hintereisferner/sources/rgi_oetztal.shp --outline_id RGI50-11.00897 \\
        --dem examples/hintereisferner/sources/srtm_oetztal.tif --until 2100 \\
        --gcm_temperature examples/cmip5/tas_mon_CCSM4_rcp26_r1i1p1_g025.nc \\
        --gcm_precipitation examples/cmip5/pr_mon_CCSM4_rcp26_r1i1p1_g025.nc
"""

import argparse
import sys
from pathlib import Path

from core.apps.cli import main_wrapper


def _period(text: str) -> tuple[int, int]:
    first, sep, last = text.partition("-")
    if not sep or not first.isdigit() or not last.isdigit() or int(first) > int(last):
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIRST-LAST years, e.g. 1981-2010")
    return int(first), int(last)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_folder", type=Path, help="Dataset folder holding the prepared glacier")
    p.add_argument("name", help="Glacier name = folder name")
    p.add_argument("--outlines", type=Path, required=True, help="RGI-formatted outline file (column RGIId)")
    p.add_argument("--outline_id", action="append", default=[], required=True,
                   help="RGIId of the glacier (repeat for a glacier split in parts: they are merged)")
    p.add_argument("--dem", type=Path, required=True, help="DEM GeoTIFF for OGGM's glacier directory")
    p.add_argument("--model", default="d", help="GlaUnTI model (default d, with the published weights)")
    p.add_argument("--params", type=Path, help="Parameter file (default: the published weights of --model)")
    p.add_argument("--until", type=int, help="Last year of the run (default: the last prepared balance year)")
    p.add_argument("--start_year", type=int,
                   help="First (balance) year of the run; the outline is the glacier at its start "
                        "(default: the year after the outline's date, as OGGM)")
    gcm = p.add_argument_group("projection (delta method; one GCM is a demonstration, not a projection range)")
    gcm.add_argument("--gcm_temperature", type=Path, help="GCM monthly near-surface temperature 'tas' (K)")
    gcm.add_argument("--gcm_precipitation", type=Path, help="GCM monthly precipitation 'pr' (kg m-2 s-1)")
    gcm.add_argument("--reference_period", type=_period, default=(1981, 2010),
                     help="Years of the climatologies the anomalies refer to (default 1981-2010)")
    p.add_argument("--out_dir", type=Path, default=Path("outputs/evolution"),
                   help="Outputs (default outputs/evolution)")
    p.add_argument("--quiet", action="store_true", help="Print only errors")
    return p


@main_wrapper
def main(argv=None):
    args = parser().parse_args(argv)
    from core.apps.evolution import EvolutionInputs, evolve
    from core.apps.oggm_offline import MissingExtraError, require_oggm

    try:
        require_oggm()
    except MissingExtraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    inputs = EvolutionInputs(
        data_folder=args.data_folder, name=args.name, outlines=args.outlines, outline_ids=tuple(args.outline_id),
        dem=args.dem, model=args.model, params_path=args.params, until=args.until,
        gcm_temperature=args.gcm_temperature, gcm_precipitation=args.gcm_precipitation,
        reference_period=args.reference_period, start_year=args.start_year)
    summary = evolve(inputs, args.out_dir, verbose=not args.quiet)
    if not args.quiet:
        print(f"diagnostics: {summary['outputs']['diagnostics']}  figure: {summary['outputs']['figure']}  "
              f"({summary['seconds']['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
