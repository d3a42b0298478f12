"""Pool per-glacier evaluation JSONs into the paper's summary table."""

from __future__ import annotations

import json
from pathlib import Path

from core.evaluation import SCALES, SEASONS, pool


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
