"""Cross-validation (crossvalidate.py, core.apps.crossvalidation): the fold rotation, the local
baseline's years, and a reduced run on the tiny twin (two folds, one epoch, model A and the
local A) whose tables are checked against its evaluation files, and whose resumed runs end
with the same tables, byte for byte, as an uninterrupted one."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import numpy as np
import pytest
import xarray as xr

import crossvalidate
import summarise
from core.apps import crossvalidation
from core.apps.crossvalidation import LOCAL, Rotation, label, local_split, make_plan, rotations
from core.evaluate.metrics import evaluate
from core.models import load_model, published_params_path
from core.workflows import evaluate_smb_file, infer_and_evaluate
from dataloader.dataset import Dataset

# One epoch of everything (published epochs × 0.001, at least one), model A and the local A: each
# further model compiles its gradient and its inference anew (C's take minutes on two busy
# cores), and runs the same stage code as A.
REDUCED = ["--epochs_scale", "0.001", "--models", "a", "--quiet"]
BOTH_FOLDS = [*REDUCED, "--folds", "0", "1"]
OUTPUTS = ("summary.txt", "summary.json")


def test_rotations_validate_on_the_next_fold_and_wrap():
    assert rotations([3, 0, 2, 1, 0]) == [Rotation(0, 1, (2, 3)), Rotation(1, 2, (0, 3)),
                                          Rotation(2, 3, (0, 1)), Rotation(3, 0, (1, 2))]
    assert rotations([0, 2, 5], [5]) == [Rotation(5, 0, (2,))]
    with pytest.raises(ValueError, match=r"not folds of the dataset.*\[0, 1, 2\]"):
        rotations([0, 1, 2], [7])
    with pytest.raises(ValueError, match="at least 3 folds"):
        rotations([0, 1])


def test_local_split_published_windows_or_quarters():
    published = local_split(range(1995, 2023))
    assert (published.train, published.val, published.evaluation, published.rule) == \
        ((1995, 2012), (2013, 2018), (2019, 2022), "published")
    science = local_split(range(1995, 2007))  # the twins end before 2013: quarters
    assert (science.train, science.val, science.evaluation, science.rule) == \
        ((1995, 2000), (2001, 2003), (2004, 2006), "quarters")
    tiny = local_split([1998, 1996, 1995, 1997])
    assert (tiny.train, tiny.val, tiny.evaluation) == ((1995, 1996), (1997, 1997), (1998, 1998))
    ends_2018 = local_split(range(1995, 2019))  # no year after the published validation window
    assert ends_2018.rule == "quarters" and ends_2018.evaluation == (2013, 2018)
    assert local_split([2000, 2001]) is None


def test_plan_orders_models_and_scales_epochs():
    plan = make_plan("dcab", epochs_scale=0.1)
    assert plan.models == "abcd" and plan.stages == ["a", LOCAL, "b", "c", "d"]
    assert plan.epochs == {"a": 5, "b": 10, "c": 5, "d": 5, LOCAL: 25}
    assert make_plan("ab", local_baseline=False).stages == ["a", "b"]
    with pytest.raises(ValueError, match="model D starts from model C"):
        make_plan("abd")
    with pytest.raises(ValueError, match="expected letters of abcd"):
        make_plan("ax")


def test_dataset_split_by_given_folds(tiny_twin):
    dataset = Dataset(tiny_twin)
    assert dataset.fold_ids == [0, 1, 2, 3]
    default = dataset.split()
    assert (default.train, default.val, default.test) == \
        (dataset.train_names, dataset.val_names, dataset.test_names)
    split = dataset.split(test_fold=1, val_fold=2)
    folds = dataset.folds
    assert {folds[n] for n in split.test} == {1} and {folds[n] for n in split.val} == {2}
    assert {folds[n] for n in split.train} == {0, 3}
    assert sorted(split.train + split.val + split.test) == sorted(dataset.names)
    with pytest.raises(ValueError, match="both 1"):
        dataset.split(1, 1)


@pytest.fixture(scope="module")
def runs(tiny_twin, tmp_path_factory):
    """An uninterrupted two-fold run, and the same run interrupted after its first fold."""
    root = tmp_path_factory.mktemp("crossvalidation")
    whole, resumed = root / "whole", root / "resumed"
    data = ["--data_folder", str(tiny_twin)]
    releases = []  # rotations that began by freeing the compiled functions of the one before
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(crossvalidation, "release_compiled",
                      lambda: releases.append(sorted(p.parent.name for p in whole.glob("fold_*/done"))))
        assert crossvalidate.main([*data, "--out_dir", str(whole), *BOTH_FOLDS]) == 0
    assert crossvalidate.main([*data, "--out_dir", str(resumed), *REDUCED, "--folds", "0"]) == 0
    assert not (resumed / "fold_1").exists()
    assert crossvalidate.main([*data, "--out_dir", str(resumed), *BOTH_FOLDS]) == 0
    return {"whole": whole, "resumed": resumed, "data": data, "releases": releases}


def _pairs(folder: Path, scale: str, season: str):
    true, pred = [], []
    for path in sorted(folder.glob("*.json")):
        pair = json.loads(path.read_text())["true_pred"][scale]["overall"][season]
        true += pair["true"]
        pred += pair["pred"]
    return np.array(true), np.array(pred)


def _rmse(folders, scale, season):
    pairs = [_pairs(f, scale, season) for f in folders]
    true = np.concatenate([t for t, _ in pairs])
    pred = np.concatenate([p for _, p in pairs])
    return float(np.sqrt(np.mean((pred - true) ** 2)))


def test_rotations_free_the_compiled_functions_of_the_last(runs):
    """Once, when fold 1 begins (the memory maps of one rotation's executables are freed before
    the next compiles: ``core.execute.compiles.release_compiled``)."""
    assert runs["releases"] == [["fold_0"]]


def test_resumed_run_ends_with_the_same_tables(runs):
    for name in OUTPUTS:
        assert (runs["resumed"] / name).read_bytes() == (runs["whole"] / name).read_bytes(), name


def test_a_stage_interrupted_during_evaluation_continues(runs):
    """Fold 1's A stage lost its marker and one test glacier's evaluations: the rerun evaluates
    that glacier again (training resumes from its complete checkpoint) and ends as before."""
    out = runs["resumed"]
    glacier = sorted((out / "fold_1" / "eval" / "a").glob("*.json"))[0].name
    for path in (out / "fold_1" / "done" / "a.json", out / "fold_1" / "eval" / "a" / glacier,
                 out / "fold_1" / "local" / "eval" / "a" / glacier, out / "summary.txt", out / "summary.json"):
        path.unlink()
    assert crossvalidate.main([*runs["data"], "--out_dir", str(out), *BOTH_FOLDS]) == 0
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (runs["whole"] / name).read_bytes(), name


def test_other_settings_are_refused(runs, capsys):
    other = [a if a != "0.001" else "0.02" for a in BOTH_FOLDS]  # local A: 5 epochs, not 1
    assert crossvalidate.main([*runs["data"], "--out_dir", str(runs["whole"]), *other]) == 2
    err = capsys.readouterr().err
    assert "crossvalidation.json" in err and "epochs" in err and "--out_dir" in err


def test_tables_agree_with_the_evaluation_files(runs):
    out = runs["whole"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["folds"] == [0, 1]
    tiny = Dataset(runs["data"][1])
    transferred = summary["transferred"]
    assert list(transferred["pooled"]) == [label("a")]
    # Every glacier of folds 0 and 1 is tested exactly once.
    tested = {p.stem for k in (0, 1) for p in (out / f"fold_{k}" / "eval" / "a").glob("*.json")}
    assert tested == {n for n, f in tiny.folds.items() if f in (0, 1)}
    assert transferred["pooled"][label("a")]["glaciers"] == len(tested)
    folders = [out / f"fold_{k}" / "eval" / "a" for k in (0, 1)]
    for scale in ("point", "glacier-wide"):
        per_fold = [_rmse([f], scale, "annual") for f in folders]
        by_fold = transferred["per_fold"][label("a")]
        assert [by_fold[f"fold_{k}"][scale]["annual"]["rmse"] for k in (0, 1)] == \
            pytest.approx(per_fold, rel=1e-12)
        assert transferred["pooled"][label("a")][scale]["annual"]["rmse"] == \
            pytest.approx(_rmse(folders, scale, "annual"), rel=1e-12)
        stat = transferred["spread"][label("a")][scale]["annual"]["rmse"]
        assert stat["folds"] == 2
        assert stat["mean"] == pytest.approx(statistics.mean(per_fold), rel=1e-12)
        assert stat["std"] == pytest.approx(statistics.stdev(per_fold), rel=1e-12)
    # The text table shows that mean ± sd in A's point-annual row.
    stat = transferred["spread"][label("a")]["point"]["annual"]["rmse"]
    rows = [line for line in (out / "summary.txt").read_text().splitlines()
            if line.startswith(label("a")) and " point " in line and " annual " in line]
    assert any(f"{stat['mean']:.3f} ± {stat['std']:.3f}" in row for row in rows)


def test_local_baseline_on_the_same_later_years(runs):
    out = runs["whole"]
    for k in (0, 1):
        fold = out / f"fold_{k}"
        windows = json.loads((fold / "local" / "windows.json").read_text())
        for glacier, window in windows.items():  # tiny: 1995–1998, quarters
            assert window == {"train": [1995, 1996], "val": [1997, 1997], "evaluation": [1998, 1998],
                              "rule": "quarters"}
            local = json.loads((fold / "local" / "eval" / LOCAL / f"{glacier}.json").read_text())
            assert set(local["true_pred"]["glacier-wide"]["per_year"]["annual"]) == {"1998"}
            full = json.loads((fold / "eval" / "a" / f"{glacier}.json").read_text())
            later = json.loads((fold / "local" / "eval" / "a" / f"{glacier}.json").read_text())
            for scale in ("point", "glacier-wide"):
                for season in ("annual", "winter", "summer"):
                    # Exactly the 1998 observations of the full evaluation, the same predictions.
                    assert later["true_pred"][scale]["overall"][season] == \
                        full["true_pred"][scale]["per_year"][season]["1998"]
                    assert later["true_pred"][scale]["overall"][season]["true"] == \
                        local["true_pred"][scale]["overall"][season]["true"]
            # The fine-tuning (from this fold's A) moved the parameters.
            a = load_model("a", fold / "params" / "a.eqx")
            tuned = load_model("a", fold / "local" / "params" / f"{glacier}.eqx")
            assert not eqx.tree_equal(a, tuned)
    local = json.loads((out / "summary.json").read_text())["local"]
    assert list(local["pooled"]) == [label(LOCAL), label("a")]
    assert local["pooled"][label(LOCAL)]["point"]["annual"]["rmse"] == pytest.approx(
        _rmse([out / f"fold_{k}" / "local" / "eval" / LOCAL for k in (0, 1)], "point", "annual"), rel=1e-12)


def test_figure_and_summarise_cli(runs, capsys):
    out = runs["whole"]
    assert (out / "per_fold_rmse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob("*.nc")) and not list(out.rglob("*.tmp"))  # SMB files dropped
    capsys.readouterr()
    assert summarise.main(["--crossvalidation", str(out)]) == 0
    assert capsys.readouterr().out == (out / "summary.txt").read_text()
    assert summarise.main(["--crossvalidation", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((out / "summary.json").read_text())


def test_exported_folds_give_the_same_tables_and_are_not_run_again(runs, tmp_path, capsys):
    """The export keeps the evaluation files and markers, not the weights: the tables read from
    it are the run's, and continuing it computes nothing (no weights appear)."""
    dest = tmp_path / "exported"
    assert crossvalidate.main(["--out_dir", str(runs["whole"]), "--export", str(dest)]) == 0
    assert not list(dest.rglob("*.eqx*")) and not list(dest.rglob("*.csv"))
    markers = sorted(p.name for p in dest.glob("fold_*/done/*.json"))
    assert markers == ["a.json", "a.json", "a_local.json", "a_local.json"]
    capsys.readouterr()
    assert summarise.main(["--crossvalidation", str(dest)]) == 0
    assert capsys.readouterr().out == (runs["whole"] / "summary.txt").read_text()
    assert crossvalidate.main([*runs["data"], "--out_dir", str(dest), *BOTH_FOLDS]) == 0
    assert not list(dest.rglob("params"))
    assert (dest / "summary.json").read_bytes() == (runs["whole"] / "summary.json").read_bytes()


