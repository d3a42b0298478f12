"""Parameter files: our ``.eqx`` files and the published ones are interchangeable.

The published files are the ones in params/published/.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import glaunti.params as params_module
from conftest import PUBLISHED
from core.models import save_model
from glaunti import (
    Corrector,
    GlaUnTI,
    GRUModel,
    ParamsError,
    TIModel,
    leaf_manifest,
    load_params,
    save_params,
    template,
)

KINDS = ("a", "b", "c", "d")


@pytest.fixture(scope="module")
def manifest():
    return json.loads((PUBLISHED / "manifest.json").read_text())


def published_records(kind):
    """The raw arrays of a published file, in file order."""
    out = []
    path = PUBLISHED / f"{kind}.eqx"
    with open(path, "rb") as f:
        while f.tell() < path.stat().st_size:
            out.append(np.load(f, allow_pickle=False))
    return out


def leaves_as_numpy(model):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(params_module.authors_tree(model))]


@pytest.mark.parametrize("kind", KINDS)
def test_leaf_order_equals_published_manifest(manifest, kind):
    # Derived in code from our modules, for shape-only templates and real models alike.
    assert leaf_manifest(template(kind)) == manifest[kind]
    real = {"a": TIModel.prior, "b": GRUModel, "c": lambda: GlaUnTI(TIModel.prior()),
            "d": lambda: GlaUnTI(TIModel.prior())}[kind]()
    assert leaf_manifest(real) == manifest[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_load_published_and_save_back_bit_exactly(tmp_path, kind):
    model = load_params(kind, PUBLISHED / f"{kind}.eqx")
    records = published_records(kind)
    loaded = leaves_as_numpy(model)
    assert len(loaded) == len(records)
    for ours, theirs in zip(loaded, records):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs)
    # Saving writes the published file byte for byte: the formats are interchangeable.
    out = tmp_path / f"{kind}.eqx"
    save_params(model, out)
    assert out.read_bytes() == (PUBLISHED / f"{kind}.eqx").read_bytes()


def test_published_values_land_on_the_right_fields():
    a = load_params("a", PUBLISHED / "a.eqx")
    # Sharpness priors 10 and 20 are fixed: the last two records of a.eqx, sorted by name.
    np.testing.assert_allclose(jnp.exp(a.t_softplus_sharpness_log), 10.0, rtol=1e-6)
    np.testing.assert_allclose(jnp.exp(a.swe_softplus_sharpness_log), 20.0, rtol=1e-6)
    c = load_params("c", PUBLISHED / "c.eqx")
    for name in ("prec_scale_log", "ddf_snow_log", "snow_to_rain_centre"):
        # C's frozen TI parameters are calibrated A's.
        assert getattr(c.ti, name) == getattr(a, name)
    assert isinstance(c.corrector, Corrector)
    b = load_params(GRUModel(), PUBLISHED / "b.eqx")  # a real template works too
    assert b.init_h.shape == (16,)


@pytest.mark.parametrize(
    "make",
    [
        lambda: TIModel.prior(),
        lambda: GRUModel(jax.random.PRNGKey(3)),
        lambda: GlaUnTI(TIModel.prior(), key=jax.random.PRNGKey(4)),
    ],
    ids=["A", "B", "CD"],
)
def test_save_load_round_trip(tmp_path, make):
    model = make()
    path = tmp_path / "sub" / "model.eqx"
    save_model(model, path)  # core.models: glaunti.params.save_params through a temporary file
    kind = {TIModel: "a", GRUModel: "b", GlaUnTI: "c"}[type(model)]
    back = load_params(kind, path)
    assert type(back) is type(model)
    for x, y in zip(leaves_as_numpy(model), leaves_as_numpy(back)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    save_params(back, tmp_path / "again.eqx")
    assert (tmp_path / "again.eqx").read_bytes() == path.read_bytes()
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.eqx"]  # no temp left


def test_wrong_model_is_a_clear_error(tmp_path):
    save_params(TIModel.prior(), tmp_path / "a.eqx")
    with pytest.raises(ParamsError, match=r"a\.eqx.*rnn\.weight_ih.*another model"):
        load_params("b", tmp_path / "a.eqx")
    save_params(GRUModel(jax.random.PRNGKey(0)), tmp_path / "b.eqx")
    with pytest.raises(ParamsError, match=r"b\.eqx.*prec_scale_log|b\.eqx.*ddf_relative"):
        load_params("a", tmp_path / "b.eqx")
    # A file with more arrays than the model has.
    data = (tmp_path / "a.eqx").read_bytes()
    (tmp_path / "long.eqx").write_bytes(data + data)
    with pytest.raises(ParamsError, match=r"long\.eqx.*beyond the 9 arrays"):
        load_params("a", tmp_path / "long.eqx")
    assert issubclass(ParamsError, ValueError)


def test_truncated_and_missing_files_are_clear_errors(tmp_path):
    save_params(GRUModel(jax.random.PRNGKey(0)), tmp_path / "b.eqx")
    data = (tmp_path / "b.eqx").read_bytes()
    for n_bytes in (0, 10, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.eqx").write_bytes(data[:n_bytes])
        with pytest.raises(ParamsError, match=r"cut\.eqx.*(truncated|cannot read)"):
            load_params("b", tmp_path / "cut.eqx")
    with pytest.raises(ParamsError, match=r"nothing\.eqx.*no such parameter file"):
        load_params("b", tmp_path / "nothing.eqx")
    with pytest.raises(ValueError, match="unknown model kind"):
        load_params("e", tmp_path / "b.eqx")


def test_save_is_atomic(tmp_path, monkeypatch):
    """A failing write (``core.models.save_model``) leaves the previous file intact and no
    temporary file behind."""
    path = tmp_path / "a.eqx"
    save_params(TIModel.prior(), path)
    before = path.read_bytes()
    calls = []
    real_save = np.save

    def failing_save(f, x, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(f, x, **kwargs)

    monkeypatch.setattr(params_module.np, "save", failing_save)
    shifted = TIModel(**{k: v + 1.0 for k, v in TIModel.prior().stored().items()})
    with pytest.raises(OSError, match="disk full"):
        save_model(shifted, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.eqx"]
