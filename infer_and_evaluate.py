"""Run a calibrated model on one glacier: daily SMB (.nc; for A, C and D also the glacier-wide
daily snowfall, rainfall and melt) and its evaluation (.json)."""

import argparse
import sys

from core.apps.cli import add_data_folder, main_wrapper
from core.models import MODELS


def parser():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model", choices=MODELS, help="Model name")
    p.add_argument("glacier", help="Glacier name")
    p.add_argument("smb_path", help="Output SMB path (.nc)")
    p.add_argument("eval_path", help="Output evaluation path (.json)")
    p.add_argument("--params_path", default=None,
                   help="Params path (.eqx); default params/<model>.eqx if trained, else the published "
                        "weights params/published/<model>.eqx")
    # The authors' flag loaded C/D files whose TI parameters were trained too. Here only A is
    # fine-tuned (finetune.py), and a fine-tuned A loads as any A: the flag is refused, not ignored.
    p.add_argument("--unfreeze_ti", action="store_true", help=argparse.SUPPRESS)
    add_data_folder(p)
    p.add_argument("--quiet", action="store_true", help="Do not print the summary")
    return p


@main_wrapper
def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.unfreeze_ti:
        p.error("--unfreeze_ti is not supported: a model A fine-tuned by finetune.py loads as any "
                "A file (pass it with --params_path); C/D with trained TI parameters do not exist here")
    from core.evaluate.metrics import SCALES, SEASONS
    from core.models import PUBLISHED_PARAMS
    from core.workflows import infer_and_evaluate, resolve_params_path

    params_path = resolve_params_path(args.model, args.params_path)
    result = infer_and_evaluate(args.model, args.glacier, args.smb_path, args.eval_path,
                                params_path=params_path, data_folder=args.data_folder)
    if not args.quiet:
        published = " (the published weights)" if params_path.resolve().parent == PUBLISHED_PARAMS else ""
        print(f"{args.glacier}, model {args.model.upper()} with {params_path}{published}: "
              f"{args.smb_path}, {args.eval_path}")
        for scale in SCALES:
            for season in SEASONS:
                m = result["metrics"][scale]["overall"][season]
                extra = "" if m["n"] < 2 else (
                    f"  r={m['pearson_r'] if m['pearson_r'] is not None else float('nan'):.3f}"
                    f"  RMSE={m['rmse']:.3f}  bias={m['bias']:+.3f}")
                print(f"  {scale:12s} {season:7s} n={m['n']:<4d}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