def test_summarise_needs_folders_or_crossvalidation(capsys):
    with pytest.raises(SystemExit) as exit_info:
        summarise.main([])
    assert exit_info.value.code == 2
    assert "--crossvalidation" in capsys.readouterr().err


def test_script_has_help():
    out = subprocess.run([sys.executable, "crossvalidate.py", "--help"], cwd=Path(crossvalidate.__file__).parent,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for option in ("--data_folder", "--out_dir", "--folds", "--models", "--epochs_scale", "--no_local", "--export"):
        assert option in out.stdout


def test_evaluation_years_score_only_their_observations(tiny_twin, tmp_path):
    """``infer_and_evaluate`` and ``evaluate_smb_file`` equal ``evaluate`` on the whole daily
    series read back from the NetCDF; a years window keeps exactly those years' pairs."""
    glacier = Dataset(tiny_twin).test_names[0]
    smb_path = tmp_path / "smb.nc"
    full = infer_and_evaluate("a", glacier, smb_path, tmp_path / "eval.json",
                              params_path=published_params_path("a"), data_folder=tiny_twin)
    tensors = Dataset(tiny_twin).glacier(glacier)
    with xr.open_dataset(smb_path) as nc:
        daily = nc["smb"].values
        first_day = int((nc.time.values[0] - tensors.first_date.astype("datetime64[ns]")) // np.timedelta64(1, "D"))
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written.pop("params")["path"] == str(published_params_path("a"))
    assert written == json.loads(json.dumps(evaluate(tensors, daily, first_day)))
    window = evaluate_smb_file(tensors, smb_path, (1997, 1998))
    for scale in ("point", "glacier-wide"):
        for season in ("annual", "winter", "summer"):
            assert set(window["true_pred"][scale]["per_year"][season]) == {"1997", "1998"}
            pairs = window["true_pred"][scale]["overall"][season]
            expected = [full["true_pred"][scale]["per_year"][season][y] for y in ("1997", "1998")]
            assert sorted(zip(pairs["true"], pairs["pred"])) == \
                sorted(p for e in expected for p in zip(e["true"], e["pred"]))
    assert window["metrics"]["glacier-wide"]["overall"]["annual"]["n"] == \
        sum(full["metrics"]["glacier-wide"]["per_year"]["annual"][y]["n"] for y in ("1997", "1998"))
