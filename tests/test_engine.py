"""The engine (glaunti.glacier) knows no model: a new model plugs in through the model interface
and the registry alone; the year walk, chunking, the explicit switches and the precision."""

from __future__ import annotations

import subprocess
import sys
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import PUBLISHED, REPO
from core.models import EPOCHS, MODELS, build, load_model
from core.train.loss import glacier_loss
from glaunti import registry
from glaunti.glacier import run_glacier, scan_block, walk_years, year_step
from glaunti.layouts import make_arrays
from glaunti.params import load_params, save_params
from glaunti.ti_corr_model import GlaUnTI


class Ablation(eqx.Module):
    """Model E of the tests: every cell loses ``rate`` m w.e. per unit of day weight; the state
    counts the weighted days. Known answers, and it touches no engine, loss or I/O code."""

    rate: jax.Array

    kind: ClassVar[str] = "E"
    cell_independent: ClassVar[bool] = True
    state_cell_axis: ClassVar[int] = 1

    def initial_state(self, shape):
        return jnp.zeros(shape, jnp.float32)

    def year_step(self, arrays, k, state, *, series=False, spinup=False, custom_vjp=False):
        def step(days, temperature, precipitation, weight, _flag):
            return days + weight, -self.rate * weight * jnp.ones_like(temperature)

        valid = arrays.day_valid[k]
        state, acc, out = scan_block(step, state, arrays, k, valid, jnp.zeros_like(valid), series)
        return state, acc, None, out

    def trainable_filter(self):
        return jax.tree_util.tree_map(eqx.is_inexact_array, self)

    def regularisers(self, run, arrays):
        return {"reg_e": self.rate**2}, [self.rate**2]

    def authors_tree(self):
        return ({"rate": self.rate}, {})

    def from_authors_tree(self, tree):
        return Ablation(tree[0]["rate"])


@pytest.fixture(scope="module")
def tensors(tiny_reference_dataset):
    return tiny_reference_dataset.glacier(tiny_reference_dataset.names[0])


def period_weights(tensors):
    """(Y, 2) sum of the valid day weights of each period."""
    w = np.where(tensors.day_valid, tensors.day_weight, 0.0)
    return np.stack([np.sum(np.where(tensors.day_season == s, w, 0.0), axis=1) for s in (0, 1)], axis=1)


def test_a_new_model_runs_through_engine_loss_and_files(tensors, tmp_path):
    model = Ablation(jnp.float32(0.01))
    arrays = make_arrays(tensors)
    run = run_glacier(model, arrays)
    weights = period_weights(tensors)
    expected = -0.01 * weights[:, :, None, None] * np.ones(arrays.shape)
    np.testing.assert_allclose(np.asarray(run.season_smb), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(run.state), np.full(arrays.shape, weights.sum()), rtol=1e-5)
    assert run.corrections is None

    loss, terms = glacier_loss(model, arrays)
    assert float(terms["reg_e"]) == pytest.approx(1e-4)
    assert float(loss) == pytest.approx(float(terms["data_loss"]) + 1e-4, rel=1e-6)

    save_params(model, tmp_path / "e.eqx")
    assert float(load_params(Ablation(jnp.float32(0.0)), tmp_path / "e.eqx").rate) == pytest.approx(0.01)


def test_chunks_of_cells_equal_one_piece(tensors):
    model = Ablation(jnp.float32(0.02))
    arrays = make_arrays(tensors, layout="cells")
    whole = run_glacier(model, arrays, max_chunk_cells=None)
    chunked = run_glacier(model, arrays, max_chunk_cells=arrays.shape[1] // 3)  # 4 chunks
    np.testing.assert_array_equal(np.asarray(chunked.season_smb), np.asarray(whole.season_smb))
    np.testing.assert_array_equal(np.asarray(chunked.state), np.asarray(whole.state))


def test_year_walk_in_two_parts_equals_one(tensors):
    model = load_model("a", PUBLISHED / "a.eqx")
    arrays = make_arrays(tensors)
    state0 = model.initial_state(arrays.shape)
    middle = arrays.n_spinup + 2  # the second part starts among the study years
    whole = eqx.filter_jit(lambda m, a: walk_years(m, a, state0))(model, arrays)
    first = walk_years(model, arrays, state0, 0, middle - 1)
    second = walk_years(model, arrays, first[0], middle, arrays.n_years - 1)
    np.testing.assert_allclose(np.concatenate([first[1], second[1]]), whole[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(second[0], whole[0], rtol=1e-5, atol=1e-6)
    # run_glacier is the same walk from the cold start.
    np.testing.assert_allclose(run_glacier(model, arrays).season_smb, whole[1], rtol=1e-6, atol=1e-7)


def test_daily_series_reduced_per_year_sums_to_the_period_sums(tensors):
    model = load_model("a", PUBLISHED / "a.eqx")
    arrays = make_arrays(tensors)
    mask = arrays.outlines
    state, acc, _, daily = walk_years(model, arrays, model.initial_state(arrays.shape), series=True,
                                      reduce=lambda k, out: jnp.sum(out * mask[k], axis=(-2, -1)))
    assert daily.shape == (arrays.n_years, arrays.day_index.shape[1])
    np.testing.assert_allclose(daily.sum(axis=1), jnp.sum(acc.sum(axis=1) * mask, axis=(-2, -1)), rtol=1e-4)


def test_custom_vjp_is_an_explicit_switch(tensors):
    model = load_model("a", PUBLISHED / "a.eqx")
    arrays = make_arrays(tensors, layout="cells")
    trainable, static = eqx.partition(model, model.trainable_filter())

    def loss(t, custom_vjp):
        return glacier_loss(eqx.combine(t, static), arrays, custom_vjp=custom_vjp)[0]

    plain = eqx.filter_value_and_grad(lambda t: loss(t, False))(trainable)
    custom = eqx.filter_value_and_grad(lambda t: loss(t, True))(trainable)
    assert float(custom[0]) == float(plain[0])  # the forward pass is the same computation
    for g, w in zip(jax.tree_util.tree_leaves(custom[1]), jax.tree_util.tree_leaves(plain[1])):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-7)
    # The hand-written derivative is only traced when asked for.
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda t: loss(t, True))(trainable))
    assert "custom_vjp_call" not in str(jax.make_jaxpr(lambda t: loss(t, False))(trainable))


