"""The bad-input catalogue: broken copies of the synthetic twin fed to the real entry points.

Every case must stop with exit code 2 and exactly one line ``error: <message>`` on stderr that
names the file and the field, print no traceback, leave no output file (params, log, NetCDF,
JSON, temporary files) and no half-built cache entry behind, and stop before anything is
compiled (the training loop and the model inputs are replaced by tripwires here).
Most cases call ``script.main([...])`` in-process; a few run the scripts as subprocesses.
"""

from __future__ import annotations

import csv
import datetime
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import xarray as xr

import core.workflows
import finetune
import infer_and_evaluate
import summarise
import train_a
import train_c
import train_d
from dataloader.cache import entry_stem
from glaunti.params import leaf_manifest, template

REPO = Path(__file__).resolve().parents[1]
CACHE = ".glaunti_cache"


# ---------------------------------------------------------------------------------------------
# Fixtures: names of the twin's glaciers, parameter files, a fresh copy per case


def _index(folder: Path) -> list[dict]:
    with open(folder / "index.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def names(tiny_twin) -> dict[str, str]:
    """T: first test glacier, V: first validation glacier (read first by training),
    R: last training glacier (read last)."""
    rows = _index(tiny_twin)
    folds = {r["name"]: int(r["fold"]) for r in rows}
    return {
        "T": next(n for n, f in folds.items() if f == 0),
        "V": next(n for n, f in folds.items() if f == 1),
        "R": [n for n, f in folds.items() if f not in (0, 1)][-1],
    }


def _zero_params(kind: str, path: Path) -> Path:
    """A well-formed parameter file of model `kind` (zeros; nothing is run with it)."""
    with open(path, "wb") as f:
        for leaf in leaf_manifest(template(kind)):
            np.save(f, np.zeros(leaf["shape"], leaf["dtype"]), allow_pickle=False)
    return path


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("params")
    for kind in "abc":
        _zero_params(kind, folder / f"{kind}.eqx")
    with open(folder / "a_nan.eqx", "wb") as f:
        for leaf in leaf_manifest(template("a")):
            value = np.float32(np.nan) if "ddf_snow_log" in leaf["path"] else np.float32(0.0)
            np.save(f, np.full(leaf["shape"], value, leaf["dtype"]), allow_pickle=False)
    for kind in "ac":
        data = (folder / f"{kind}.eqx").read_bytes()
        (folder / f"{kind}_truncated.eqx").write_bytes(data[: len(data) // 2])
    return folder


@pytest.fixture
def data(tiny_twin, tmp_path) -> Path:
    """A private copy of the twin (without any tensor cache of other tests)."""
    copy = tmp_path / "data"
    shutil.copytree(tiny_twin, copy, ignore=shutil.ignore_patterns(CACHE))
    return copy


class Tripwire(AssertionError):
    pass


@pytest.fixture
def no_compilation(monkeypatch):
    """Bad input must be refused before the model inputs are built or training starts."""
    def trip(*args, **kwargs):
        raise Tripwire("reached model input preparation / training: the error came too late")

    monkeypatch.setattr(core.workflows, "train", trip)
    monkeypatch.setattr(core.workflows, "make_arrays", trip)
    monkeypatch.setattr(core.workflows, "run_batches", trip)


# ---------------------------------------------------------------------------------------------
# Ways to break a dataset


def edit_netcdf(path: Path, change: Callable[[xr.Dataset], xr.Dataset]) -> None:
    with xr.open_dataset(path) as ds:
        ds = change(ds.load())
    for var in ds.variables.values():
        var.encoding = {k: v for k, v in var.encoding.items() if k in ("units", "calendar", "dtype")}
    path.unlink()
    ds.to_netcdf(path)


def set_value_on(var: str, date: str, value: float):
    """Put `value` into one cell of `var` on `date`."""
    def change(ds):
        values = ds[var].values.copy()
        day = int(np.flatnonzero(ds["time"].values == np.datetime64(date))[0])
        values[day, 3, 4] = value
        ds[var] = (ds[var].dims, values, ds[var].attrs)
        return ds
    return change


def edit_csv(path: Path, change: Callable[[list[dict]], None]) -> None:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames, list(reader)
    change(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def drop_year(year: int):
    def change(rows):
        rows[:] = [r for r in rows if r["year"] != str(year)]
    return change


def midseason_after_end(year: int):
    def change(rows):
        row = next(r for r in rows if r["year"] == str(year))
        end = datetime.date.fromisoformat(row["end_date"])
        row["midseason_date"] = str(end + datetime.timedelta(days=30))
    return change


def move_first_stake_north(rows):
    rows[0]["latitude"] = f"{float(rows[0]['latitude']) + 0.5:.7f}"


# ---------------------------------------------------------------------------------------------
# The catalogue


@dataclass(frozen=True)
class Case:
    script: object  # the module whose main() runs
    glacier: str | None  # T/V/R: the glacier broken (its cache entry must not appear)
    brk: Callable[[Path, Path], None] | None  # brk(glacier folder, tmp_path)
    argv: Callable[[dict], list[str]]  # argv(paths) with paths: data, out, params, tmp, name
    expected: tuple[str, ...]  # substrings of the message ({name}, {data}, {params}, {tmp} expanded)


def train_args(model="a", init=None, params_path="{out}/{model}.eqx", log_path="{out}/{model}.csv"):
    def argv(p):
        args = ["--data_folder", p["data"], "--epochs", "1", "--quiet",
                "--params_path", params_path.format(model=model, **p),
                "--log_path", log_path.format(model=model, **p)]
        return args + (["--init_params_path", init.format(**p)] if init else [])
    return argv


def infer_args(model="a", glacier="{T}", params="{params}/a.eqx", smb="{out}/smb.nc",
               evaluation="{out}/eval.json"):
    def argv(p):
        return [model, glacier.format(**p), smb.format(**p), evaluation.format(**p),
                "--params_path", params.format(**p), "--data_folder", p["data"], "--quiet"]
    return argv


def finetune_args(glacier="{T}", init="{params}/a.eqx", final="{out}/ft.eqx", log="{out}/ft.csv"):
    def argv(p):
        return [glacier.format(**p), "--data_folder", p["data"], "--init_params_path", init.format(**p),
                "--final_params_path", final.format(**p), "--log_path", log.format(**p),
                "--epochs", "1", "--train_years", "1995", "1996", "--val_years", "1997", "1998",
                "--quiet"]
    return argv


def regular_file(g, tmp):
    (tmp / "file.txt").write_text("not a folder\n")


CASES: dict[str, Case] = {
    "missing glacier folder": Case(
        train_a, "V", lambda g, t: shutil.rmtree(g), train_args(),
        ("{data}/{V}:", "is missing", "index.csv lists glacier '{V}'")),
    "missing NetCDF": Case(
        infer_and_evaluate, "T", lambda g, t: (g / "temperature.nc").unlink(), infer_args(),
        ("{data}/{T}/temperature.nc:", "is missing (required file)")),
    "empty NetCDF": Case(
        infer_and_evaluate, "T", lambda g, t: (g / "dem.nc").write_bytes(b""), infer_args(),
        ("{data}/{T}/dem.nc:", "is empty (0 bytes)")),
    "garbage NetCDF": Case(
        finetune, "T", lambda g, t: (g / "orography.nc").write_text("elevation\n1,2,3\n"),
        finetune_args(), ("{data}/{T}/orography.nc:", "could not be read as NetCDF")),
    "variable renamed": Case(
        infer_and_evaluate, "T",
        lambda g, t: edit_netcdf(g / "precipitation.nc", lambda ds: ds.rename_vars(total_precipitation_sum="tp")),
        infer_args(),
        ("{T}/precipitation.nc:", "variable 'total_precipitation_sum' is missing", "'tp'")),
    "dimensions transposed": Case(
        train_a, "V", lambda g, t: edit_netcdf(g / "dem.nc", lambda ds: ds.transpose("year", "x", "y")),
        train_args(),
        ("{V}/dem.nc:", "variable 'z'", "('year', 'x', 'y'), expected ('year', 'y', 'x')")),
    "dimensions renamed": Case(
        finetune, "T", lambda g, t: edit_netcdf(g / "temperature.nc", lambda ds: ds.rename(x="lon", y="lat")),
        finetune_args(),
        ("{T}/temperature.nc:", "variable 'temperature_2m'", "('time', 'lat', 'lon'), expected ('time', 'y', 'x')")),
    "outlines dimensions renamed": Case(
        infer_and_evaluate, "T",
        lambda g, t: edit_netcdf(g / "outlines.nc", lambda ds: ds.rename(x="easting", y="northing")),
        infer_args(), ("{T}/outlines.nc:", "coordinate 'x' is missing")),
    "temperature in Kelvin": Case(
        train_a, "R",
        lambda g, t: edit_netcdf(g / "temperature.nc", lambda ds: ds.assign(temperature_2m=ds.temperature_2m + 273.15)),
        train_args(), ("{R}/temperature.nc:", "variable 'temperature_2m'", "looks like Kelvin", "expected °C")),
    "NaN in temperature (study period)": Case(
        infer_and_evaluate, "T",
        lambda g, t: edit_netcdf(g / "temperature.nc", set_value_on("temperature_2m", "1996-07-15", np.nan)),
        infer_args(), ("{T}/temperature.nc:", "variable 'temperature_2m'", "NaN or inf", "1996-07-15")),
    "inf in precipitation (study period)": Case(
        train_a, "V",
        lambda g, t: edit_netcdf(g / "precipitation.nc", set_value_on("total_precipitation_sum", "1997-01-03", np.inf)),
        train_args(), ("{V}/precipitation.nc:", "variable 'total_precipitation_sum'", "NaN or inf", "1997-01-03")),
    "DEM and outlines on different grids": Case(
        infer_and_evaluate, "T", lambda g, t: edit_netcdf(g / "dem.nc", lambda ds: ds.assign_coords(x=ds.x + 100.0)),
        infer_args(), ("{T}/dem.nc:", "coordinate 'x'", "differs from outlines.nc")),
    "DEM cropped": Case(
        train_a, "R", lambda g, t: edit_netcdf(g / "dem.nc", lambda ds: ds.isel(x=slice(1, None))),
        train_args(), ("{R}/dem.nc:", "coordinate 'x'", "values, expected")),
    "CRS missing (dem.nc)": Case(
        infer_and_evaluate, "T", lambda g, t: edit_netcdf(g / "dem.nc", lambda ds: ds.drop_vars("spatial_ref")),
        infer_args(), ("{T}/dem.nc:", "variable 'spatial_ref' is missing")),
    "CRS missing (outlines.nc)": Case(
        train_a, "V", lambda g, t: edit_netcdf(g / "outlines.nc", lambda ds: ds.drop_vars("spatial_ref")),
        train_args(), ("{V}/outlines.nc:", "variable 'spatial_ref' is missing")),
    "year missing from total_smb.csv": Case(
        infer_and_evaluate, "T", lambda g, t: edit_csv(g / "total_smb.csv", drop_year(1996)), infer_args(),
        ("{T}/total_smb.csv:", "column 'year'", "lacks [1996]")),
    "spin-up year missing from total_smb.csv": Case(
        train_a, "R", lambda g, t: edit_csv(g / "total_smb.csv", drop_year(1990)), train_args(),
        ("{R}/total_smb.csv:", "column 'year'", "lacks [1990]")),
    "midseason date outside the year": Case(
        infer_and_evaluate, "T", lambda g, t: edit_csv(g / "total_smb.csv", midseason_after_end(1996)),
        infer_args(), ("{T}/total_smb.csv:", "column 'midseason_date', line 8", "expected within")),
    "stake outside the grid": Case(
        finetune, "T", lambda g, t: edit_csv(g / "point_smb.csv", move_first_stake_north), finetune_args(),
        ("{T}/point_smb.csv:", "line 2", "outside the grid")),
    "normalisation factors truncated": Case(
        train_a, None,
        lambda g, t: (g / "normalisation_factors.pkl").write_bytes((g / "normalisation_factors.pkl").read_bytes()[:20]),
        train_args(), ("{data}/normalisation_factors.pkl:", "could not be unpickled")),
    "index.csv without a training glacier": Case(
        train_a, None, lambda g, t: edit_csv(g / "index.csv", lambda rows: [r.update(fold="0") for r in rows
                                                                           if r["fold"] not in "01"]),
        train_args(), ("{data}/index.csv:", "column 'fold'", "no training glacier")),
    "evaluation JSON truncated (summarise)": Case(
        summarise, None, lambda g, t: ((t / "eval").mkdir(), (t / "eval" / "x.json").write_text('{"metrics": {')),
        lambda p: [f"{p['tmp']}/eval"], ("{tmp}/eval/x.json:", "not valid JSON")),
    "evaluation folder missing (summarise)": Case(
        summarise, None, None, lambda p: [f"{p['tmp']}/nowhere"], ("{tmp}/nowhere:", "does not exist")),
    "unknown glacier (infer_and_evaluate)": Case(
        infer_and_evaluate, None, None, infer_args(glacier="Nowhere Glacier"),
        ("{data}/index.csv:", "column 'name'", "no glacier 'Nowhere Glacier'", "{T}")),
    "unknown glacier (finetune)": Case(
        finetune, None, None, finetune_args(glacier="Nowhere Glacier"),
        ("{data}/index.csv:", "column 'name'", "no glacier 'Nowhere Glacier'")),
    "params of the wrong model (B file for A)": Case(
        infer_and_evaluate, None, None, infer_args(params="{params}/b.eqx"),
        ("{params}/b.eqx:", "model A", "another model")),
    "params of the wrong model (A file for C)": Case(
        infer_and_evaluate, None, None, infer_args(model="c", params="{params}/a.eqx"),
        ("{params}/a.eqx:", "model C/D", "expects [0]['corrector']")),
    "params of the wrong model (train_c from B)": Case(
        train_c, None, None, train_args("c", init="{params}/b.eqx"),
        ("{params}/b.eqx:", "model A", "another model")),
    "params truncated (infer_and_evaluate)": Case(
        infer_and_evaluate, None, None, infer_args(params="{params}/a_truncated.eqx"),
        ("{params}/a_truncated.eqx:", "cannot read array", "truncated")),
    "params truncated (train_d from C)": Case(
        train_d, None, None, train_args("d", init="{params}/c_truncated.eqx"),
        ("{params}/c_truncated.eqx:", "cannot read array", "truncated")),
    "params truncated (finetune)": Case(
        finetune, None, None, finetune_args(init="{params}/a_truncated.eqx"),
        ("{params}/a_truncated.eqx:", "truncated")),
    "params with NaN (infer_and_evaluate)": Case(
        infer_and_evaluate, None, None, infer_args(params="{params}/a_nan.eqx"),
        ("{params}/a_nan.eqx:", "['ddf_snow_log']", "contains NaN or inf")),
    "params missing (infer_and_evaluate)": Case(
        infer_and_evaluate, None, None, infer_args(params="{params}/nothing.eqx"),
        ("{params}/nothing.eqx:", "no such parameter file")),
    "unwritable params path (below a file)": Case(
        train_a, None, regular_file, train_args(params_path="{tmp}/file.txt/a.eqx"),
        ("{tmp}/file.txt/a.eqx:", "params_path", "is a file")),
    "unwritable log path (a folder)": Case(
        train_a, None, None, train_args(log_path="{tmp}"),
        ("{tmp}:", "log_path is a directory")),
    "unwritable NetCDF path (below a file)": Case(
        infer_and_evaluate, None, regular_file, infer_args(smb="{tmp}/file.txt/sub/smb.nc"),
        ("{tmp}/file.txt/sub/smb.nc:", "smb_path", "is a file")),
    "unwritable JSON path (a folder)": Case(
        infer_and_evaluate, None, None, infer_args(evaluation="{tmp}"),
        ("{tmp}:", "eval_path is a directory")),
    "NetCDF and JSON the same file": Case(
        infer_and_evaluate, None, None, infer_args(evaluation="{out}/smb.nc"),
        ("{out}/smb.nc:", "eval_path is the same file as smb_path")),
    "unwritable fine-tuned params path (below a file)": Case(
        finetune, None, regular_file, finetune_args(final="{tmp}/file.txt/ft.eqx"),
        ("{tmp}/file.txt/ft.eqx:", "final_params_path", "is a file")),
}


def _paths(data: Path, tmp_path: Path, params: Path, names: dict) -> dict:
    out = tmp_path / "out"
    out.mkdir()
    return {"data": str(data), "out": str(out), "params": str(params), "tmp": str(tmp_path), **names}


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def _check_nothing_left(case: Case, p: dict, before: set[Path], names: dict) -> None:
    tmp, data = Path(p["tmp"]), Path(p["data"])
    assert not _files(Path(p["out"])), "an output file was left behind"
    new = {f for f in _files(tmp) - before if CACHE not in f.parts}
    assert not new, f"files left behind: {sorted(map(str, new))}"
    leftovers = [f for f in tmp.rglob("*") if f.name.endswith(".tmp") or ".tmp-" in f.name]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    if case.glacier is not None and (data / CACHE).exists():
        stem = entry_stem(names[case.glacier])
        entries = [e.name for e in (data / CACHE).iterdir() if e.name.startswith(stem)]
        assert not entries, f"cache entry for the broken glacier: {entries}"
        assert not list((data / CACHE).glob(".tmp-*")), "half-built cache entry left behind"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, data, tmp_path, params, names, capsys, no_compilation, monkeypatch):
    monkeypatch.delenv("GLAUNTI_DEBUG", raising=False)
    monkeypatch.delenv("GLAUNTI_CACHE_DIR", raising=False)
    case = CASES[name]
    p = _paths(data, tmp_path, params, names)
    if case.brk is not None:
        case.brk(data / names[case.glacier] if case.glacier else data, tmp_path)
    before = _files(tmp_path)
    capsys.readouterr()

    code = case.script.main(case.argv(p))

    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    lines = err.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {lines}"
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for text in case.expected:
        assert text.format(**p) in lines[0], f"{text.format(**p)!r} not in {lines[0]!r}"
    _check_nothing_left(case, p, before, names)


def test_debug_mode_shows_the_traceback(data, tmp_path, params, names, monkeypatch):
    """GLAUNTI_DEBUG=1 lets the exception through (traceback for bug reports)."""
    from dataloader import DataError

    monkeypatch.setenv("GLAUNTI_DEBUG", "1")
    (data / names["T"] / "dem.nc").write_bytes(b"")
    p = _paths(data, tmp_path, params, names)
    with pytest.raises(DataError, match="dem.nc: is empty"):
        infer_and_evaluate.main(infer_args()(p))


# ---------------------------------------------------------------------------------------------
# A few cases through real subprocesses: exit code, one line on stderr, no traceback, no warnings


SUBPROCESS_CASES = {
    "train_a.py, Kelvin": ("train_a.py", "temperature in Kelvin"),
    "infer_and_evaluate.py, wrong model": ("infer_and_evaluate.py", "params of the wrong model (B file for A)"),
    "finetune.py, unwritable output": ("finetune.py", "unwritable fine-tuned params path (below a file)"),
}


@pytest.mark.parametrize("name", list(SUBPROCESS_CASES))
def test_bad_input_subprocess(name, data, tmp_path, params, names):
    script, case_name = SUBPROCESS_CASES[name]
    case = CASES[case_name]
    p = _paths(data, tmp_path, params, names)
    if case.brk is not None:
        case.brk(data / names[case.glacier] if case.glacier else data, tmp_path)
    before = _files(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("GLAUNTI_DEBUG", "GLAUNTI_CACHE_DIR")}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run([sys.executable, script, *case.argv(p)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in case.expected:
        assert text.format(**p) in lines[0]
    assert result.stdout == ""
    _check_nothing_left(case, p, before, names)


def test_tripwire_is_armed(data, tmp_path, params, names, no_compilation):
    """Control: with intact data the same calls do reach the tripwires, so the catalogue's
    'stopped before compilation' is not vacuous."""
    p = _paths(data, tmp_path, params, names)
    for script, argv in ((infer_and_evaluate, infer_args()), (finetune, finetune_args()),
                         (train_a, train_args())):
        with pytest.raises(Tripwire):
            script.main(argv(p))
