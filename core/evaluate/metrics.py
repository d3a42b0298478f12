"""Evaluation of daily SMB against point and glacier-wide observations (docs/model.md §8, §9.3–9.4).

The daily series holds one value per calendar day; a day covered by two model periods (the
midseason day, a shared year boundary) holds the sum of both half-weighted values, so sums over
inclusive date windows count such days in full — the published evaluation does exactly this.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from glaunti.glacier import SEASONS  # noqa: F401  the order of the seasons, one home

SCALES = ("point", "glacier-wide")


def metrics(true, pred) -> dict:
    """n, Pearson r and its p-value, RMSE, MAE and bias (pred − obs); statistics need n > 1."""
    true = np.asarray(true, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    out: dict = {"n": int(true.size)}
    if true.size > 1:
        diff = pred - true
        if np.ptp(true) == 0 or np.ptp(pred) == 0:
            r, p = math.nan, math.nan  # undefined for a constant series
        else:
            r, p = stats.pearsonr(true, pred)
        out["pearson_r"] = _num(r)
        out["pearson_r_p"] = _num(p)
        out["rmse"] = float(np.sqrt(np.mean(diff**2)))
        out["mae"] = float(np.mean(np.abs(diff)))
        out["bias"] = float(np.mean(diff))
    return out


def _num(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _empty_pairs(years):
    return {
        "overall": {s: {"true": [], "pred": []} for s in SEASONS},
        "per_year": {s: {str(y): {"true": [], "pred": []} for y in years} for s in SEASONS},
    }


def _add(pairs, season, year, true, pred):
    for target in (pairs["overall"][season], pairs["per_year"][season][str(year)]):
        target["true"].append(float(true))
        target["pred"].append(float(pred))


def season_window(tensors, k: int, season: str) -> tuple[int, int] | None:
    """Inclusive climate-day window of a season of year index k (None if the year has none)."""
    begin, mid, end = int(tensors.begin_day[k]), int(tensors.mid_day[k]), int(tensors.end_day[k])
    if season == "annual":
        return begin, end
    if not tensors.seasonal[k]:
        return None
    return (begin, mid) if season == "winter" else (mid, end)


def evaluate(tensors, daily_smb: np.ndarray, first_day: int, years: tuple[int, int] | None = None) -> dict:
    """Evaluation JSON (published structure) of one glacier.

    Args:
        tensors: the glacier's ``GlacierTensors``.
        daily_smb: (T, H, W) daily SMB (m w.e./day) of consecutive days, overlaps summed.
        first_day: climate-day index of ``daily_smb[0]``.
        years: (first, last) balance years to score, inclusive; None scores every study year.
            The model still ran through the other years (their state carries over): this only
            selects the observations, e.g. the later years a locally calibrated model has not seen.
    """
    first, last = years if years is not None else (-np.inf, np.inf)
    study = [k for k in range(len(tensors.years)) if tensors.study[k] and first <= tensors.years[k] <= last]
    scored = [int(tensors.years[k]) for k in study]
    last_day = first_day + daily_smb.shape[0] - 1
    pairs = {"point": _empty_pairs(scored), "glacier-wide": _empty_pairs(scored)}

    for k in study:
        year = int(tensors.years[k])
        mask = np.asarray(tensors.outlines[k], dtype=np.float32)
        for c, season in enumerate(SEASONS):
            obs = tensors.glacier_wide[k, c]
            window = season_window(tensors, k, season)
            if np.isnan(obs) or window is None:
                continue
            total = daily_smb[window[0] - first_day: window[1] - first_day + 1].sum(axis=0)
            pred = (total * mask).sum() / mask.sum()
            _add(pairs["glacier-wide"], season, year, obs, pred)

    study_set = set(study)
    for i in range(len(tensors.stake_balance)):
        k, code = int(tensors.stake_year[i]), int(tensors.stake_code[i])
        if k not in study_set or code >= len(SEASONS):  # spin-up year or 'index' stake
            continue
        begin = max(int(tensors.stake_begin_day[i]), first_day)
        end = min(int(tensors.stake_end_day[i]), last_day)
        cell = daily_smb[begin - first_day: end - first_day + 1, tensors.stake_row[i], tensors.stake_col[i]]
        _add(pairs["point"], SEASONS[code], int(tensors.years[k]), tensors.stake_balance[i], cell.sum())

    result = {"metrics": {}, "true_pred": pairs}
    for scale in SCALES:
        p = pairs[scale]
        result["metrics"][scale] = {
            "overall": {s: metrics(p["overall"][s]["true"], p["overall"][s]["pred"]) for s in SEASONS},
            "per_year": {
                s: {y: metrics(v["true"], v["pred"]) for y, v in p["per_year"][s].items()} for s in SEASONS
            },
        }
    return result


def pool(evaluations: list[dict]) -> dict:
    """Pool the overall true/pred pairs of several glaciers' evaluations and recompute metrics.

    Returns ``{scale: {season: metrics}}``.
    """
    out = {}
    for scale in SCALES:
        out[scale] = {}
        for season in SEASONS:
            true, pred = [], []
            for ev in evaluations:
                pair = ev["true_pred"][scale]["overall"][season]
                true += pair["true"]
                pred += pair["pred"]
            out[scale][season] = metrics(true, pred)
    return out
