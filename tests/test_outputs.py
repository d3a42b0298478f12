"""Outputs that GIS tools and colleagues can open (issue 16): georeferencing read by rioxarray
and GDAL, permissions that follow the umask, and the chunking of the daily SMB NetCDF."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from pathlib import Path

import netCDF4
import numpy as np
import pyproj
import pytest
import xarray as xr

import infer_and_evaluate
from conftest import daily_series
from core.infer.netcdf import CHUNK_VALUES, MAP_VALUES, DailySMBFile, chunk_shape, write_netcdf
from core.io import atomic_write, atomic_write_json, atomic_write_text
from core.models import build, save_model
from dataloader import Dataset
from dataloader.synthetic import generate
from georeferencing import assert_georeferenced
from glaunti.layouts import make_arrays
from glaunti.params import save_params

GEOREFERENCED_FILES = ("temperature.nc", "precipitation.nc", "orography.nc", "dem.nc", "outlines.nc",
                       "facies.nc")


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def epsg_of(tensors) -> int:
    epsg = pyproj.CRS.from_wkt(tensors.crs_wkt).to_epsg()
    assert epsg is not None
    return epsg


@pytest.fixture(scope="module")
def daily_smb(tiny_twin, tmp_path_factory):
    """``infer_and_evaluate.py`` with model A at its prior on a tiny-twin test glacier, run
    under umask 022: (NetCDF path, JSON path, glacier name)."""
    glacier = Dataset(tiny_twin).test_names[0]
    out = tmp_path_factory.mktemp("daily")
    smb_path, eval_path, params = out / "smb.nc", out / "eval.json", out / "a.eqx"
    save_params(build("a"), params)
    with umask(0o022):
        code = infer_and_evaluate.main(["a", glacier, str(smb_path), str(eval_path), "--quiet",
                                        "--params_path", str(params), "--data_folder", str(tiny_twin)])
    assert code == 0
    return smb_path, eval_path, glacier


def test_evaluation_names_its_parameter_file(daily_smb):
    """A user can tell which weights made a result: the evaluation JSON names the parameter
    file and its SHA-256."""
    _, eval_path, _ = daily_smb
    params = eval_path.with_name("a.eqx")
    recorded = json.loads(eval_path.read_text())["params"]
    assert recorded == {"path": str(params), "sha256": hashlib.sha256(params.read_bytes()).hexdigest()}


# ---------------------------------------------------------------------------------------------
# Georeferencing


def test_daily_smb_is_georeferenced(daily_smb, tiny_twin):
    smb_path, _, glacier = daily_smb
    tensors = Dataset(tiny_twin).glacier(glacier)
    assert_georeferenced(smb_path, "smb", tensors.x, tensors.y, epsg_of(tensors))
    with netCDF4.Dataset(smb_path) as nc:
        corner = nc["spatial_ref"].GeoTransform.split()
    assert [float(v) for v in corner] == [tensors.x[0] - 50, 100, 0, tensors.y[0] + 50, 0, -100]
    assert "np." not in " ".join(corner)


def test_twin_files_are_georeferenced(tiny_twin):
    """Every georeferenced file of every glacier, every variable with a grid mapping."""
    dataset = Dataset(tiny_twin)
    seen = set()
    for name in dataset.names:
        tensors = dataset.glacier(name)
        for path in sorted((tiny_twin / name).glob("*.nc")):
            with netCDF4.Dataset(path) as nc:
                variables = [v for v, var in nc.variables.items() if "grid_mapping" in var.ncattrs()]
            assert variables, f"{path}: no variable with a grid mapping"
            for variable in variables:
                assert_georeferenced(path, variable, tensors.x, tensors.y, epsg_of(tensors))
            seen.add(path.name)
    assert seen == set(GEOREFERENCED_FILES)


def test_numpy_repr_geotransform_is_rejected(tiny_twin, tmp_path):
    """The helper catches the issue-16 defect ("np.float64(...)" in GeoTransform)."""
    name = Dataset(tiny_twin).names[0]
    tensors = Dataset(tiny_twin).glacier(name)
    path = tmp_path / "dem.nc"
    path.write_bytes((tiny_twin / name / "dem.nc").read_bytes())
    with netCDF4.Dataset(path, "a") as nc:
        nc["spatial_ref"].GeoTransform = (f"{np.float64(tensors.x[0] - 50)!r} 100.0 0.0 "
                                          f"{np.float64(tensors.y[0] + 50)!r} 0.0 -100.0")
    with pytest.raises((ValueError, AssertionError)):
        assert_georeferenced(path, "z", tensors.x, tensors.y, epsg_of(tensors))


# ---------------------------------------------------------------------------------------------
# Daily SMB: attributes, values, chunking


def test_daily_smb_metadata_and_values(daily_smb, tiny_twin):
    smb_path, _, glacier = daily_smb
    tensors = Dataset(tiny_twin).glacier(glacier)
    expected, first_day = daily_series(build("a"), make_arrays(tensors), tensors)
    with xr.open_dataset(smb_path, decode_coords="all") as ds:
        smb = ds["smb"]
        assert smb.attrs["units"] == "m w.e. d-1"
        assert smb.encoding["grid_mapping"] == "spatial_ref"
        assert ds["spatial_ref"].attrs["grid_mapping_name"] == "transverse_mercator"
        np.testing.assert_array_equal(ds["time"].values, expected["time"].values)
        assert ds["time"].values[0] == np.datetime64(tensors.first_date + first_day, "ns")
        np.testing.assert_array_equal(smb.values, expected.values)
        assert smb.encoding["chunksizes"] == chunk_shape(len(tensors.y), len(tensors.x))


def test_daily_smb_file_has_the_day_terms(daily_smb, tiny_twin):
    """Model A's file carries the glacier-wide snowfall, rainfall and melt of every day: the
    liquid and (unscaled) solid shares add up to the precipitation over the glacier, and
    snowfall − melt is the glacier-wide SMB of the maps."""
    from glaunti.ti_model import PRIOR_CONSTRAINED

    smb_path, _, glacier = daily_smb
    tensors = Dataset(tiny_twin).glacier(glacier)
    arrays = make_arrays(tensors)
    with xr.open_dataset(smb_path) as ds:
        day = ((ds["time"].values - np.datetime64(tensors.first_date, "ns")) // np.timedelta64(1, "D")).astype(int)
        for term in ("snowfall", "rainfall", "melt"):
            assert ds[term].attrs["units"] == "m w.e. d-1" and ds[term].dims == ("time",)
            assert np.isfinite(ds[term].values).all() and (ds[term].values >= 0).all()
        checked = 0
        for k in np.flatnonzero(np.asarray(tensors.study)):
            mask = np.asarray(tensors.outlines[k], np.float64)
            inside = (day > tensors.begin_day[k]) & (day < tensors.end_day[k])  # whole-weight days
            gw_smb = (ds["smb"].values[inside] * mask).sum(axis=(1, 2)) / mask.sum()
            np.testing.assert_allclose(ds["snowfall"].values[inside] - ds["melt"].values[inside], gw_smb,
                                       atol=1e-6)
            climate = np.asarray(arrays.precipitation)[day[inside]][:, np.asarray(arrays.climate_cell)]
            gw_precipitation = (climate * mask).sum(axis=(1, 2)) / mask.sum()
            split = ds["snowfall"].values[inside] / PRIOR_CONSTRAINED["prec_scale"] + ds["rainfall"].values[inside]
            np.testing.assert_allclose(split, gw_precipitation, rtol=1e-4, atol=1e-8)
            checked += inside.sum()
        assert checked > 300


def test_inference_says_when_it_compiles(tiny_twin, capsys, monkeypatch):
    from core.execute import compiles
    from core.infer import runner as inference

    monkeypatch.setattr(compiles, "_COMPILED", {})
    tensors = Dataset(tiny_twin).glacier(Dataset(tiny_twin).names[0])
    arrays = make_arrays(tensors)
    first = list(inference.iter_daily_smb(build("a"), arrays, tensors))
    height, width = arrays.shape
    said = capsys.readouterr()
    assert f"compiling model A inference for {height}×{width}…" in said.err
    assert not said.out  # stdout stays for results (summarise.py prints JSON there)
    again = list(inference.iter_daily_smb(build("a"), arrays, tensors))
    assert "compiling" not in capsys.readouterr().err
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(first, again))
    compiles.release_compiled()  # freed: the next call compiles (or loads) again, and says so
    after = list(inference.iter_daily_smb(build("a"), arrays, tensors))
    assert f"compiling model A inference for {height}×{width}…" in capsys.readouterr().err
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(first, after))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="counts Linux memory maps")
def test_released_executables_give_back_their_memory_maps():
    """A long run (cross-validation) frees its compiled functions between rotations, or its
    memory maps reach Linux's vm.max_map_count and LLVM cannot place new code."""
    import jax
    import jax.numpy as jnp

    from core.execute.compiles import release_compiled

    def maps():
        return len(Path("/proc/self/maps").read_text().splitlines())

    release_compiled()
    before = maps()
    for n in range(1, 61):  # 60 shapes, 60 executables
        jax.jit(lambda x: jnp.cumsum(jnp.sin(x)) ** 2)(jnp.ones(n)).block_until_ready()
    compiled = maps()
    release_compiled()
    assert compiled - before > 60  # each executable maps its code and data
    assert maps() - before < (compiled - before) / 4


