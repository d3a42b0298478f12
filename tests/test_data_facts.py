"""Facts of the data side that have one home: the normalisation divisors (constants.py, which a
dataset's normalisation_factors.pkl must match), the stake codes (constants.stake_codes), and
the synthetic twin's command line (`python -m dataloader.synthetic`)."""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import constants
from dataloader import DataError, Dataset
from dataloader.dataset import read_normalisation
from dataloader.layout import NORMALISATION_FACTORS

REPO = Path(__file__).resolve().parents[1]


def write_factors(data: Path, **changes: float) -> None:
    with open(data / "normalisation_factors.pkl", "rb") as f:
        factors = pickle.load(f)
    factors.update(changes)
    (data / "normalisation_factors.pkl").write_bytes(pickle.dumps(factors))


def test_published_factors_are_the_constants(tiny_reference_copy):
    factors = read_normalisation(tiny_reference_copy / "normalisation_factors.pkl")
    assert factors["elevation"] == constants.elevation_norm == 4341.383118842848
    assert factors["elevation_std"] == constants.elevation_std_norm == 5699.1201273232155
    assert factors["t_monthly"] == constants.t_monthly_norm == 45.744850158691406
    assert factors["p_monthly"] == constants.p_monthly_norm == 0.16851751506328583
    # The writer's copy is built from the constants, not typed again.
    assert {k: NORMALISATION_FACTORS[k] for k in factors if k != "delta_z"} == {
        k: v for k, v in factors.items() if k != "delta_z"}


@pytest.mark.parametrize("key", ["elevation", "elevation_std", "t_monthly", "p_monthly"])
def test_factors_other_than_the_constants_are_refused(tiny_reference_copy, key):
    write_factors(tiny_reference_copy, **{key: 2 * NORMALISATION_FACTORS[key]})
    with pytest.raises(DataError, match=rf"normalisation_factors.pkl: key '{key}' is "
                       rf"{2 * NORMALISATION_FACTORS[key]!r}, expected the published "
                       rf"{NORMALISATION_FACTORS[key]!r} \(constants.py\)"):
        Dataset(tiny_reference_copy, use_cache=False)


def test_unused_factor_may_differ(tiny_reference_copy):
    write_factors(tiny_reference_copy, delta_z=1.0)  # not used by any model
    assert Dataset(tiny_reference_copy, use_cache=False).normalisation["delta_z"] == 1.0


def test_stake_codes_have_one_encoding(tiny_reference_dataset):
    assert constants.stake_codes == ("annual", "winter", "summer", "index")
    assert constants.stake_codes[:3] == constants.balance_codes
    assert constants.index_stake_code == 3
    # Syntetbreen's point file holds every code; the tensors carry their positions.
    glacier = tiny_reference_dataset.glacier("Syntetbreen")
    index = glacier.stake_code == constants.index_stake_code
    assert index.any() and (glacier.stake_weight[index] == 0).all()
    assert set(np.unique(glacier.stake_code)) == {0, 1, 2, 3}


def test_twin_command_line_is_the_package():
    result = subprocess.run([sys.executable, "-m", "dataloader.synthetic", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "{tiny,demo,science,bench}" in result.stdout
