"""Pool per-glacier evaluation JSONs and print the summary table (n, r, RMSE, bias)."""

import argparse
import json
import sys

from core.cli import main_wrapper


def parser():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("eval_folders", nargs="+", metavar="EVAL_FOLDER",
                   help="Folder(s) of evaluation JSONs written by infer_and_evaluate.py")
    p.add_argument("--json", action="store_true", help="Print machine-readable JSON instead")
    return p


@main_wrapper
def main(argv=None):
    args = parser().parse_args(argv)
    from core.summarise import format_table, summarise

    summary = summarise(args.eval_folders)
    print(json.dumps(summary, indent=1) if args.json else format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