@pytest.mark.parametrize("grid, chunk", [
    ((12, 16), (365, 12, 16)),     # a year of the whole grid fits in one chunk
    ((60, 80), (365, 20, 20)),     # a year, 3 x 4 tiles of 20 x 20 cells
    ((514, 396), (19, 103, 99)),   # 19 days (MAP_VALUES), 5 x 4 tiles
    ((1, 1), (365, 1, 1)),
])
def test_chunk_shape(grid, chunk):
    assert chunk_shape(*grid) == chunk
    days, rows, cols = chunk
    assert days * grid[0] * grid[1] <= MAP_VALUES
    assert (rows, cols) == grid or days * rows * cols <= CHUNK_VALUES


def test_pieces_are_written_in_whole_chunks(tiny_twin, tmp_path):
    """Pieces of any length are regrouped into blocks of the file's chunk length in days (each
    chunk compressed once); pieces must be consecutive."""
    tensors = Dataset(tiny_twin).glacier(Dataset(tiny_twin).names[0])
    shape = (len(tensors.y), len(tensors.x))
    days = np.arange(100, 100 + 23, dtype=np.float32)[:, None, None] * np.ones((1,) + shape, np.float32)
    written = []
    with DailySMBFile(tmp_path / "smb.nc", tensors, "a") as file:
        file._layout = (5,) + shape  # 5-day chunks, to see the regrouping
        real_write = file._write
        file._write = lambda data: (written.append((file.first_day + file.n_days, len(data))), real_write(data))
        start = 100
        for n in (4, 3, 9, 1, 6):
            file.add(start, days[start - 100: start - 100 + n])
            start += n
        with pytest.raises(ValueError, match="starts at day 124, expected 123"):
            file.add(124, days[:2])
    assert written == [(100, 5), (105, 5), (110, 5), (115, 5), (120, 3)]
    with xr.open_dataset(tmp_path / "smb.nc") as ds:
        np.testing.assert_array_equal(ds["smb"].values, days)


