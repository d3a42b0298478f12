"""Models A–D against the authors' golden fixtures (reference/model_cases.npz), plus the
behaviours the rest of the project relies on: padding, continuation, frozen TI parameters
in GlaUnTI, no recompilation across years of one grid.

The fixtures ship with the repository (tests/reference/README.md); the published weights are
in params/published/.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import constants
from conftest import PUBLISHED, reference_path
from glaunti import (
    CALIBRATED,
    PARAM_NAMES,
    Corrector,
    TIModel,
    default_weights,
    load_params,
    prior_penalty,
)
from glaunti.ti_model import PRIOR_CONSTRAINED

# The fixtures agree to a few float32 ulps (max measured: ~1.4e-6 absolute on GRU SMB of
# order 1, ~1e-6 relative elsewhere); this is 5× tighter than the project-wide limit.
TOL = dict(rtol=2e-5, atol=2e-6)


@pytest.fixture(scope="module")
def cases():
    with np.load(reference_path("model_cases.npz")) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def published():
    return {kind: load_params(kind, PUBLISHED / f"{kind}.eqx") for kind in "abcd"}


# One jitted entry point per method, so tests share compilations.
@eqx.filter_jit
def run_model(model, *args, **kwargs):
    return model.run(*args, **kwargs)


YEAR_TRACES: list[int] = []
BLOCK = 368  # common day-block length L (a multiple of 8 ≥ the longest block), as glacier.py


@eqx.filter_jit
def glaunti_year(model, fields, climate, n_months, temperature, precipitation, weights, valid,
                 initial_swe):
    """One balance year of C/D as the whole-glacier scan runs it: corrections from the
    year's block, then the corrected run over the same block (padded, traced month count)."""
    YEAR_TRACES.append(1)  # a Python side effect: runs only while tracing
    corrections = model.corrections(fields, climate, n_months, temperature, precipitation,
                                    weights, valid, initial_swe)
    smb, swe = model.run(temperature, precipitation, corrections, initial_swe, weights, valid)
    return corrections, smb, swe


def padded_block(temperature, precipitation, weights=None):
    """A block padded to BLOCK days with garbage, its weights (0 in padding) and validity."""
    n = len(temperature)
    valid = np.arange(BLOCK) < n
    w = np.zeros(BLOCK, np.float32)
    w[:n] = default_weights(n) if weights is None else weights
    return (pad_days(temperature, BLOCK - n, 40.0), pad_days(precipitation, BLOCK - n, 0.2),
            w, valid)


def seasonal_block(cases):
    """Winter then summer as one block (midseason day twice, ½ weight each)."""
    tw, pw = cases["winter/temperature"], cases["winter/precipitation"]
    ts, ps = cases["summer/temperature"], cases["summer/precipitation"]
    weights = np.concatenate([default_weights(len(tw)), default_weights(len(ts))])
    return np.concatenate([tw, ts]), np.concatenate([pw, ps]), weights


def pad_days(x, n_pad, fill):
    return np.concatenate([x, np.full((n_pad,) + x.shape[1:], fill, x.dtype)])


# ----------------------------------------------------------------------------- model A


def test_ti_annual_accumulated_and_series(cases, published):
    a = published["a"]
    args = (cases["annual/temperature"], cases["annual/precipitation"], cases["initial_swe"])
    smb, swe = run_model(a, *args)
    np.testing.assert_allclose(smb, cases["a/annual/smb"], **TOL)
    np.testing.assert_allclose(swe, cases["a/annual/swe"], **TOL)
    series, swe_s = run_model(a, *args, return_series=True)
    assert series.shape == cases["a/annual/smb_series"].shape
    np.testing.assert_allclose(series, cases["a/annual/smb_series"], **TOL)
    np.testing.assert_array_equal(swe_s, swe)


def test_ti_cold_start(cases, published):
    smb, swe = run_model(published["a"], cases["annual/temperature"], cases["annual/precipitation"])
    np.testing.assert_allclose(smb, cases["a/annual_cold_start/smb"], **TOL)
    np.testing.assert_allclose(swe, cases["a/annual_cold_start/swe"], **TOL)


