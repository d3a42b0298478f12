"""The facies ablation (core/apps/facies_ablation.py): D with and without its maps, map years only,
scored exactly as the full evaluation scores those years."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import daily_series
from core.apps.facies_ablation import (
    DaySpans,
    facies_ablation,
    keep_days,
    main,
    map_year_tensors,
)
from core.evaluate.metrics import SCALES, SEASONS, evaluate, pool
from core.models import load_model, published_params_path
from core.workflows import infer_and_evaluate
from dataloader import Dataset
from glaunti.layouts import make_arrays

PUBLISHED_D = published_params_path("d")


@pytest.fixture(scope="module")
def mapped(tiny_twin):
    """A validation/test glacier of the tiny twin with facies maps in study years, and those years."""
    dataset = Dataset(tiny_twin)
    for name in [*dataset.val_names, *dataset.test_names]:
        tensors = dataset.glacier(name)
        years = np.asarray(tensors.years)[np.asarray(tensors.study) & np.asarray(tensors.has_facies)]
        if years.size:
            return name, [int(y) for y in years]
    pytest.fail("the tiny twin has no validation/test glacier with facies maps")


def _restricted(evaluation: dict, years: list[int]) -> dict:
    """An evaluation's pairs of ``years`` only, pooled as 'overall'."""
    pairs = {}
    for scale in SCALES:
        pairs[scale] = {"overall": {}}
        for season in SEASONS:
            per_year = evaluation["true_pred"][scale]["per_year"][season]
            pairs[scale]["overall"][season] = {
                key: [v for y in years for v in per_year[str(y)][key]] for key in ("true", "pred")}
    return {"true_pred": pairs}


def _assert_same_metrics(got: dict, expected: dict):
    for scale in SCALES:
        for season in SEASONS:
            a, b = got[scale][season], expected[scale][season]
            assert a["n"] == b["n"], (scale, season)
            for key in ("rmse", "bias", "mae"):
                if key in b:
                    assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (scale, season, key)


def test_ablation_scores_map_years_as_the_full_evaluation(tiny_twin, mapped, tmp_path, capsys):
    name, years = mapped
    out = tmp_path / "ablation.json"
    assert main(["--data_folder", str(tiny_twin), "--params_path", str(PUBLISHED_D),
                 "--glaciers", name, "--json", str(out)]) == 0
    assert "D with maps" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["glaciers"] == {name: years}

    # With maps: the published path (daily NetCDF of the whole period, then evaluated), map years.
    full = infer_and_evaluate("d", name, tmp_path / "d.nc", tmp_path / "d.json",
                              params_path=PUBLISHED_D, data_folder=tiny_twin)
    _assert_same_metrics(result["with_maps"], pool([_restricted(full, years)]))

    # Without maps: D on C's inputs, the whole series in memory, scored on the map years.
    tensors = Dataset(tiny_twin).glacier(name)
    daily, first_day = daily_series(load_model("d", PUBLISHED_D), make_arrays(tensors, facies=False), tensors)
    expected = evaluate(map_year_tensors(tensors), daily.values, first_day)
    _assert_same_metrics(result["without_maps"], pool([expected]))

    # Every observation of the map years is scored, nothing else.
    totals = pd.read_csv(tiny_twin / name / "total_smb.csv")
    annual = totals[totals["year"].isin(years)]["annual_balance"].notna().sum()
    assert result["with_maps"]["glacier-wide"]["annual"]["n"] == annual
    points = pd.read_csv(tiny_twin / name / "point_smb.csv")
    stakes = ((points["balance_code"] == "annual") & points["year"].isin(years)).sum()
    assert result["with_maps"]["point"]["annual"]["n"] == stakes > 0
    # D reads its maps: the two runs differ in the map years.
    assert result["with_maps"]["point"]["annual"]["rmse"] != result["without_maps"]["point"]["annual"]["rmse"]


def test_day_spans_read_kept_days_only():
    pieces = [(10, np.arange(5 * 4, dtype=np.float32).reshape(5, 2, 2)),
              (15, 100 + np.arange(3 * 4, dtype=np.float32).reshape(3, 2, 2)),
              (18, 200 + np.arange(4 * 4, dtype=np.float32).reshape(4, 2, 2))]
    whole = np.concatenate([p for _, p in pieces])
    kept = keep_days(iter(pieces), [(12, 16)])  # overlaps the first two pieces only
    assert kept.first_day == 10 and kept.shape == (12, 2, 2)
    np.testing.assert_array_equal(kept[2:7], whole[2:7])
    np.testing.assert_array_equal(kept[0:8, 1, 0], whole[0:8, 1, 0])
    with pytest.raises(KeyError, match="day 18 was not kept"):
        kept[6:9]
    with pytest.raises(KeyError, match="before the series"):
        kept[-1:3]
    # Stake windows are clipped to the series, as evaluate() does: the full series reads alike.
    all_kept = DaySpans(pieces, 10, 12)
    np.testing.assert_array_equal(all_kept[5:40], whole[5:])


def test_cli_errors_name_the_problem(tiny_twin, capsys):
    assert main(["--data_folder", str(tiny_twin), "--glaciers", "Nowhere Glacier"]) == 2
    assert "Nowhere Glacier" in capsys.readouterr().err
    dataset = Dataset(tiny_twin)
    without = [n for n in dataset.names if not (tiny_twin / n / "facies.nc").exists()]
    with pytest.raises(ValueError, match="has a facies map in a study year"):
        facies_ablation(tiny_twin, PUBLISHED_D, without[:1])


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--params_path" in text and "placeholder" in text