# ---------------------------------------------------------------------------------------------
# Permissions follow the umask; interrupted writes leave nothing


def test_daily_smb_and_evaluation_are_group_readable(daily_smb):
    smb_path, eval_path, _ = daily_smb
    assert mode(smb_path) == mode(eval_path) == 0o644


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_outputs_follow_umask(tiny_twin, tmp_path, mask, expected):
    tensors = Dataset(tiny_twin).glacier(Dataset(tiny_twin).names[0])
    day = np.zeros((3, len(tensors.y), len(tensors.x)), np.float32)
    with umask(mask):
        atomic_write_json(tmp_path / "eval.json", {"metrics": {}})
        atomic_write_text(tmp_path / "out" / "log.csv", "epoch\n")
        write_netcdf(tmp_path / "smb.nc", tensors, iter([(10, day)]), "a")
        save_model(build("a"), tmp_path / "params" / "a.eqx")
    for name in ("eval.json", "out/log.csv", "smb.nc", "params/a.eqx"):
        assert mode(tmp_path / name) == expected, name
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []


def test_cache_entry_follows_umask(tiny_twin, tmp_path):
    name = Dataset(tiny_twin).names[0]
    with umask(0o022):
        Dataset(tiny_twin, cache_dir=tmp_path / "cache").glacier(name)
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".tmp-")
    assert mode(entries[0]) == 0o755
    files = list(entries[0].iterdir())
    assert files and all(mode(f) == 0o644 for f in files)


def test_twin_folder_follows_umask(tmp_path):
    with umask(0o022):
        out = generate(tmp_path / "twin", preset="tiny", seed=0)
    folders = [out, *(p for p in out.rglob("*") if p.is_dir())]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(folders) > 1 and {mode(p) for p in folders} == {0o755}
    assert files and {mode(p) for p in files} == {0o644}
    assert [p.name for p in tmp_path.iterdir()] == ["twin"]


class Boom(RuntimeError):
    pass


def test_interrupted_writes_leave_nothing(tiny_twin, tmp_path, monkeypatch):
    tensors = Dataset(tiny_twin).glacier(Dataset(tiny_twin).names[0])

    def half_written(tmp: Path) -> None:
        tmp.write_text('{"metrics": ')
        raise Boom("killed mid-write")

    def pieces():
        yield 0, np.zeros((400, len(tensors.y), len(tensors.x)), np.float32)  # one chunk written
        raise Boom("model crashed mid-stream")

    with umask(0o022):
        with pytest.raises(Boom):
            atomic_write(tmp_path / "eval.json", half_written)
        with pytest.raises(Boom):
            write_netcdf(tmp_path / "smb.nc", tensors, pieces(), "a")
        real_save = np.save

        def failing_save(f, value, **kwargs):
            real_save(f, value, **kwargs)
            raise Boom("disk full")

        monkeypatch.setattr(np, "save", failing_save)
        with pytest.raises(Boom):
            save_model(build("a"), tmp_path / "a.eqx")
    assert list(tmp_path.iterdir()) == []
