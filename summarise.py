"""Pool per-glacier evaluation JSONs and print the summary table (n, r, RMSE, bias); or, with
--crossvalidation, the tables of a crossvalidate.py folder (pooled, spread across folds, and the
locally calibrated baseline beside the transferred models on the same later years)."""

import argparse
import json
import sys

from core.apps.cli import main_wrapper


def parser():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("eval_folders", nargs="*", metavar="EVAL_FOLDER",
                   help="Folder(s) of evaluation JSONs written by infer_and_evaluate.py")
    p.add_argument("--crossvalidation", metavar="CV_FOLDER", default=None,
                   help="Output folder of crossvalidate.py: its tables, over every completed fold")
    p.add_argument("--json", action="store_true", help="Print machine-readable JSON instead")
    return p


@main_wrapper
def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if bool(args.eval_folders) == bool(args.crossvalidation):
        p.error("give either EVAL_FOLDER(s) or --crossvalidation CV_FOLDER")
    if args.crossvalidation:
        from core.apps.crossvalidation import format_report, summarise_crossvalidation

        summary = summarise_crossvalidation(args.crossvalidation)
        print(json.dumps(summary, indent=1) if args.json else format_report(summary))
        return 0
    from core.evaluate.summary import format_table, summarise

    summary = summarise(args.eval_folders)
    print(json.dumps(summary, indent=1) if args.json else format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