def test_matmuls_are_float32_whatever_the_global_setting(tensors):
    model = build("b")
    arrays = make_arrays(tensors)
    state = model.initial_state(arrays.shape)
    with jax.default_matmul_precision("bfloat16"):
        jaxpr = str(jax.make_jaxpr(lambda s: year_step(model, arrays, 3, s)[0])(state))
    assert "dot_general" in jaxpr
    assert "precision=(Precision.HIGHEST, Precision.HIGHEST)" in jaxpr
    assert "Precision.DEFAULT" not in jaxpr  # what "bfloat16" would have given


def test_computed_channels_are_one_computation(tensors):
    """The corrector's channels of a glacier year equal those of the same block given as fields."""
    model = load_model("c", PUBLISHED / "c.eqx")
    arrays = make_arrays(tensors)
    k = arrays.n_spinup
    swe = model.initial_state(arrays.shape) + 0.2
    valid = np.asarray(tensors.day_valid[k])
    temperature, precipitation = tensors.climate_fields(0, tensors.n_days - 1)
    days = np.asarray(tensors.day_index[k])
    t = temperature[days] + np.asarray(tensors.lapse_offset[k])
    p = precipitation[days]
    from glaunti.ti_corr_model import computed_channels

    def scan(step, state):
        return scan_block(step, state, arrays, k, arrays.day_valid[k], jnp.zeros_like(arrays.day_valid[k]),
                          False, state.shape)

    on_glacier = computed_channels(model.ti, swe, scan)
    on_fields = GlaUnTI.computed_channels(model, t, p, tensors.day_weight[k], valid, swe)
    # Differences of year sums (~1 m w.e.): a few float32 ulps per day of rounding apart.
    np.testing.assert_allclose(on_fields, on_glacier, rtol=1e-5, atol=1e-5)


def test_c_runs_the_grid_as_a_row_bit_for_bit(tensors):
    """C's TI runs go over the grid as one (1, H·W) row (``glaunti.glacier.grid_row``, faster on
    a CPU): a year's corrections, state, sums and daily series equal the same year run on the
    (H, W) grid to the last bit (the tiny glacier is 12×17: its rows end in a remainder)."""
    from glaunti.glacier import grid_row, published_precision
    from glaunti.ti_corr_model import computed_channels, corrected_run

    model = load_model("c", PUBLISHED / "c.eqx")
    arrays = make_arrays(tensors)
    assert arrays.shape[1] % 8 != 0 and grid_row(arrays).shape == (1, arrays.shape[0] * arrays.shape[1])
    k = arrays.n_spinup
    swe = model.initial_state(arrays.shape) + 0.2
    valid = arrays.day_valid[k]
    base = model.ti.constrained()

    @jax.jit
    def on_grid(swe):  # the year as it ran before rows: every array on the grid
        def scan(step, state):
            return scan_block(step, state, arrays, k, valid, jnp.zeros_like(valid), False, state.shape)

        with published_precision():
            channels = computed_channels(model.ti, swe, scan)
            inputs = jnp.concatenate([channels, arrays.fields[k]], axis=0)
            corrections = model.corrector(inputs, arrays.climate_monthly[k], arrays.n_months[k])
            return (corrections,) + corrected_run(base, corrections, swe, arrays, k, valid, series=True)

    @jax.jit
    def on_row(swe):
        state, acc, corrections, out = year_step(model, arrays, k, swe, series=True)
        return corrections, state, acc, out

    for name, a, b in zip(("corrections", "state", "sums", "series"), on_row(swe), on_grid(swe)):
        assert a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b)), name


def test_one_registry():
    assert MODELS == tuple(registry.REGISTRY) == ("a", "b", "c", "d")
    assert EPOCHS == {"a": 50, "b": 100, "c": 50, "d": 50}  # the published schedule
    for name in MODELS:
        model = build(name)
        for member in ("initial_state", "year_step", "trainable_filter", "regularisers",
                       "authors_tree", "from_authors_tree"):
            assert callable(getattr(model, member)), (name, member)
    with pytest.raises(ValueError, match="unknown model kind 'e'"):
        registry.spec("e")


def test_unfreeze_ti_is_refused_with_a_reason(tmp_path):
    proc = subprocess.run([sys.executable, "infer_and_evaluate.py", "a", "X", str(tmp_path / "s.nc"),
                           str(tmp_path / "e.json"), "--unfreeze_ti"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--unfreeze_ti is not supported" in proc.stderr and "--params_path" in proc.stderr
    assert not (tmp_path / "s.nc").exists()
