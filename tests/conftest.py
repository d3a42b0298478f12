"""Shared test fixtures: the golden reference folder beside the checkout, and small datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


def reference_path(*parts: str) -> Path:
    """A path inside ``../shared/reference``; skips the test if the folder is absent, except
    under CI (CI=true), where a missing folder must fail rather than turn into silent skips."""
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"golden reference {path} is missing under CI")
        pytest.skip(f"golden reference {path} not available (needs ../shared/reference)")
    return path


@pytest.fixture(scope="session")
def tiny_reference_dataset(tmp_path_factory):
    """The published-layout example dataset with a private tensor cache."""
    from dataloader import Dataset

    return Dataset(reference_path("tiny_dataset"), cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture
def tiny_reference_copy(tmp_path) -> Path:
    """A writable copy of the tiny reference dataset (the shared files are read-only)."""
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(reference_path("tiny_dataset"), copy, copy_function=shutil.copyfile)
    for folder, _, _ in os.walk(copy):
        os.chmod(folder, 0o755)
    return copy


@pytest.fixture(scope="session")
def tiny_twin(tmp_path_factory):
    """The synthetic twin's ``tiny`` preset, generated once per session."""
    from dataloader.synthetic import generate

    folder = tmp_path_factory.mktemp("twin") / "tiny"
    generate(folder, preset="tiny", seed=0)
    return folder
