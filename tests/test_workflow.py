"""The published workflow on the synthetic twin: training scripts, resume, fine-tuning,
inference + evaluation, and the summary table."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import numpy as np
import pytest
import xarray as xr

import finetune
import infer_and_evaluate
import summarise
import train_a
import train_b
import train_c
import train_d
from core.evaluate.metrics import SCALES, SEASONS, metrics
from core.models import load_model
from dataloader import Dataset

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"a": train_a, "b": train_b, "c": train_c, "d": train_d}


@pytest.fixture(scope="module")
def trained(tiny_twin, tmp_path_factory):
    """A → B → C → D, two epochs each, through the scripts' entry points."""
    out = tmp_path_factory.mktemp("trained")
    for model, script in SCRIPTS.items():
        args = ["--data_folder", str(tiny_twin), "--epochs", "2", "--quiet",
                "--params_path", str(out / f"{model}.eqx"), "--log_path", str(out / f"{model}.csv")]
        if model in "cd":
            args += ["--init_params_path", str(out / ("a.eqx" if model == "c" else "c.eqx"))]
        assert script.main(args) == 0
    return out


@pytest.mark.parametrize("model", "abcd")
def test_training_writes_params_and_logs(trained, tiny_twin, model):
    params = load_model(model, trained / f"{model}.eqx")
    assert params is not None
    dataset = Dataset(tiny_twin)
    with open(trained / f"{model}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # Validation glaciers at epochs 0, 1, 2; training glaciers at epochs 1, 2.
    expected = 3 * len(dataset.val_names) + 2 * len(dataset.train_names)
    assert len(rows) == expected
    assert {r["subset"] for r in rows} == {"train", "val"}
    for row in rows:
        assert np.isfinite(float(row["loss"]))
        assert float(row["epoch_time_s"]) >= 0
        for season in SEASONS:
            assert f"point_{season}_mse" in row and f"total_{season}_n" in row
    assert not list(trained.glob("*.tmp"))


def test_c_keeps_a_frozen_and_d_starts_from_c(trained):
    a = load_model("a", trained / "a.eqx")
    c = load_model("c", trained / "c.eqx")
    assert eqx.tree_equal(c.ti, a)
    d = load_model("d", trained / "d.eqx")
    assert eqx.tree_equal(d.ti, a)


def test_c_requires_calibrated_a(tiny_twin, tmp_path, capsys):
    code = train_c.main(["--data_folder", str(tiny_twin), "--epochs", "1", "--quiet",
                         "--init_params_path", str(tmp_path / "missing.eqx"),
                         "--params_path", str(tmp_path / "c.eqx"), "--log_path", str(tmp_path / "c.csv")])
    assert code == 2
    err = capsys.readouterr().err
    assert "missing.eqx" in err and "train_a.py" in err
    assert not (tmp_path / "c.eqx").exists()


def test_resume_after_kill_matches_uninterrupted(tiny_twin, tmp_path):
    """Kill -9 a training run mid-way, resume it, and compare with an uninterrupted run."""
    epochs = 6
    common = [sys.executable, str(REPO / "train_a.py"), "--data_folder", str(tiny_twin),
              "--epochs", str(epochs), "--learning_rate", "0.05", "--quiet"]
    full = tmp_path / "full"
    subprocess.run(common + ["--params_path", str(full / "a.eqx"), "--log_path", str(full / "a.csv")],
                   check=True, cwd=REPO, capture_output=True)

    part = tmp_path / "part"
    args = common + ["--params_path", str(part / "a.eqx"), "--log_path", str(part / "a.csv")]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    log = part / "a.csv"
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and any(r["epoch"] == "2" for r in csv.DictReader(open(log))):
            break
        time.sleep(0.05)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed, "training finished before it could be killed; make the run longer"
    rows = list(csv.DictReader(open(log)))
    assert max(int(r["epoch"]) for r in rows) < epochs

    subprocess.run(args + ["--resume"], check=True, cwd=REPO, capture_output=True)
    assert (part / "a.eqx").read_bytes() == (full / "a.eqx").read_bytes()
    resumed = list(csv.DictReader(open(log)))
    uninterrupted = list(csv.DictReader(open(full / "a.csv")))
    assert [(r["epoch"], r["glacier"], r["subset"], r["loss"]) for r in resumed] == \
        [(r["epoch"], r["glacier"], r["subset"], r["loss"]) for r in uninterrupted]


def test_infer_and_evaluate_outputs(trained, tiny_twin, tmp_path):
    dataset = Dataset(tiny_twin)
    glacier = dataset.test_names[0]
    smb_path, eval_path = tmp_path / "smb.nc", tmp_path / "eval.json"
    code = infer_and_evaluate.main(["c", glacier, str(smb_path), str(eval_path), "--quiet",
                                    "--params_path", str(trained / "c.eqx"), "--data_folder", str(tiny_twin)])
    assert code == 0
    with xr.open_dataset(smb_path) as ds:
        smb = ds["smb"]
        assert smb.dims == ("time", "y", "x")
        assert smb.attrs["units"] == "m w.e. d-1"
        assert "crs_wkt" in ds["spatial_ref"].attrs
        assert smb.attrs["grid_mapping"] == "spatial_ref"
        assert np.all(np.diff(ds.time.values) == np.timedelta64(1, "D"))
        assert np.isfinite(smb.values).all()
    tensors = dataset.glacier(glacier)
    np.testing.assert_array_equal(xr.open_dataset(smb_path).x.values, tensors.x)
    result = json.loads(eval_path.read_text())
    assert set(result) == {"params", "metrics", "true_pred"}
    for scale in SCALES:
        for season in SEASONS:
            pair = result["true_pred"][scale]["overall"][season]
            assert result["metrics"][scale]["overall"][season]["n"] == len(pair["true"]) == len(pair["pred"])


def test_summarise_reproduces_its_inputs(trained, tiny_twin, tmp_path, capsys):
    dataset = Dataset(tiny_twin)
    folder = tmp_path / "eval"
    for glacier in dataset.test_names:
        assert infer_and_evaluate.main(["a", glacier, str(tmp_path / f"{glacier}.nc"),
                                        str(folder / f"{glacier}.json"), "--quiet",
                                        "--params_path", str(trained / "a.eqx"),
                                        "--data_folder", str(tiny_twin)]) == 0
    assert summarise.main([str(folder), "--json"]) == 0
    pooled = json.loads(capsys.readouterr().out)[str(folder)]
    evaluations = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    for scale in SCALES:
        for season in SEASONS:
            true = [v for ev in evaluations for v in ev["true_pred"][scale]["overall"][season]["true"]]
            pred = [v for ev in evaluations for v in ev["true_pred"][scale]["overall"][season]["pred"]]
            assert pooled[scale][season] == metrics(true, pred)
    # One glacier alone: the pooled numbers are that glacier's own overall metrics.
    single = tmp_path / "single"
    single.mkdir()
    one = sorted(folder.glob("*.json"))[0]
    (single / one.name).write_text(one.read_text())
    assert summarise.main([str(single), "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)[str(single)]
    for scale in SCALES:
        assert alone[scale] == json.loads(one.read_text())["metrics"][scale]["overall"]
    assert summarise.main([str(folder)]) == 0
    assert "glacier-wide" in capsys.readouterr().out


def test_finetune_on_one_glacier(trained, tiny_twin, tmp_path):
    glacier = Dataset(tiny_twin).test_names[0]
    final = tmp_path / "a_ft.eqx"
    code = finetune.main([glacier, "--data_folder", str(tiny_twin), "--init_params_path", str(trained / "a.eqx"),
                          "--final_params_path", str(final), "--log_path", str(tmp_path / "ft.csv"),
                          "--epochs", "3", "--train_years", "1995", "1996", "--val_years", "1997", "1998",
                          "--quiet"])
    assert code == 0
    model = load_model("a", final)
    rows = list(csv.DictReader(open(tmp_path / "ft.csv")))
    assert {r["glacier"] for r in rows} == {glacier}
    assert len(rows) == 3 + 3  # published rule: validation and training at epochs 1..3, no epoch 0
    assert model is not None


def test_scripts_have_help():
    for script in ("train_a.py", "train_b.py", "train_c.py", "train_d.py", "infer_and_evaluate.py",
                   "finetune.py", "summarise.py"):
        out = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "--data_folder" in out.stdout or script == "summarise.py"


def test_demo_runs_end_to_end_on_a_tiny_twin(tiny_twin, tmp_path, capsys):
    """`make demo`'s job, scaled down (model A, one epoch, no real glacier): every test glacier
    gets its daily SMB file and evaluation (batched inference), and the summary is written."""
    from core.apps import demo

    out = tmp_path / "out"
    assert demo.main(["--data_folder", str(tiny_twin), "--out_dir", str(out), "--models", "a",
                      "--epochs_scale", "0.02", "--no_real", "--quiet"]) == 0
    tests = Dataset(tiny_twin).test_names
    assert tests and sorted(p.stem for p in (out / "smb" / "a").glob("*.nc")) == sorted(tests)
    assert sorted(p.stem for p in (out / "eval" / "a").glob("*.json")) == sorted(tests)
    assert "point" in (out / "summary.txt").read_text()
    assert "Test glaciers" in capsys.readouterr().out
