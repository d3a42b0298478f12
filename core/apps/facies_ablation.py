"""The facies ablation: does model D use its facies maps?

D's weights are run twice on each glacier, once with its end-of-summer facies maps and once with
the −1 placeholder in their place (the inputs model C gets), and both are scored on the study
years that have a map only (in the other years both runs are identical). Point and glacier-wide
metrics per season are pooled over the glaciers (docs/synthetic_twin.md, "Science check").

    python -m core.apps.facies_ablation --params_path outputs/science/params/d.eqx \\
        --data_folder data/science [--glaciers NAME ...] [--json ablation.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Iterable, Iterator, Sequence

import numpy as np

from core.apps.cli import add_data_folder, main_wrapper
from core.evaluate.metrics import evaluate, pool
from core.evaluate.summary import format_table
from core.execute import distributed
from core.infer.runner import iter_daily_smb
from core.io import atomic_write_json
from core.models import load_model
from core.workflows import resolve_params_path
from dataloader import Dataset, resolve_data_folder
from glaunti.layouts import make_arrays

MODEL = "d"
VARIANTS = {"with_maps": True, "without_maps": False}
LABELS = {"with_maps": "D with maps", "without_maps": "D, -1 placeholder"}


class DaySpans:
    """Stretches of a daily SMB series (T, H, W), sliced like the whole series.

    ``evaluate`` reads windows of days only, so the days outside the scored windows need not be
    kept. ``first_day`` and ``shape[0]`` describe the whole series (stake windows are clipped to
    it); reading a day that was not kept is an error, never a silent zero.
    """

    def __init__(self, pieces: Sequence[tuple[int, np.ndarray]], first_day: int, n_days: int):
        self.pieces = sorted(pieces, key=lambda p: p[0])
        self.first_day = first_day
        grid = self.pieces[0][1].shape[1:] if self.pieces else (0, 0)
        self.shape = (n_days, *grid)

    def __getitem__(self, key) -> np.ndarray:
        days, *cell = key if isinstance(key, tuple) else (key,)
        if not isinstance(days, slice) or days.step not in (None, 1):
            raise TypeError("DaySpans is indexed by a contiguous slice of days")
        start = 0 if days.start is None else days.start
        stop = self.shape[0] if days.stop is None else min(days.stop, self.shape[0])
        if start < 0:
            raise KeyError(f"day {self.first_day + start} lies before the series")
        first, last = self.first_day + start, self.first_day + stop - 1
        parts, day = [], first
        for piece_day, data in self.pieces:
            end = piece_day + len(data) - 1
            if end < day or piece_day > last:
                continue
            if piece_day > day:
                break
            parts.append(data[day - piece_day: min(end, last) - piece_day + 1])
            day = min(end, last) + 1
        if day <= last:
            raise KeyError(f"days {first}–{last}: day {day} was not kept")
        joined = np.concatenate(parts) if parts else np.zeros((0, *self.shape[1:]), np.float32)
        return joined[(slice(None), *cell)] if cell else joined


def scored_windows(tensors) -> list[tuple[int, int]]:
    """Inclusive climate-day windows that ``evaluate`` reads for the study years of ``tensors``:
    each year's begin–end and each stake reading of those years."""
    study = np.flatnonzero(np.asarray(tensors.study))
    windows = [(int(tensors.begin_day[k]), int(tensors.end_day[k])) for k in study]
    stake_year = np.asarray(tensors.stake_year)
    for i in np.flatnonzero(np.isin(stake_year, study)):
        windows.append((int(tensors.stake_begin_day[i]), int(tensors.stake_end_day[i])))
    return windows


def keep_days(chunks: Iterable[tuple[int, np.ndarray]], windows: Sequence[tuple[int, int]]) -> DaySpans:
    """The chunks of ``iter_daily_smb`` that overlap any of ``windows``, as a :class:`DaySpans`
    of the whole series; memory grows with the scored years, not the period."""
    kept, first_day, next_day = [], None, None
    for day, data in chunks:
        first_day = day if first_day is None else first_day
        next_day = day + len(data)
        if any(a <= next_day - 1 and b >= day for a, b in windows):
            kept.append((day, data))
    if first_day is None:
        raise ValueError("no daily SMB to keep: the glacier has no study year")
    return DaySpans(kept, first_day, next_day - first_day)