def test_ti_winter_then_summer(cases, published):
    a = published["a"]
    smb_w, swe_w = run_model(
        a, cases["winter/temperature"], cases["winter/precipitation"], cases["initial_swe"]
    )
    np.testing.assert_allclose(smb_w, cases["a/winter/smb"], **TOL)
    np.testing.assert_allclose(swe_w, cases["a/winter/swe"], **TOL)
    smb_s, swe_s = run_model(a, cases["summer/temperature"], cases["summer/precipitation"], swe_w)
    np.testing.assert_allclose(smb_s, cases["a/summer/smb"], **TOL)
    np.testing.assert_allclose(swe_s, cases["a/summer/swe"], **TOL)
    # The dataloader's day block (winter + summer, midseason twice) is the same run.
    t, p, w = seasonal_block(cases)
    smb_b, swe_b = run_model(a, t, p, cases["initial_swe"], w)
    np.testing.assert_allclose(smb_b, cases["a/winter/smb"] + cases["a/summer/smb"], **TOL)
    np.testing.assert_allclose(swe_b, cases["a/summer/swe"], **TOL)


def test_ti_gradient_of_glacier_wide_smb(cases, published):
    outlines = cases["grid/outlines"]

    @eqx.filter_jit
    @eqx.filter_grad
    def grad(model):
        smb, _ = model.run(
            cases["annual/temperature"], cases["annual/precipitation"], cases["initial_swe"]
        )
        return jnp.sum(smb * outlines) / jnp.sum(outlines)

    g = grad(published["a"])
    for name in CALIBRATED:
        expected = cases[f"a/annual/grad_glacier_wide/{name}"]
        np.testing.assert_allclose(getattr(g, name), expected, rtol=2e-5, atol=1e-8, err_msg=name)


def test_ti_prior(cases):
    prior = TIModel.prior()
    c = prior.constrained()
    np.testing.assert_allclose(
        [c.prec_scale, c.ddf_snow, c.ddf_relative_ice, c.snow_to_rain_steepness,
         c.snow_to_rain_centre, c.snow_depletion_steepness, c.snow_depletion_centre,
         c.t_softplus_sharpness, c.swe_softplus_sharpness],
        [1.4, 0.0049, 1.5, 1.5, 1.0, 3.0, 0.03, 10.0, 20.0], rtol=1e-6,
    )
    assert all(getattr(prior, n).dtype == jnp.float32 and getattr(prior, n).shape == ()
               for n in PARAM_NAMES)
    assert float(prior_penalty(prior)) == 0.0
    smb, swe = run_model(
        prior, cases["annual/temperature"], cases["annual/precipitation"], cases["initial_swe"]
    )
    np.testing.assert_allclose(smb, cases["a_prior/annual/smb"], **TOL)
    np.testing.assert_allclose(swe, cases["a_prior/annual/swe"], **TOL)


def test_ti_prior_penalty_of_published_a(published):
    np.testing.assert_allclose(prior_penalty(published["a"]), 0.0002816053747665137, rtol=1e-6)
    # The constant TI prior term is part of C's and D's loss too (docs/model.md §9.7).
    np.testing.assert_allclose(prior_penalty(published["c"].ti), 0.0002816053747665137, rtol=1e-6)


def test_ti_stored_priors_are_the_logs_of_the_table():
    c = TIModel.prior().constrained()
    table = PRIOR_CONSTRAINED
    for name, value in zip(c._fields, c):
        np.testing.assert_allclose(value, table[name], rtol=3e-7, err_msg=name)


def test_ti_trainable_filter_selects_the_seven_calibrated():
    spec = TIModel.prior().trainable_filter()
    assert {n for n in PARAM_NAMES if getattr(spec, n)} == set(CALIBRATED)
    assert len(CALIBRATED) == 7 and set(PARAM_NAMES) - set(CALIBRATED) == {
        "t_softplus_sharpness_log", "swe_softplus_sharpness_log"}


def test_ti_padding_equals_unpadded(cases, published):
    a = published["a"]
    t, p, swe0 = cases["annual/temperature"], cases["annual/precipitation"], cases["initial_swe"]
    n, n_pad = len(t), 10
    # Garbage in the padding: it must not leak into anything.
    t_pad, p_pad = pad_days(t, n_pad, 25.0), pad_days(p, n_pad, 0.05)
    valid = np.arange(n + n_pad) < n
    ref_smb, ref_swe = run_model(a, t, p, swe0)
    ref_series, _ = run_model(a, t, p, swe0, return_series=True)
    for weights in (None, np.concatenate([default_weights(n), np.zeros(n_pad, np.float32)])):
        smb, swe = run_model(a, t_pad, p_pad, swe0, weights, valid)
        np.testing.assert_array_equal(swe, ref_swe)
        np.testing.assert_allclose(smb, ref_smb, rtol=0, atol=1e-6)
        series, swe_s = run_model(a, t_pad, p_pad, swe0, weights, valid, return_series=True)
        np.testing.assert_array_equal(series[:n], ref_series)
        np.testing.assert_array_equal(series[n:], 0.0)
        np.testing.assert_array_equal(swe_s, ref_swe)


