"""The differentiable analyses of glaunti.analysis on the synthetic twin's tiny preset: the
inverse-modelled offset balances the glacier, integrated gradients are complete, first-order
(JVP) forcing uncertainty matches Monte Carlo where the model is near-linear and is exact for a
linear function, and the helpers work for both climate layouts ((D, H, W) and (D, C) columns)."""

from __future__ import annotations

import types

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glaunti import GRUModel, TIModel
from glaunti import analysis as an
from glaunti.layouts import make_arrays


@pytest.fixture(scope="module")
def glacier(tiny_twin, tmp_path_factory):
    from dataloader import Dataset

    dataset = Dataset(tiny_twin, cache_dir=tmp_path_factory.mktemp("analysis_cache"))
    tensors = dataset.glacier(dataset.test_names[0])
    return types.SimpleNamespace(tensors=tensors, arrays=make_arrays(tensors), model=TIModel.prior())


@pytest.fixture(scope="module")
def offset(glacier):
    g = glacier
    return an.effective_forcing_offset(g.model, g.arrays, g.tensors, 1995, (1995, 1998), steps=12)


def test_offset_brings_the_window_into_balance(glacier, offset):
    assert offset.offsets.shape == offset.balances.shape == (13,)
    assert offset.offsets[0] == 0.0 and offset.balances[0] == offset.balance_without
    assert abs(offset.balance_without) > 0.1  # the prior is far from balance on this glacier
    assert abs(offset.balance_with) < 0.02 * abs(offset.balance_without)
    # Warming lowers the balance, so a negative balance asks for a cooler climate.
    assert offset.sensitivity < 0 and np.sign(offset.offset) == np.sign(offset.balance_without)


def test_daily_series_add_up_to_the_annual_balances(glacier, offset):
    g = glacier
    annual = np.asarray(an.annual_balances(g.model, g.arrays))
    k0, k1 = an.year_index(g.tensors, 1995), an.year_index(g.tensors, 1998)
    plain = an.daily_series(g.model, g.arrays, g.tensors, 1995, 1998)
    assert plain.dates[0] == g.tensors.first_date + int(g.tensors.begin_day[k0])
    assert plain.dates.shape == plain.smb.shape == plain.temperature.shape == plain.precipitation.shape
    np.testing.assert_allclose(plain.cumulative_smb[-1], annual[k0:k1 + 1].sum(), rtol=1e-4)
    shifted = an.daily_series(g.model, g.arrays, g.tensors, 1995, 1998, offset.offset, 1995)
    assert abs(shifted.cumulative_smb[-1] / 4 - offset.balance_with) < 1e-3
    np.testing.assert_allclose(shifted.temperature - plain.temperature, offset.offset, atol=1e-4)


def test_cumulative_maps_gain_mass_everywhere_when_cooled(glacier, offset):
    without, with_offset = an.cumulative_smb_maps(glacier.model, glacier.arrays, glacier.tensors, offset)
    assert without.shape == with_offset.shape == glacier.arrays.shape
    on = ~np.isnan(without)
    assert on.sum() == (np.asarray(glacier.tensors.outlines[5:9]).max(axis=0) > 0).sum()
    assert offset.offset < 0 and np.all(with_offset[on] > without[on])


