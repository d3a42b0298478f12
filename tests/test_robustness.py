"""Robustness of long runs: atomic outputs, resume after a crash, errors of the background
loader, and the numerical guards of training."""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest

import constants
import core.io
import core.train.loop
import finetune
import train_a
import train_b
from core.io import OutputError, atomic_write, atomic_write_json, atomic_write_text
from core.models import build, load_model, save_model
from dataloader import DataError, Dataset
from glaunti.params import load_params, save_params

REPO = Path(__file__).resolve().parents[1]
CACHE = ".glaunti_cache"


def _index(folder: Path) -> list[dict]:
    with open(folder / "index.csv", newline="") as f:
        return list(csv.DictReader(f))


def _write_index(folder: Path, rows: list[dict]) -> None:
    with open(folder / "index.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def small(tiny_twin, tmp_path_factory) -> Path:
    """The twin cut to three glaciers of one grid shape (one validation, two training), so that
    a training run compiles for one shape only."""
    folder = tmp_path_factory.mktemp("small") / "data"
    shutil.copytree(tiny_twin, folder, ignore=shutil.ignore_patterns(CACHE))
    rows = _index(folder)
    val = next(r for r in rows if r["fold"] == "1")
    shape = (val["height"], val["width"])
    train = [r for r in rows if r is not val and r["fold"] != "1" and (r["height"], r["width"]) == shape][:2]
    assert len(train) == 2
    for r in train:
        r["fold"] = "2"
    _write_index(folder, [val, *train])
    Dataset(folder)  # validates the index
    return folder


def _train_names(folder: Path) -> list[str]:
    return [r["name"] for r in _index(folder) if r["fold"] not in ("0", "1")]


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Atomic outputs


class Boom(RuntimeError):
    pass


def _fail_halfway(tmp: Path) -> None:
    with open(tmp, "w") as f:
        f.write("half of a new fi")
    raise Boom("disk vanished")


def _previous(path: Path, content: bytes = b"previous good content\n") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return content


def _glacier(tiny_twin):
    dataset = Dataset(tiny_twin)
    return dataset.glacier(dataset.test_names[0])


def _write_nc_failing(path: Path, tiny_twin) -> None:
    from core.infer.netcdf import write_netcdf

    tensors = _glacier(tiny_twin)

    def chunks():
        yield 0, np.zeros((5, len(tensors.y), len(tensors.x)), np.float32)
        raise Boom("model crashed mid-stream")

    write_netcdf(path, tensors, chunks(), "a")


def _save_params_failing(path: Path, monkeypatch) -> None:
    real_save, calls = np.save, []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Boom("disk full at the third array")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(np, "save", save)
    save_model(build("a"), path)


def _checkpoint_failing(path: Path, monkeypatch) -> None:
    def serialise(target, tree):
        Path(target).write_bytes(b"\x93NUMPY half")
        raise Boom("killed while serialising")

    monkeypatch.setattr(eqx, "tree_serialise_leaves", serialise)
    model = build("a")
    core.train.loop.Checkpoint(model, model, None, 1, 1, 0.5).save(path)


def _log_failing(path: Path, monkeypatch) -> None:
    real = Path.write_text

    def write_text(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2])
        raise Boom("quota exceeded")

    monkeypatch.setattr(Path, "write_text", write_text)
    log = core.train.loop.Log(path, None)
    log.add({"epoch": 1, "glacier": "x", "subset": "train", "loss": 1.0})
    log.flush()


