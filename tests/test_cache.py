"""The on-disk cache of prepared glaciers: hit on the second read, invalidation when a source
changes, nothing cached from a failed read, location overrides."""

import os
from pathlib import Path

import numpy as np
import pytest

import dataloader.reader
from dataloader import CACHE_DIR_ENV, DataError, Dataset, GlacierTensors
from dataloader.tensors import SCALAR_FIELDS, array_fields

GLACIER = "Synth Ferner"


@pytest.fixture
def data(tiny_reference_copy) -> Path:
    return tiny_reference_copy


@pytest.fixture
def netcdf_reads(monkeypatch) -> list:
    """Paths of every NetCDF file the reader opens from now on."""
    reads = []
    original = dataloader.reader.open_netcdf

    def counting(path):
        reads.append(Path(path))
        return original(path)

    monkeypatch.setattr(dataloader.reader, "open_netcdf", counting)
    return reads


def entries(cache_root: Path) -> list[str]:
    return sorted(p.name for p in cache_root.iterdir()) if cache_root.exists() else []


def assert_same(a: GlacierTensors, b: GlacierTensors) -> None:
    for field in SCALAR_FIELDS:
        assert getattr(a, field) == getattr(b, field), field
    for field in array_fields():
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and x.shape == y.shape, field
        np.testing.assert_array_equal(x, y, err_msg=field)


def test_second_read_comes_from_cache(data, netcdf_reads):
    first = Dataset(data).glacier(GLACIER)
    assert len(netcdf_reads) == 6  # outlines, dem, orography, facies, temperature, precipitation
    (entry,) = entries(data / ".glaunti_cache")
    assert entry.startswith("Synth_Ferner.")
    second = Dataset(data).glacier(GLACIER)
    assert len(netcdf_reads) == 6  # nothing read again
    assert isinstance(second.temperature_2m, np.memmap)  # memory-mapped, not loaded
    assert not second.temperature_2m.flags.writeable
    # The climate is stored as its 4 distinct cell series, not as (D, H, W) = (3379, 12, 17).
    assert second.temperature_2m.shape == (3379, 4) and second.climate_cell.shape == (12, 17)
    size = (data / ".glaunti_cache" / entry / "temperature_2m.npy").stat().st_size
    assert size < 3379 * 4 * 4 + 1024
    assert_same(first, second)
    assert_same(second, Dataset(data, use_cache=False).glacier(GLACIER))


@pytest.mark.parametrize("change", ["touch", "edit", "remove optional file"])
def test_cache_invalidated_when_a_source_changes(data, netcdf_reads, change):
    Dataset(data).glacier(GLACIER)
    (old_entry,) = entries(data / ".glaunti_cache")
    folder = data / GLACIER
    if change == "touch":
        stat = os.stat(folder / "orography.nc")
        os.utime(folder / "orography.nc", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    elif change == "edit":
        text = (folder / "total_smb.csv").read_text()
        (folder / "total_smb.csv").write_text(text.replace("0.329", "0.331"))
    else:
        (folder / "point_smb.csv").unlink()
    n_reads = len(netcdf_reads)

    glacier = Dataset(data).glacier(GLACIER)
    assert len(netcdf_reads) > n_reads  # read again
    (new_entry,) = entries(data / ".glaunti_cache")  # the stale entry is gone
    assert new_entry != old_entry
    if change == "edit":
        assert glacier.glacier_wide[5, 0] == np.float32(0.331)
    if change == "remove optional file":
        assert len(glacier.stake_id) == 0


def test_nothing_cached_after_a_failed_read(data):
    text = (data / GLACIER / "total_smb.csv").read_text()
    (data / GLACIER / "total_smb.csv").write_text(text.replace("1995-05-04", "1995-13-04"))
    with pytest.raises(DataError, match="midseason_date"):
        Dataset(data).glacier(GLACIER)
    assert entries(data / ".glaunti_cache") == []  # no entry, no half-built temporary folder
    (data / GLACIER / "total_smb.csv").write_text(text)
    Dataset(data).glacier(GLACIER)
    assert len(entries(data / ".glaunti_cache")) == 1


def test_cache_dir_override_and_opt_out(data, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "env_cache"))
    Dataset(data).glacier(GLACIER)
    assert len(entries(tmp_path / "env_cache")) == 1
    Dataset(data, cache_dir=tmp_path / "arg_cache").glacier(GLACIER)  # argument beats env
    assert len(entries(tmp_path / "arg_cache")) == 1
    monkeypatch.delenv(CACHE_DIR_ENV)
    Dataset(data, use_cache=False).glacier(GLACIER)
    assert not (data / ".glaunti_cache").exists()


def test_read_only_data_folder_is_never_written(data, netcdf_reads):
    # A data folder without write bits, like a shared install (root would be allowed to write anyway).
    os.chmod(data, 0o555)
    try:
        with pytest.warns(UserWarning, match="without cache"):
            glacier = Dataset(data).glacier(GLACIER)
    finally:
        os.chmod(data, 0o755)
    assert glacier.name == GLACIER and len(netcdf_reads) == 6
    assert not (data / ".glaunti_cache").exists()