def test_ti_temperature_shift_and_corrections(cases, published):
    """Zero corrections are the identity; d5 and ``temperature_shift`` are the same Δ."""
    a = published["a"]
    t, p, swe0 = cases["summer/temperature"], cases["summer/precipitation"], cases["initial_swe"]
    zero = np.zeros((5,) + swe0.shape, np.float32)
    np.testing.assert_array_equal(run_model(a, t, p, swe0, corrections=zero)[0],
                                  run_model(a, t, p, swe0)[0])
    shift = np.full(swe0.shape, 0.7, np.float32)
    by_d5 = run_model(a, t, p, swe0, corrections=np.concatenate([zero[:4], shift[None]]))[0]
    by_shift = run_model(a, t, p, swe0, temperature_shift=shift)[0]
    np.testing.assert_allclose(by_d5, by_shift, rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(by_shift) <= np.asarray(run_model(a, t, p, swe0)[0]) + 1e-7)


# ----------------------------------------------------------------------------- model B


def test_gru_winter_cold_then_summer_continued(cases, published):
    b = published["b"]
    smb_w, h_w = run_model(b, cases["winter/temperature"], cases["winter/precipitation"])
    np.testing.assert_allclose(smb_w, cases["b/winter/smb"], **TOL)
    np.testing.assert_allclose(h_w, cases["b/winter/h"], **TOL)
    ts, ps = cases["summer/temperature"], cases["summer/precipitation"]
    smb_s, h_s = run_model(b, ts, ps, h_w)
    np.testing.assert_allclose(smb_s, cases["b/summer/smb"], **TOL)
    np.testing.assert_allclose(h_s, cases["b/summer/h"], **TOL)
    series, h_series = run_model(b, ts, ps, h_w, return_series=True)
    np.testing.assert_allclose(series, cases["b/summer/smb_series"], **TOL)
    np.testing.assert_array_equal(h_series, h_s)
    # The continuation rule is the default only: explicit skip flags give the same run.
    skip = np.zeros(len(ts), bool)
    skip[0] = True
    np.testing.assert_array_equal(run_model(b, ts, ps, h_w, skip_update=skip)[0], smb_s)
    no_skip = np.zeros(len(ts), bool)
    assert not np.allclose(run_model(b, ts, ps, h_w, skip_update=no_skip)[0], smb_s)


def test_gru_padding_equals_unpadded(cases, published):
    b = published["b"]
    ts, ps = cases["summer/temperature"], cases["summer/precipitation"]
    h0 = cases["b/winter/h"]
    n, n_pad = len(ts), 6
    valid = np.arange(n + n_pad) < n
    ts_pad, ps_pad = pad_days(ts, n_pad, 30.0), pad_days(ps, n_pad, 0.1)
    ref_smb, ref_h = run_model(b, ts, ps, h0)
    ref_series, _ = run_model(b, ts, ps, h0, return_series=True)
    smb, h = run_model(b, ts_pad, ps_pad, h0, None, valid)
    np.testing.assert_array_equal(h, ref_h)
    np.testing.assert_allclose(smb, ref_smb, rtol=0, atol=1e-6)
    series, _ = run_model(b, ts_pad, ps_pad, h0, None, valid, return_series=True)
    np.testing.assert_array_equal(series[:n], ref_series)
    np.testing.assert_array_equal(series[n:], 0.0)


def test_gru_leaves_follow_equinox_grucell(published):
    b = published["b"]
    assert isinstance(b.rnn, eqx.nn.GRUCell)
    shapes = [x.shape for x in jax.tree_util.tree_leaves(b)]
    assert shapes == [(48, 2), (48, 16), (48,), (16,), (1, 16), (1,), (16,)]
    # The batched day step is eqx.nn.GRUCell's.
    from glaunti.gru_model import gru_cells_step

    x = jax.random.normal(jax.random.PRNGKey(1), (5, 2))
    h = jax.random.normal(jax.random.PRNGKey(2), (5, 16))
    np.testing.assert_allclose(gru_cells_step(b.rnn, x, h), jax.vmap(b.rnn)(x, h), rtol=1e-6,
                               atol=1e-6)


