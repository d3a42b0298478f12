"""Pool per-glacier evaluation JSONs into the paper's summary table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from core.evaluate.metrics import SCALES, SEASONS, pool


class SummaryError(ValueError):
    pass


def load_evaluations(folder: str | Path) -> list[dict]:
    """Every ``*.json`` evaluation in ``folder`` (ours or the published format)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SummaryError(f"{folder}: evaluation folder does not exist")
    evaluations = []
    for path in sorted(folder.glob("*.json")):
        try:
            ev = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SummaryError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(ev, dict) or "true_pred" not in ev:
            raise SummaryError(f"{path}: missing 'true_pred'; expected an infer_and_evaluate.py evaluation JSON")
        evaluations.append(ev)
    if not evaluations:
        raise SummaryError(f"{folder}: no evaluation JSON files found")
    return evaluations


def summarise(folders) -> dict:
    """``{folder: {"glaciers": n, scale: {season: metrics}}}`` for each folder."""
    out = {}
    for folder in folders:
        evaluations = load_evaluations(folder)
        out[str(folder)] = {"glaciers": len(evaluations), **pool(evaluations)}
    return out


def pool_folders(folders) -> dict:
    """``{"glaciers": n, scale: {season: metrics}}`` of every evaluation of several folders
    pooled together (one model's test glaciers of every fold)."""
    evaluations = [ev for folder in folders for ev in load_evaluations(folder)]
    return {"glaciers": len(evaluations), **pool(evaluations)}


# The metrics whose spread across folds is reported.
SPREAD_METRICS = ("pearson_r", "rmse", "bias")


def mean_std(values) -> dict:
    """``{"folds", "mean", "std"}`` of the values that exist (None: a metric with n < 2); the
    standard deviation is the sample one (ddof 1), None below two values."""
    kept = [float(v) for v in values if v is not None and math.isfinite(v)]
    return {
        "folds": len(kept),
        "mean": float(np.mean(kept)) if kept else None,
        "std": float(np.std(kept, ddof=1)) if len(kept) > 1 else None,
    }


def spread(summaries: list[dict]) -> dict:
    """Mean ± standard deviation across folds: ``summaries`` are one model's per-fold pooled
    summaries (:func:`pool_folders`); returns ``{scale: {season: {metric: mean_std}}}``."""
    return {
        scale: {
            season: {key: mean_std([s[scale][season].get(key) for s in summaries]) for key in SPREAD_METRICS}
            for season in SEASONS
        }
        for scale in SCALES
    }


def format_spread_table(spreads: dict) -> str:
    """One row per model, scale and season: the number of folds and r, RMSE and bias as mean ±
    standard deviation across folds (``spreads``: label → :func:`spread`)."""
    def cell(stat, spec):
        if stat["mean"] is None:
            return "–"
        sd = "–" if stat["std"] is None else format(stat["std"], ".3f")
        return f"{format(stat['mean'], spec)} ± {sd}"

    width = max([len(str(name)) for name in spreads] + [10])
    head = (f"{'model':<{width}}  {'scale':<12} {'season':<7} {'folds':>5}  {'r':>15}  {'RMSE':>15}  "
            f"{'bias':>16}")
    lines = [head, "-" * len(head)]
    for name, res in spreads.items():
        for scale in SCALES:
            for season in SEASONS:
                stats = res[scale][season]
                lines.append(
                    f"{name:<{width}}  {scale:<12} {season:<7} {stats['rmse']['folds']:>5}  "
                    f"{cell(stats['pearson_r'], '.3f'):>15}  {cell(stats['rmse'], '.3f'):>15}  "
                    f"{cell(stats['bias'], '+.3f'):>16}")
    lines.append("mean ± sample standard deviation across folds of each fold's pooled metric; "
                 "RMSE and bias in m w.e.")
    return "\n".join(lines)


def format_table(summary: dict) -> str:
    """The paper's table: one row per folder and scale; n, r, RMSE and bias, each given as
    annual / winter / summer."""
    def cell(res, key, spec):
        values = [res[s].get(key) for s in SEASONS]
        return " / ".join("–" if v is None else format(v, spec) for v in values)

    width = max([len(str(name)) for name in summary] + [10])
    head = f"{'model':<{width}}  {'scale':<12} {'n':>15}  {'r':>23}  {'RMSE':>23}  {'bias':>26}"
    lines = [head, "-" * len(head)]
    for name, res in summary.items():
        for scale in SCALES:
            lines.append(
                f"{name:<{width}}  {scale:<12} {cell(res[scale], 'n', 'd'):>15}  "
                f"{cell(res[scale], 'pearson_r', '.3f'):>23}  {cell(res[scale], 'rmse', '.3f'):>23}  "
                f"{cell(res[scale], 'bias', '+.3f'):>26}"
            )
    lines.append("values: annual / winter / summer; RMSE and bias in m w.e.; r is Pearson's")
    return "\n".join(lines)
