"""Shared test fixtures: a clean environment for every run, the golden fixtures shipped in
``tests/reference/`` and ``params/published/``, and small datasets.

The environment. A test run must not depend on the shell it starts from: the scripts read
``GLAUNTI_*`` variables (data folder, cache folder, devices, compilation cache, chunk size,
the distributed trio, debug, the notebooks' ones), SLURM's variables switch on the multi-host
path, and ``JAX_*``/``XLA_FLAGS`` change platforms, precision and device counts. All of them are
removed when this file is imported (before any test module imports JAX, which reads its
variables at import), and the settings the tests rely on are set explicitly:

- JAX on the CPU, float32 by default, float32 matmuls: the golden numbers were computed so;
- exactly one CPU device in the test process (subprocesses that need several ask for them);
- a persistent compilation cache private to the session, so that the scripts the tests start
  share compiles with each other but never with, or from, anything outside the run.

A test that needs one of the removed variables sets it itself (``monkeypatch.setenv``).
"""

from __future__ import annotations

import gc
import os
from collections.abc import MutableMapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "reference"
PUBLISHED = REPO / "params" / "published"
# Real public sources of Hintereisferner, shipped as the own-glacier example.
EXAMPLE_SOURCES = REPO / "examples" / "hintereisferner" / "sources"

# Inherited variables that change what the code under test does.
REMOVED_PREFIXES = ("GLAUNTI_", "SLURM_", "JAX_")
REMOVED_NAMES = ("XLA_FLAGS",)
# JAX's settings for the whole run (JAX reads JAX_<OPTION> when it is imported; subprocesses
# inherit them).
JAX_SETTINGS = {
    "JAX_PLATFORMS": "cpu",
    "JAX_ENABLE_X64": "False",
    "JAX_DEFAULT_MATMUL_PRECISION": "float32",
}
COMPILATION_CACHE_ENV = "GLAUNTI_COMPILATION_CACHE"


def clean_environment(environ: MutableMapping[str, str]) -> list[str]:
    """Remove every inherited variable that steers glaunti, SLURM, JAX or XLA from ``environ``
    and set :data:`JAX_SETTINGS`; returns the names removed (sorted)."""
    removed = sorted(k for k in environ if k.startswith(REMOVED_PREFIXES) or k in REMOVED_NAMES)
    for key in removed:
        del environ[key]
    environ.update(JAX_SETTINGS)
    return removed


clean_environment(os.environ)

import jax  # only now: JAX reads the variables above when it is imported
import numpy as np

jax.config.update("jax_num_cpu_devices", 1)  # before any computation can start the backend


@pytest.fixture(scope="session", autouse=True)
def clean_slate(tmp_path_factory):
    """Session start: the clean environment again (in case collection set something), the
    backend started with its one CPU device, and the session's own persistent compilation cache."""
    clean_environment(os.environ)
    # Started now, so that core.execute.distributed.setup() (the scripts' main functions also run
    # in-process) finds it running and leaves the device count alone.
    assert jax.device_count() == 1 and jax.default_backend() == "cpu"
    # Fails loudly should a plugin have imported JAX before the variables were set.
    assert not jax.config.jax_enable_x64 and jax.config.jax_default_matmul_precision == "float32"
    os.environ[COMPILATION_CACHE_ENV] = str(tmp_path_factory.mktemp("jax_compilation_cache"))
    # This process itself writes nothing to the persistent cache (the scripts started as
    # subprocesses still share the session's): after some hundreds of compiles in one process,
    # jaxlib 0.10 segfaulted serialising an executable into it, twice at the same late test.
    jax.config.update("jax_enable_compilation_cache", False)
    yield


@pytest.fixture(scope="module", autouse=True)
def release_compiled_functions():
    """After each test module, drop the compiled functions it left in this process. The suite
    compiles several hundred XLA programs in one process; with all of them kept, XLA crashed
    (segmentation fault while compiling) late in the session, never in a module run alone."""
    yield
    jax.clear_caches()
    gc.collect()


def reference_path(*parts: str) -> Path:
    """A file or folder of the golden fixtures in ``tests/reference/`` (``"published_params",
    name`` resolves to ``params/published/name``, the weights' one home); a missing one is an
    error, never a skip."""
    if parts and parts[0] == "published_params":
        path = PUBLISHED.joinpath(*parts[1:])
    else:
        path = REFERENCE.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"golden fixture {path} is missing from the repository")
    return path


def published_path(name: str = "") -> Path:
    """A file of the published weights in ``params/published/`` (``a.eqx`` … ``d.eqx``,
    ``manifest.json``), or the folder itself."""
    return reference_path("published_params", *([name] if name else []))


@pytest.fixture(scope="session")
def tiny_reference_dataset(tmp_path_factory):
    """The published-layout example dataset with a private tensor cache."""
    from dataloader import Dataset

    return Dataset(reference_path("tiny_dataset"), cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture
def tiny_reference_copy(tmp_path) -> Path:
    """A writable copy of the tiny reference dataset, for tests that write into a data folder
    or damage its files (the fixtures themselves stay untouched)."""
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(reference_path("tiny_dataset"), copy, copy_function=shutil.copyfile)
    for folder, _, _ in os.walk(copy):
        os.chmod(folder, 0o755)  # copytree keeps folder modes; from a read-only checkout too
    return copy


@pytest.fixture(scope="session")
def tiny_twin(tmp_path_factory):
    """The synthetic twin's ``tiny`` preset, generated once per session."""
    from dataloader.synthetic import generate

    folder = tmp_path_factory.mktemp("twin") / "tiny"
    generate(folder, preset="tiny", seed=0)
    return folder


def daily_series(model, arrays, tensors):
    """The whole daily SMB series of one glacier in memory, from the inference runner
    (``core.infer.runner.iter_daily_smb``): (DataArray (time, y, x), climate-day index of its
    first day)."""
    import xarray as xr

    from core.infer.runner import iter_daily_smb

    chunks = list(iter_daily_smb(model, arrays, tensors))
    first_day = chunks[0][0]
    data = np.concatenate([c for _, c in chunks])
    dates = tensors.first_date + np.arange(first_day, first_day + len(data)).astype("timedelta64[D]")
    coords = {"time": dates.astype("datetime64[ns]"), "y": tensors.y, "x": tensors.x}
    return xr.DataArray(data, dims=("time", "y", "x"), coords=coords, name="smb"), first_day