# ----------------------------------------------------------------------------- models C, D


FIELDS = {"c": "corrector/fields_placeholder", "d": "corrector/fields_facies"}


def padded_climate(cases):
    """The year's (2, 13) monthly series zero-padded to (2, 14), as GlacierTensors holds it;
    with a traced month count, as in the whole-glacier scan over years."""
    climate = np.zeros((2, 14), np.float32)
    climate[:, :13] = cases["corrector/climate_monthly"]
    return climate, np.int32(13)


@pytest.mark.parametrize("name", ["c", "d"])
def test_glaunti_corrections(cases, published, name):
    """Corrections (and the runs with them) from the published C/D, computed as the glacier
    pipeline does: a zero-padded climate series with a traced month count, day blocks
    padded to a common length, winter + summer as one block."""
    model = published[name]
    fields, (climate, n_months) = cases[FIELDS[name]], padded_climate(cases)
    swe0 = cases["initial_swe"]

    block = padded_block(cases["annual/temperature"], cases["annual/precipitation"])
    corr, smb, swe = glaunti_year(model, fields, climate, n_months, *block, swe0)
    np.testing.assert_allclose(corr, cases[f"{name}/annual/corrections"], **TOL)
    np.testing.assert_allclose(smb, cases[f"{name}/annual/smb"], **TOL)
    np.testing.assert_allclose(swe, cases[f"{name}/annual/swe"], **TOL)

    block = padded_block(*seasonal_block(cases))
    corr, smb, swe = glaunti_year(model, fields, climate, n_months, *block, swe0)
    np.testing.assert_allclose(corr, cases[f"{name}/seasonal/corrections"], **TOL)
    np.testing.assert_allclose(
        smb, cases[f"{name}/seasonal/winter_smb"] + cases[f"{name}/seasonal/summer_smb"], **TOL
    )
    np.testing.assert_allclose(swe, cases[f"{name}/seasonal/summer_swe"], **TOL)


@pytest.mark.parametrize("name", ["c", "d"])
def test_glaunti_runs(cases, published, name):
    model = published[name]
    swe0 = cases["initial_swe"]
    corr = cases[f"{name}/seasonal/corrections"]
    smb_w, swe_w = run_model(
        model, cases["winter/temperature"], cases["winter/precipitation"], corr, swe0
    )
    np.testing.assert_allclose(smb_w, cases[f"{name}/seasonal/winter_smb"], **TOL)
    np.testing.assert_allclose(swe_w, cases[f"{name}/seasonal/winter_swe"], **TOL)
    smb_s, swe_s = run_model(
        model, cases["summer/temperature"], cases["summer/precipitation"], corr, swe_w
    )
    np.testing.assert_allclose(smb_s, cases[f"{name}/seasonal/summer_smb"], **TOL)
    np.testing.assert_allclose(swe_s, cases[f"{name}/seasonal/summer_swe"], **TOL)

    corr = cases[f"{name}/annual/corrections"]
    t, p = cases["annual/temperature"], cases["annual/precipitation"]
    smb, swe = run_model(model, t, p, corr, swe0)
    np.testing.assert_allclose(smb, cases[f"{name}/annual/smb"], **TOL)
    np.testing.assert_allclose(swe, cases[f"{name}/annual/swe"], **TOL)
    series, _ = run_model(model, t, p, corr, swe0, return_series=True)
    np.testing.assert_allclose(series, cases[f"{name}/annual/smb_series"], **TOL)


def test_corrector_padded_climate_with_traced_month_count(cases, published):
    """Zero-padded (2, 14) + n_months gives exactly the unpadded (2, n) result."""
    corrector = published["c"].corrector
    padded, _ = padded_climate(cases)
    padded[:, 13] = 0.3  # a 14th month for n = 14

    @eqx.filter_jit
    def features(corr, climate, n_months):
        return corr.climate_features(climate, n_months)

    for n_months in (12, 13, 14):
        expected = features(corrector, padded[:, :n_months], None)
        np.testing.assert_array_equal(features(corrector, padded, jnp.int32(n_months)), expected)
    assert not np.allclose(features(corrector, padded, jnp.int32(12)),
                           features(corrector, padded, jnp.int32(13)))


