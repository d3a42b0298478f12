"""The test run starts from a clean slate whatever the shell holds (tests/conftest.py): no
``GLAUNTI_*``, SLURM, ``JAX_*`` or ``XLA_FLAGS`` inherited, JAX pinned to one float32 CPU
device, and the persistent compilation cache private to the session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax

import constants
from conftest import JAX_SETTINGS, REPO, clean_environment

# What a user's shell may hold, each of which changed the run before the clean slate.
HOSTILE = {
    "GLAUNTI_CACHE_DIR": "/nonexistent/cache",  # test_cache looked for the cache in the data folder
    "GLAUNTI_DATA_FOLDER": "/nonexistent",
    "GLAUNTI_CPU_DEVICES": "3",
    "GLAUNTI_COMPILATION_CACHE": "0",
    "GLAUNTI_MAX_CHUNK_CELLS": "7",  # no longer read by the library; must stay harmless
    "GLAUNTI_DEBUG": "1",
    "GLAUNTI_COORDINATOR": "localhost:1",
    "GLAUNTI_NOTEBOOK_GLACIER": "Nowhere",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_ID": "0",
    "JAX_ENABLE_X64": "1",
    "JAX_DEFAULT_MATMUL_PRECISION": "bfloat16",
    "JAX_COMPILATION_CACHE_DIR": "/nonexistent/jax",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=5",
}


def test_clean_environment_removes_what_steers_the_code():
    environ = {**HOSTILE, "HOME": "/home/user", "PATH": "/usr/bin", "CI": "true", "MY_GLAUNTI_X": "kept"}
    removed = clean_environment(environ)
    assert removed == sorted(HOSTILE)
    assert environ == {"HOME": "/home/user", "PATH": "/usr/bin", "CI": "true", "MY_GLAUNTI_X": "kept",
                       **JAX_SETTINGS}


def test_session_sees_a_clean_slate(tmp_path_factory):
    """Run in this session and, by the test below, in a session started from a hostile shell."""
    from core.execute.distributed import _distributed_args
    from dataloader.cache import CACHE_DIR_ENV
    from dataloader.dataset import DATA_FOLDER_ENV, resolve_data_folder
    from glaunti import glacier

    glaunti_vars = {k: v for k, v in os.environ.items() if k.startswith("GLAUNTI_")}
    cache = Path(glaunti_vars.pop("GLAUNTI_COMPILATION_CACHE"))
    assert glaunti_vars == {}
    assert cache.is_dir() and cache.is_relative_to(tmp_path_factory.getbasetemp())
    assert not [k for k in os.environ if k.startswith("SLURM_")] and "XLA_FLAGS" not in os.environ
    assert {k: v for k, v in os.environ.items() if k.startswith("JAX_")} == JAX_SETTINGS
    assert CACHE_DIR_ENV not in os.environ and DATA_FOLDER_ENV not in os.environ
    assert resolve_data_folder() == REPO / constants.data_folder
    assert glacier.MAX_CHUNK_CELLS == 32768
    assert _distributed_args() is None
    assert jax.device_count() == 1 and jax.default_backend() == "cpu"
    assert jax.numpy.ones(2).dtype == jax.numpy.float32
    assert jax.config.jax_default_matmul_precision == "float32"


def test_hostile_shell_gets_a_clean_slate(tmp_path):
    env = {**os.environ, **HOSTILE}
    node = "tests/test_environment.py::test_session_sees_a_clean_slate"
    args = ["-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "run"), node]
    proc = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 passed" in proc.stdout