def test_integrated_gradients_are_complete(glacier):
    g = glacier
    k = g.arrays.n_years - 1
    baseline = an.climatological_baseline(g.arrays, g.tensors)
    ig = an.integrated_gradients(g.model, g.arrays, k, baseline, steps=16, chunk=8, history=1)
    begin = int(g.tensors.begin_day[k - 1])
    np.testing.assert_array_equal(ig.days, np.arange(begin, int(g.tensors.end_day[k]) + 1))
    climate_axes = g.arrays.temperature_2m.shape[1:]  # (H, W), or (C,) with climate columns
    assert ig.temperature.shape == ig.precipitation.shape == (ig.days.size,) + climate_axes
    np.testing.assert_allclose(ig.value, an.annual_balances(g.model, g.arrays)[k], rtol=1e-4)
    assert abs(ig.value - ig.baseline_value) > 0.1
    assert ig.relative_gap < 0.01, ig
    # Attributions per day add up to the same total, and climate off every glacier outline gets none.
    per_t, per_p = ig.per_day()
    np.testing.assert_allclose(per_t.sum() + per_p.sum(), ig.value - ig.baseline_value + ig.gap, rtol=1e-4)
    glacier_cells = np.asarray(g.tensors.outlines[k - 1:k + 1]).max(axis=0) > 0
    cell = getattr(g.arrays, "climate_cell", None)
    if cell is None:
        off = ~glacier_cells
    else:
        off = ~np.isin(np.arange(climate_axes[0]), np.asarray(cell)[glacier_cells])
    assert np.all(ig.temperature[:, off] == 0) and np.all(ig.precipitation[:, off] == 0)
    months, totals = an.monthly(per_t, g.tensors.first_date + ig.days)
    assert 24 <= months.size <= 26 and np.isclose(totals.sum(), per_t.sum())


def test_climatological_baseline_is_the_calendar_day_mean(glacier):
    g = glacier
    t_base, p_base = an.climatological_baseline(g.arrays, g.tensors)
    assert t_base.shape == g.arrays.temperature_2m.shape and p_base.shape == g.arrays.precipitation.shape
    dates = g.tensors.first_date + np.arange(g.tensors.n_days).astype("timedelta64[D]")
    months, days = dates.astype("datetime64[M]"), dates
    first_of_march = (days - months.astype("datetime64[D]")).astype(int) == 0
    first_of_march &= months.astype(int) % 12 == 2
    expected = np.asarray(g.arrays.temperature_2m)[first_of_march].mean(axis=0)
    np.testing.assert_allclose(np.asarray(t_base)[first_of_march],
                               np.broadcast_to(expected, t_base[first_of_march].shape), rtol=1e-5, atol=1e-5)
    # 29 February shares the slot of 28 February.
    feb = (months.astype(int) % 12 == 1) & ((days - months.astype("datetime64[D]")).astype(int) >= 27)
    np.testing.assert_allclose(np.ptp(np.asarray(p_base)[feb], axis=0), 0.0, atol=1e-7)