def map_year_tensors(tensors):
    """``tensors`` with only its study years that have a facies map scored."""
    return dataclasses.replace(tensors, study=np.asarray(tensors.study) & np.asarray(tensors.has_facies))


def evaluate_variants(model, tensors) -> dict[str, dict]:
    """``{variant: evaluation}`` of one glacier, map years only (``core.evaluate.metrics.evaluate``)."""
    scored = map_year_tensors(tensors)
    windows = scored_windows(scored)
    out = {}
    for variant, facies in VARIANTS.items():
        arrays = make_arrays(tensors, facies=facies)
        daily = keep_days(iter_daily_smb(model, arrays, tensors), windows)
        out[variant] = evaluate(scored, daily, daily.first_day)
    return out


def _iter_map_glaciers(dataset: Dataset, names: Sequence[str]) -> Iterator[tuple[str, object, list[int]]]:
    for tensors in dataset.iter_glaciers(names):
        scored = np.asarray(tensors.study) & np.asarray(tensors.has_facies)
        yield tensors.name, tensors, [int(y) for y in np.asarray(tensors.years)[scored]]


def facies_ablation(data_folder=None, params_path=None, glaciers: Sequence[str] | None = None) -> dict:
    """Model D (``params_path``; default as ``infer_and_evaluate.py``) with and without its
    facies maps on ``glaciers`` (default: the validation and test folds), scored on the study
    years that have a map.

    Returns ``{"params_path", "glaciers": {name: [map years]}, "with_maps": pooled,
    "without_maps": pooled, "per_glacier": {name: {variant: pooled}}}``, where pooled is
    ``core.evaluate.metrics.pool``'s ``{scale: {season: metrics}}``. Glaciers without a map in a study
    year are listed with no years and not scored.
    """
    distributed.setup()
    dataset = Dataset(resolve_data_folder(data_folder))
    names = list(glaciers) if glaciers else [*dataset.val_names, *dataset.test_names]
    if not names:
        raise ValueError(f"{dataset.index_path}: no validation or test glacier; name the glaciers")
    for name in names:
        dataset.info(name)  # an unknown name fails before anything is computed
    params_path = resolve_params_path(MODEL, params_path)
    model = load_model(MODEL, params_path)
    evaluations: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    result: dict = {"params_path": str(params_path), "glaciers": {}, "per_glacier": {}}
    for name, tensors, years in _iter_map_glaciers(dataset, names):
        result["glaciers"][name] = years
        if not years:
            continue
        per_variant = evaluate_variants(model, tensors)
        result["per_glacier"][name] = {v: pool([ev]) for v, ev in per_variant.items()}
        for variant, ev in per_variant.items():
            evaluations[variant].append(ev)
    if not result["per_glacier"]:
        raise ValueError(f"none of {', '.join(names)} has a facies map in a study year")
    for variant, evs in evaluations.items():
        result[variant] = pool(evs)
    return result


def format_ablation(result: dict) -> str:
    """The pooled table of both runs (n, r, RMSE, bias; annual / winter / summer)."""
    scored = {name: years for name, years in result["glaciers"].items() if years}
    lines = [f"Facies ablation of model D ({result['params_path']}), {len(scored)} glaciers, "
             f"{sum(len(y) for y in scored.values())} glacier-years with a map:",
             format_table({LABELS[v]: result[v] for v in VARIANTS})]
    skipped = sorted(set(result["glaciers"]) - set(scored))
    if skipped:
        lines.append(f"without a map in a study year (not scored): {', '.join(skipped)}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.apps.facies_ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params_path", default=None,
                   help="D's parameters (.eqx); default params/d.eqx if trained, else the published "
                        "weights")
    add_data_folder(p)
    p.add_argument("--glaciers", nargs="+", default=None,
                   help="Glacier names (default: the validation and test folds)")
    p.add_argument("--json", default=None, help="Also write the result to this JSON file")
    return p


@main_wrapper
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    result = facies_ablation(args.data_folder, args.params_path, args.glaciers)
    if args.json:
        atomic_write_json(args.json, result)
    print(format_ablation(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