WRITERS = {
    "text (atomic_write)": ("out.txt", lambda path, twin, mp: atomic_write(path, _fail_halfway)),
    "json (atomic_write_json)": ("eval.json", lambda path, twin, mp: (
        mp.setattr(Path, "write_text", lambda self, t: _fail_halfway(self)),
        atomic_write_json(path, {"metrics": {}}))),
    "NetCDF (write_netcdf)": ("smb.nc", lambda path, twin, mp: _write_nc_failing(path, twin)),
    "params (save_model)": ("a.eqx", lambda path, twin, mp: _save_params_failing(path, mp)),
    "checkpoint (Checkpoint.save)": ("a.eqx.ckpt", lambda path, twin, mp: _checkpoint_failing(path, mp)),
    "log (Log.flush)": ("a.csv", lambda path, twin, mp: _log_failing(path, mp)),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_failed_write_keeps_previous_file(writer, tmp_path, tiny_twin, monkeypatch):
    name, write = WRITERS[writer]
    path = tmp_path / "out" / name
    previous = _previous(path)
    with pytest.raises(Boom):
        write(path, tiny_twin, monkeypatch)
    monkeypatch.undo()
    assert path.read_bytes() == previous
    assert sorted(p.name for p in path.parent.iterdir()) == [name], "a temporary file was left behind"


def test_failed_rename_is_an_output_error(tmp_path, monkeypatch):
    path = tmp_path / "a.csv"
    previous = _previous(path)

    def refuse(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(core.io.os, "replace", refuse)
    with pytest.raises(OutputError, match=r"a\.csv: cannot be replaced \(Invalid cross-device link\)"):
        atomic_write_text(path, "new\n")
    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["a.csv"]


def test_write_onto_a_directory_is_an_output_error(tmp_path):
    (tmp_path / "eval.json").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        atomic_write_json(tmp_path / "eval.json", {})
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_kill_during_write_keeps_previous_file(tmp_path):
    """kill -9 in the middle of a write: the destination still holds the previous file; the
    orphaned temporary file is removed by a later write once it is old."""
    path = tmp_path / "a.csv"
    previous = _previous(path)
    code = (
        "import os, signal, sys\n"
        "from core.io import atomic_write\n"
        "def write(tmp):\n"
        "    with open(tmp, 'w') as f:\n"
        "        f.write('half of the new log'); f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"atomic_write({str(path)!r}, write)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert path.read_bytes() == previous
    orphans = _temporaries(tmp_path)
    assert len(orphans) == 1
    atomic_write_text(path, "newer\n")  # a fresh orphan may belong to a live writer: kept
    assert orphans[0].exists()
    old = time.time() - constants.abandoned_temporary_age_s - 60
    os.utime(orphans[0], (old, old))
    atomic_write_text(path, "newest\n")
    assert not orphans[0].exists()
    assert path.read_text() == "newest\n"


def test_save_model_removes_abandoned_temporaries(tmp_path):
    path = tmp_path / "a.eqx"
    orphan = tmp_path / ".a.eqx.k1ll3d.tmp"
    orphan.write_bytes(b"half")
    old = time.time() - 2 * constants.abandoned_temporary_age_s
    os.utime(orphan, (old, old))
    save_model(build("a"), path)
    assert not orphan.exists()
    assert eqx.tree_equal(load_params("a", path), build("a"))


# Every write of a result must go through core.io (temporary file + rename) or an equivalent;
# these are the reviewed exceptions.
RAW_WRITE = re.compile(r"\.write_text\(|\.write_bytes\(|open\([^)]*['\"][wa]b?['\"]|\.to_netcdf\(|"
                       r"np\.save\(|\.savefig\(|pickle\.dump\(|netCDF4\.Dataset\([^)]*['\"]w['\"]")
REVIEWED = {
    "core/io.py",  # the atomic writers themselves
    "glaunti/params.py",  # save_params writes where it is told; core.models.save_model: atomic
    "dataloader/cache.py",  # entries are built in a staging folder and renamed
    "core/infer/netcdf.py",  # DailySMBFile writes inside core.io.atomic_path
    "core/apps/demo.py",  # the figure: temporary file + replace
    "core/apps/own_glacier.py",  # the figure: inside core.io.atomic_path
    "core/apps/notebook.py",  # the notebooks' figures: inside core.io.atomic_path
    "core/apps/crossvalidation.py",  # the figure: inside core.io.atomic_path
    "core/apps/evolution.py",  # evolution.nc and the figure: inside core.io.atomic_path
    "core/apps/projection_climate.py",  # the projected climate files: inside core.io.atomic_path
    "dataloader/synthetic/generator.py",  # the twin: built in a temporary folder and renamed
    "dataloader/layout.py",  # (called by synthetic/generator.py and prepare/glacier.py on temporary folders)
    "dataloader/prepare/glacier.py",  # the glacier: built in a temporary folder and renamed
    "core/apps/region.py",  # every product file inside core.io.atomic_path
}


def test_every_writer_is_atomic():
    offenders = []
    for path in sorted(REPO.glob("*.py")) + sorted(REPO.glob("core/**/*.py")) + \
            sorted(REPO.glob("glaunti/*.py")) + sorted(REPO.glob("dataloader/**/*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel in REVIEWED:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if RAW_WRITE.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, "writes that bypass core.io:\n" + "\n".join(offenders)


# ---------------------------------------------------------------------------------------------
# The background loader never swallows an error


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "glaunti-prefetch" and t.is_alive()]


def test_prefetch_reraises_data_error_with_glacier_name(tiny_twin, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_twin, data, ignore=shutil.ignore_patterns(CACHE))
    names = [r["name"] for r in _index(data)]
    broken = names[2]
    (data / broken / "outlines.nc").write_bytes(b"")
    loaded = []
    with pytest.raises(DataError) as error:
        for glacier in Dataset(data).iter_glaciers(prefetch=True):
            loaded.append(glacier.name)
    assert loaded == names[:2]
    assert f"{broken}/outlines.nc: is empty" in str(error.value)
    assert any(f"'{broken}'" in note and "prefetch" in note for note in error.value.__notes__)
    assert not _prefetch_threads()
    assert not list((data / CACHE).glob(".tmp-*"))


@pytest.mark.parametrize("exception", [RuntimeError, MemoryError])
def test_prefetch_reraises_any_exception(tiny_twin, monkeypatch, exception):
    import dataloader.reader

    dataset = Dataset(tiny_twin, use_cache=False)
    names = dataset.names
    real = dataloader.reader.read_glacier

    def read(folder, info, *args, **kwargs):
        if info.name == names[3]:
            raise exception(f"unexpected failure in {info.name}")
        return real(folder, info, *args, **kwargs)

    monkeypatch.setattr(dataloader.reader, "read_glacier", read)
    loaded = []
    with pytest.raises(exception, match=f"unexpected failure in {names[3]}") as error:
        for glacier in dataset.iter_glaciers(prefetch=True):
            loaded.append(glacier.name)
            time.sleep(0.05)  # the consumer works while the next glacier loads
    assert loaded == names[:3]
    assert any(f"'{names[3]}'" in note for note in error.value.__notes__)
    assert not _prefetch_threads()


def test_prefetch_stops_when_the_consumer_stops(tiny_twin):
    iterator = Dataset(tiny_twin).iter_glaciers(prefetch=True)
    first = next(iterator)
    assert first.name == Dataset(tiny_twin).names[0]
    iterator.close()
    assert not _prefetch_threads()


# ---------------------------------------------------------------------------------------------
# Numerical guards: a non-finite loss or gradient stops training, naming glacier and epoch,
# and the params file keeps the last good parameters


def _fingerprint(tree) -> str:
    digest = hashlib.sha1()
    for leaf in jax.tree_util.tree_leaves(tree):
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()


def _poison(monkeypatch, epoch: int, glacier: int, what: str, snapshot: Path, seen: dict):
    """Make the training evaluation of the `glacier`-th training glacier (0-based, in training
    order) at `epoch` return a non-finite loss or gradient; remember the params file's bytes at
    that moment. Epochs and glaciers are recognised by the values of the parameters and
    arrays passed in (the n-th distinct ones), not by counting calls."""
    value_and_grad = core.train.loop.loss_and_grad
    epochs, glaciers = [], []

    def poisoned(trainable, static, arrays):
        (loss, terms), grad = value_and_grad(trainable, static, arrays)
        for known, key in ((epochs, _fingerprint(trainable)), (glaciers, _fingerprint(arrays))):
            if key not in known:
                known.append(key)
        if epochs.index(_fingerprint(trainable)) + 1 == epoch and \
                glaciers.index(_fingerprint(arrays)) == glacier:
            seen.setdefault("params", snapshot.read_bytes())
            if what == "loss":
                loss = loss * np.float32(np.nan)
            else:
                grad = eqx.tree_at(lambda g: g.ddf_snow_log, grad, grad.ddf_snow_log * np.inf)
        return (loss, terms), grad

    monkeypatch.setattr(core.train.loop, "loss_and_grad", poisoned)


@pytest.mark.parametrize("what, epoch, glacier, overlap", [("loss", 2, 1, False), ("gradient", 1, 0, False),
                                                           ("loss", 2, 1, True)])
def test_non_finite_training_stops_and_keeps_params(small, tmp_path, monkeypatch, capsys, what, epoch, glacier,
                                                    overlap):
    """With ``overlap``, epoch 1's validation runs beside epoch 2's failing gradient: epoch 1
    is still closed (logged with its validation, its parameters kept) before the error is
    reported."""
    train_names = _train_names(small)
    params, log = tmp_path / "a.eqx", tmp_path / "a.csv"
    seen = {}
    monkeypatch.setattr(core.train.loop, "overlaps_validation", lambda placement: overlap)
    # One glacier per batch, so that the poisoned call is one glacier's (a batch's gradient is
    # the sum over its glaciers and could only name all of them).
    monkeypatch.setenv("GLAUNTI_BATCH_BYTES", "1")
    _poison(monkeypatch, epoch, glacier, what, snapshot=params, seen=seen)
    code = train_a.main(["--data_folder", str(small), "--epochs", "4", "--learning_rate", "0.05", "--quiet",
                         "--params_path", str(params), "--log_path", str(log)])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2
    expected = "training loss" if what == "loss" else "gradient"
    assert f"non-finite {expected} for glacier '{train_names[glacier]}' at epoch {epoch}" in line
    if not overlap:  # (with overlap, epoch 1 was closed after the snapshot: its file differs)
        assert params.read_bytes() == seen["params"]  # the last good parameters, untouched
    model = load_model("a", params)  # readable and finite
    assert all(np.isfinite(np.asarray(v)) for v in model.stored().values())
    rows = list(csv.DictReader(open(log)))
    assert max(int(r["epoch"]) for r in rows) == epoch - 1  # the failed epoch is not logged
    assert any(r["subset"] == "val" and int(r["epoch"]) == epoch - 1 for r in rows)
    assert not _temporaries(tmp_path)


def test_overlapped_validation_changes_no_number(small, tmp_path, monkeypatch):
    """Validation beside the next epoch's gradient (a background thread) gives the same params
    file and log rows as validation in turn."""
    def run(folder, overlap):
        monkeypatch.setattr(core.train.loop, "overlaps_validation", lambda placement: overlap)
        assert train_a.main(["--data_folder", str(small), "--epochs", "3", "--learning_rate", "0.05",
                             "--quiet", "--params_path", str(folder / "a.eqx"),
                             "--log_path", str(folder / "a.csv")]) == 0

    run(tmp_path / "in_turn", False)
    run(tmp_path / "overlapped", True)
    assert (tmp_path / "in_turn" / "a.eqx").read_bytes() == (tmp_path / "overlapped" / "a.eqx").read_bytes()
    assert _rows(tmp_path / "in_turn" / "a.csv") == _rows(tmp_path / "overlapped" / "a.csv")
    assert {r[0][1] for r in _rows(tmp_path / "overlapped" / "a.csv")} == {"0", "1", "2", "3"}


@pytest.mark.parametrize("overlap", [False, True])
def test_epoch_time_is_the_epochs_own_work(small, tmp_path, monkeypatch, overlap):
    """``epoch_time_s`` holds the epoch's own gradient (and its validation where nothing hides
    it), not the next epoch's gradient. A fake clock that only the gradient (and validation in
    turn) advance makes the figures exact: epoch e's gradient "takes" 10·e s, a validation in
    turn 1 s. With overlap the validation advances no clock (its time is hidden behind the
    next gradient here). The earlier bookkeeping (time between two closings) gave epoch e the
    (e+1)-th gradient and the last epoch about 0 s."""
    clock = [0.0]
    monkeypatch.setattr(core.train.loop, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    monkeypatch.setattr(core.train.loop, "overlaps_validation", lambda placement: overlap)
    real_gradient, real_evaluate = core.train.loop.epoch_gradient, core.train.loop.evaluate_glaciers

    def gradient(value_and_grad, trainable, static, train_set, placement=None, epoch=0, **kw):
        out = real_gradient(value_and_grad, trainable, static, train_set, placement, epoch, **kw)
        clock[0] += 10.0 * epoch
        return out

    def evaluate(fn, trainable, static, glacier_set, with_grad, *args, **kw):
        out = real_evaluate(fn, trainable, static, glacier_set, with_grad, *args, **kw)
        if not with_grad and not overlap:
            clock[0] += 1.0
        return out

    monkeypatch.setattr(core.train.loop, "epoch_gradient", gradient)
    monkeypatch.setattr(core.train.loop, "evaluate_glaciers", evaluate)
    log = tmp_path / "a.csv"
    assert train_a.main(["--data_folder", str(small), "--epochs", "3", "--learning_rate", "0.05", "--quiet",
                         "--params_path", str(tmp_path / "a.eqx"), "--log_path", str(log)]) == 0
    times = {}
    for r in csv.DictReader(open(log)):
        if r["epoch"] != "0":
            times.setdefault(int(r["epoch"]), set()).add(float(r["epoch_time_s"]))
    validation = 0.0 if overlap else 1.0
    assert times == {e: {10.0 * e + validation} for e in (1, 2, 3)}


def test_params_that_produce_nan_stop_finetuning(tiny_twin, tmp_path, capsys):
    """Finite but absurd parameters (precipitation scale e^60 overflows float32): the first
    training pass already fails (fine-tuning has no epoch-0 validation, as published), naming the
    glacier and epoch 1; yesterday's result survives."""
    from glaunti.ti_model import TIModel

    absurd = eqx.tree_at(lambda m: m.prec_scale_log, TIModel.prior(), np.float32(60.0))
    init = tmp_path / "absurd.eqx"
    save_params(absurd, init)
    final, log = tmp_path / "out" / "ft.eqx", tmp_path / "out" / "ft.csv"
    previous = _previous(final, (REPO / "tests" / "test_robustness.py").read_bytes()[:64])
    glacier = Dataset(tiny_twin).test_names[0]
    code = finetune.main([glacier, "--data_folder", str(tiny_twin), "--init_params_path", str(init),
                          "--final_params_path", str(final), "--log_path", str(log), "--epochs", "2",
                          "--train_years", "1995", "1996", "--val_years", "1997", "1998", "--quiet"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2
    assert f"non-finite training loss for glacier '{glacier}' at epoch 1" in line
    assert final.read_bytes() == previous
    assert not log.exists()
    assert not _temporaries(tmp_path)


def test_params_with_nan_are_refused(tmp_path):
    from glaunti.params import ParamsError
    from glaunti.ti_model import TIModel

    path = tmp_path / "nan.eqx"
    save_params(eqx.tree_at(lambda m: m.ddf_snow_log, TIModel.prior(), np.float32(np.nan)), path)
    with pytest.raises(ParamsError, match=r"nan\.eqx: array \d+ \(\[0\]\['ddf_snow_log'\]\) contains NaN"):
        load_params("a", path)


# ---------------------------------------------------------------------------------------------
# Resume


def test_resume_with_corrupt_checkpoint_fails_cleanly(small, tmp_path, capsys):
    params, log = tmp_path / "a.eqx", tmp_path / "a.csv"
    ckpt = Path(str(params) + ".ckpt")
    ckpt.write_bytes(b"\x93NUMPY truncated")
    code = train_a.main(["--data_folder", str(small), "--epochs", "2", "--quiet", "--resume",
                         "--params_path", str(params), "--log_path", str(log)])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2
    assert f"{ckpt}: cannot read training checkpoint" in line and "--resume" in line
    assert not params.exists() and not log.exists()


def _rows(path: Path) -> list[tuple]:
    """Log rows without the wall-clock columns."""
    return [tuple((k, v) for k, v in r.items() if k not in ("timestamp", "epoch_time_s"))
            for r in csv.DictReader(open(path))]


def test_resume_b_after_crash_is_bitwise_identical(small, tmp_path, monkeypatch, capsys):
    """Model B (GRU: many arrays, Adam moments for each): a crash right after the params file
    of epoch 2 was written but before its log and checkpoint were, then --resume, gives
    the same params file, checkpoint and log as an uninterrupted run."""
    epochs = 3

    def run(folder, *extra):
        return train_b.main(["--data_folder", str(small), "--epochs", str(epochs), "--learning_rate", "0.02",
                             "--quiet", "--params_path", str(folder / "b.eqx"),
                             "--log_path", str(folder / "b.csv"), *extra])

    full, part = tmp_path / "full", tmp_path / "part"
    assert run(full) == 0

    real_flush, flushes = core.train.loop.Log.flush, [0]

    def crash(self):
        flushes[0] += 1
        if flushes[0] == 3:  # epoch 0 and 1 are flushed; crash at epoch 2's
            raise KeyboardInterrupt
        real_flush(self)

    monkeypatch.setattr(core.train.loop.Log, "flush", crash)
    assert run(part) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.undo()
    assert {int(r["epoch"]) for r in csv.DictReader(open(part / "b.csv"))} == {0, 1}

    assert run(part, "--resume") == 0
    assert (part / "b.eqx").read_bytes() == (full / "b.eqx").read_bytes()
    assert (part / "b.eqx.ckpt").read_bytes() == (full / "b.eqx.ckpt").read_bytes()
    assert _rows(part / "b.csv") == _rows(full / "b.csv")
    assert not _temporaries(tmp_path)