def test_jvp_of_a_linear_function_is_exact():
    rng = np.random.default_rng(0)
    n_blocks, n = 10, 30
    a, b = rng.normal(size=(n, n_blocks)), rng.normal(size=(n, n_blocks))
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    fn = lambda eps_t, eps_p: a32 @ eps_t + b32 @ eps_p + 1.0  # noqa: E731
    # chunk 7 does not divide the 20 tangents: the padding must add nothing.
    mean, var_t, var_p = an.propagate_variance(fn, n_blocks, 1.5, 0.7, chunk=7)
    np.testing.assert_allclose(mean, 1.0)
    np.testing.assert_allclose(var_t, 1.5**2 * (a**2).sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(var_p, 0.7**2 * (b**2).sum(axis=1), rtol=1e-5)


def test_jvp_variance_matches_monte_carlo_where_near_linear(glacier):
    g = glacier
    k = g.arrays.n_years - 1
    start = g.tensors.first_date + int(g.tensors.mid_day[k])  # six weeks of the last summer
    period = an.dates_period(g.tensors, start, start + 41)
    # A tenth of the published errors keeps the response near-linear (exp(ε) ≈ 1 + ε), so the
    # first-order variance must agree with the ensemble within sampling error.
    sigma_t, sigma_p = 0.1 * an.SIGMA_TEMPERATURE, 0.1 * an.SIGMA_LOG_PRECIPITATION
    jvp = an.forcing_uncertainty_jvp(g.model, g.arrays, period, sigma_t, sigma_p, chunk=8)
    n = 400
    mc = an.forcing_uncertainty_mc(g.model, g.arrays, period, n_members=n, seed=1, sigma_t=sigma_t,
                                   sigma_p=sigma_p, chunk=50)
    assert jvp.mean.shape == jvp.std.shape == mc.std.shape == (42,) and mc.members.shape == (n, 42)
    np.testing.assert_array_equal(jvp.dates, period.dates())
    np.testing.assert_allclose(jvp.std**2, jvp.std_temperature**2 + jvp.std_precipitation**2, rtol=1e-6)
    assert jvp.std[-1] > 0.01
    for day in (20, 41):
        assert abs(mc.std[day] ** 2 / jvp.std[day] ** 2 - 1) < 3 / np.sqrt(n), (day, mc.std[day], jvp.std[day])
        assert abs(mc.mean[day] - jvp.mean[day]) < 4 * jvp.std[day] / np.sqrt(n)


def test_other_models_run_through_the_same_analyses(glacier):
    """Model B goes through year_step like A (C/D too, at a higher compile cost): the daily series
    still add up to its annual balances."""
    g = glacier
    model = GRUModel(key=jax.random.PRNGKey(0))
    series = an.daily_series(model, g.arrays, g.tensors, 1997, 1998)
    annual = np.asarray(an.annual_balances(model, g.arrays))
    np.testing.assert_allclose(series.cumulative_smb[-1], annual[7:9].sum(), rtol=1e-3, atol=1e-4)


class ColumnArrays(eqx.Module):
    """The fields the helpers read, with the daily climate stored per climate column."""

    temperature_2m: jnp.ndarray  # (D, C)
    precipitation: jnp.ndarray  # (D, C)
    climate_cell: jnp.ndarray  # (H, W)
    lapse_offset: jnp.ndarray  # (Y, H, W)
    outlines: jnp.ndarray  # (Y, H, W)
    day_index: jnp.ndarray  # (Y, L)
    day_valid: jnp.ndarray  # (Y, L)


def test_helpers_agree_between_the_column_and_the_grid_layouts():
    rng = np.random.default_rng(1)
    n_days, n_columns, (h, w) = 800, 3, (4, 5)
    cell = rng.integers(0, n_columns, (h, w)).astype(np.int32)
    temperature = rng.normal(size=(n_days, n_columns)).astype(np.float32)
    precipitation = rng.exponential(0.005, size=(n_days, n_columns)).astype(np.float32)
    day_index = np.zeros((2, 408), np.int32)
    day_index[0, :400], day_index[1, :401] = np.arange(400), np.arange(399, 800)  # a shared boundary day
    columns = ColumnArrays(
        jnp.asarray(temperature), jnp.asarray(precipitation), jnp.asarray(cell),
        jnp.asarray(rng.normal(size=(2, h, w)), jnp.float32),
        jnp.asarray(rng.integers(0, 2, (2, h, w)), jnp.float32),
        jnp.asarray(day_index), jnp.asarray(day_index > 0).at[:, 0].set(True),
    )
    grid = eqx.tree_at(lambda a: (a.temperature_2m, a.precipitation), columns,
                       (columns.temperature_2m[:, cell], columns.precipitation[:, cell]))
    period = an.Period(100, 700, 0, 1, 0, 799)

    for a, b in zip(an.glacier_mean_climate(columns, period), an.glacier_mean_climate(grid, period)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    dt, dp = jnp.linspace(-1, 1, n_days), jnp.linspace(0.5, -0.5, n_days)
    pc, pg = an.perturb_climate(columns, dt, dp), an.perturb_climate(grid, dt, dp)
    np.testing.assert_allclose(pc.temperature_2m[:, cell], pg.temperature_2m, rtol=1e-6)
    np.testing.assert_allclose(pc.precipitation[:, cell], pg.precipitation, rtol=1e-6)

    tensors = types.SimpleNamespace(first_date=np.datetime64("1989-10-01"))
    for a, b in zip(an.climatological_baseline(columns, tensors), an.climatological_baseline(grid, tensors)):
        np.testing.assert_allclose(np.asarray(a)[:, cell], b, rtol=1e-6)

    window = an.climate_window(columns, 399, 799)
    assert window.temperature_2m.shape == (401, n_columns) and int(window.day_index[1, 0]) == 0