def test_corrector_refuses_small_grids():
    corrector = eqx.filter_eval_shape(Corrector)  # the check happens at trace time

    def out_shape(h, w):
        return eqx.filter_eval_shape(corrector, jnp.zeros((15, h, w)), jnp.zeros((2, 13))).shape

    side = constants.min_grid_side
    assert out_shape(side, side) == (5, side, side)
    assert out_shape(21, 30) == (5, 21, 30)
    for shape in ((side - 1, 20), (20, side - 1)):
        with pytest.raises(ValueError, match="at least"):
            out_shape(*shape)


def test_glaunti_computed_channels_padding_and_no_gradient(cases, published):
    model = published["c"]
    t, p, swe0 = cases["annual/temperature"], cases["annual/precipitation"], cases["initial_swe"]
    n, n_pad = len(t), 8
    valid = np.arange(n + n_pad) < n

    @eqx.filter_jit
    def channels(m, t, p, valid, swe0):
        return m.computed_channels(t, p, None, valid, swe0)

    ref = channels(model, t, p, None, swe0)
    padded = channels(model, pad_days(t, n_pad, 20.0), pad_days(p, n_pad, 0.1), valid, swe0)
    np.testing.assert_allclose(padded, ref, rtol=0, atol=1e-6)

    # No gradient flows through the three channels: not to the TI parameters, the year's
    # initial SWE, nor the daily climate.
    def loss(m, t, p, swe0):
        return jnp.sum(m.computed_channels(t, p, None, None, swe0) ** 2)

    g_model, g_t, g_p, g_swe = eqx.filter_jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(
        model, t, p, swe0
    )
    for g in (g_model, g_t, g_p, g_swe):
        assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(g))


def test_glaunti_training_step_changes_only_the_corrector(cases, published):
    model = published["c"]
    t, p, swe0 = cases["summer/temperature"], cases["summer/precipitation"], cases["initial_swe"]
    fields, (climate, n_months) = cases[FIELDS["c"]], padded_climate(cases)
    outlines = cases["grid/outlines"]

    @eqx.filter_jit
    @eqx.filter_grad
    def gradient(m):
        corr = m.corrections(fields, climate, n_months, t, p, None, None, swe0)
        smb, _ = m.run(t, p, corr, swe0)
        glacier_wide = jnp.sum(smb * outlines) / jnp.sum(outlines)
        return (glacier_wide + 1.0) ** 2 + jnp.mean(corr**2)

    grads = gradient(model)  # w.r.t. every array leaf, the frozen TI parameters included
    assert all(float(getattr(grads.ti, n)) == 0.0 for n in PARAM_NAMES)
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(grads.corrector))

    spec = model.trainable_filter()
    assert not any(jax.tree_util.tree_leaves(spec.ti))
    params, static = eqx.partition(model, spec)
    optimiser = optax.adam(1e-3)
    updates, _ = optimiser.update(eqx.filter(grads, spec), optimiser.init(params), params)
    new = eqx.combine(eqx.apply_updates(params, updates), static)
    for name in PARAM_NAMES:
        assert getattr(new.ti, name) == getattr(model.ti, name)
    changed = [
        bool(np.any(np.asarray(a) != np.asarray(b)))
        for a, b in zip(jax.tree_util.tree_leaves(model.corrector),
                        jax.tree_util.tree_leaves(new.corrector))
    ]
    assert all(changed)


# ----------------------------------------------------------------------------- compilation


def test_no_recompilation_for_a_second_year(cases, published):
    """One compiled year function serves every year of one grid (same shapes)."""
    model = published["d"]
    fields, (climate, n_months) = cases[FIELDS["d"]], padded_climate(cases)
    t, p = cases["annual/temperature"], cases["annual/precipitation"]
    _, _, swe1 = glaunti_year(model, fields, climate, n_months, *padded_block(t, p),
                              cases["initial_swe"])
    traces = len(YEAR_TRACES)
    assert traces >= 1
    # A second year: other values, another length, another month count and model C's
    # inputs — the same shapes.
    glaunti_year(model, cases[FIELDS["c"]], np.roll(climate, 1, axis=1), np.int32(14),
                 *padded_block(t[:365] + 0.8, p[:365] * 1.2), swe1)
    assert len(YEAR_TRACES) == traces

    ti_traces = []

    @eqx.filter_jit
    def ti_year(model, t, p, swe0):
        ti_traces.append(1)
        return model.run(t, p, swe0)

    _, swe = ti_year(published["a"], t, p, cases["initial_swe"])
    ti_year(published["a"], t + 1.0, p * 0.9, swe)
    assert len(ti_traces) == 1
