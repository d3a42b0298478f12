"""C/D's year in training: the corrected run differentiated on the loss cells only, the computed
channels kept as the year's residuals (``GlaUnTI.year_remat_policy``).

Both must leave every forward number as it was and the gradient equal to float32 rounding.
The reference is the previous formulation, kept here: the computed channels, the corrector,
then one differentiable run of the whole grid.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.models import load_model, published_params_path, uses_facies
from core.train.loss import glacier_loss
from glaunti.glacier import published_precision, run_glacier, scan_block
from glaunti.layouts import make_arrays
from glaunti.ti_corr_model import GlaUnTI
from glaunti.ti_model import apply_corrections, ti_step

# Largest gradient difference, relative to the gradient's largest magnitude. Running the loss
# cells apart changes nothing (measured: bit-identical gradients, C and D). Keeping the channels
# is compared with keeping everything (no recomputation: the gradient of the forward pass that
# ran); measured 6e-5 (C) and 8e-8 (D). The previous full recomputation is no reference: XLA
# compiles the recomputed channels in another context, a few ulps off the forward's, and in D
# the gradient then moves by 1.1 % (a pooling or ReLU decision flips); keeping the channels
# removes that.
GRAD_RTOL = 1e-5
REMAT_RTOL = 1e-4


class WholeGridGlaUnTI(GlaUnTI):
    """The previous year step: the corrected run differentiates every grid cell."""

    def year_step(self, arrays, k, state, *, series=False, spinup=False, custom_vjp=False):
        valid = arrays.day_valid[k]
        base = jax.lax.stop_gradient(self.ti).constrained()

        def run(corrections, swe, days):
            params, shift = apply_corrections(base, corrections)
            return scan_block(ti_step(params, shift, custom_vjp), swe, arrays, k, days,
                              jnp.zeros_like(valid), series)

        def half(swe, s):  # spin-up: each half's corrections from its own initial SWE
            def compute(swe):
                corrections = self.corrections_at(arrays, k, swe, custom_vjp)
                swe, acc, out = run(corrections, swe, valid & (arrays.day_season[k] == s))
                return swe, (acc, corrections, out)

            def skip(swe):
                out = jax.eval_shape(compute, swe)[1]
                return swe, jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), out)

            return jax.lax.cond((s == 0) | arrays.seasonal[k], compute, skip, swe)

        if not spinup:
            corrections = self.corrections_at(arrays, k, state, custom_vjp)
            state, acc, out = run(corrections, state, valid)
            return state, acc, corrections, out
        swe, (accs, corrections, outs) = jax.lax.scan(half, state, jnp.arange(2))
        return swe, accs[0] + accs[1], corrections[0], None if outs is None else outs[0] + outs[1]


def as_reference(model: GlaUnTI) -> WholeGridGlaUnTI:
    return WholeGridGlaUnTI(model.ti, model.corrector)


# The training glacier of the tiny dataset (9×13, spin-up and study years, stakes, off-glacier
# cells). C and D share every compiled function below (same shapes, other values).
GLACIER = "Synthgletscher"


@pytest.fixture(scope="module", params=["c", "d"])
def variant(request, tiny_reference_dataset):
    """(published model, the glacier's training-layout arrays)."""
    name = request.param
    model = load_model(name, published_params_path(name))
    return model, make_arrays(tiny_reference_dataset.glacier(GLACIER), uses_facies(name), layout="padded")


@eqx.filter_jit
def run(model, arrays, custom_vjp):
    return run_glacier(model, arrays, custom_vjp=custom_vjp)


@eqx.filter_jit
def _loss_and_grad(trainable, static, arrays):
    def loss(trainable):
        return glacier_loss(eqx.combine(trainable, static), arrays, custom_vjp=True)

    return jax.value_and_grad(loss, has_aux=True)(trainable)


def loss_and_grad(model, arrays):
    (value, terms), grad = _loss_and_grad(*eqx.partition(model, model.trainable_filter()), arrays)
    return value, terms, jax.tree_util.tree_leaves(grad)


def assert_bit_identical(new, old):
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def assert_gradients_close(new, old, rtol=GRAD_RTOL):
    scale = max(float(jnp.max(jnp.abs(g))) for g in old)
    worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(new, old, strict=True)) / scale
    assert worst <= rtol, f"largest gradient difference {worst:.2e} of the largest gradient"


@pytest.mark.parametrize("custom_vjp", [True, False], ids=["training", "inference"])
def test_forward_is_bit_identical(variant, custom_vjp):
    """SMB of every cell, corrections and final SWE as the whole-grid run computes them."""
    model, arrays = variant
    assert_bit_identical(run(model, arrays, custom_vjp), run(as_reference(model), arrays, custom_vjp))


def test_loss_identical_and_gradient_equal_to_rounding(variant):
    model, arrays = variant
    value, terms, grad = loss_and_grad(model, arrays)
    ref_value, ref_terms, ref_grad = loss_and_grad(as_reference(model), arrays)
    assert float(value) == float(ref_value)
    assert {k: float(v) for k, v in terms.items()} == {k: float(v) for k, v in ref_terms.items()}
    assert_gradients_close(grad, ref_grad)


@eqx.filter_jit
def walked_loss(model, arrays, policy):
    """A glacier-wide loss through every year, each year rematerialised under ``policy``."""
    trainable, static = eqx.partition(model, model.trainable_filter())

    def loss(trainable):
        m = eqx.combine(trainable, static)

        def years(state, ks, spinup):
            def body(state, k):
                with published_precision():
                    state, acc, corrections, _ = m.year_step(arrays, k, state, spinup=spinup,
                                                             custom_vjp=True)
                outline = arrays.outlines[k]
                return state, jnp.sum((acc[0] + acc[1]) * outline) + jnp.sum(corrections**2 * outline)

            return jax.lax.scan(jax.checkpoint(body, policy=policy), state, ks)

        state, spin = years(m.initial_state(arrays.shape), jnp.arange(arrays.n_spinup), True)
        _, study = years(state, jnp.arange(arrays.n_spinup, arrays.n_years), False)
        return jnp.sum(spin) + jnp.sum(study)

    value, grad = jax.value_and_grad(loss)(trainable)
    return value, jax.tree_util.tree_leaves(grad)


def test_channels_kept_as_residuals_give_the_same_gradient(variant):
    """The year rematerialised with the model's policy (channels kept) against the previous
    formulation with nothing recomputed."""
    model, arrays = variant
    value, grad = walked_loss(model, arrays, GlaUnTI.year_remat_policy)
    ref_value, ref_grad = walked_loss(as_reference(model), arrays, jax.checkpoint_policies.everything_saveable)
    # Compiled to keep everything, C's forward itself moves by 8e-7 (relative) on this glacier.
    np.testing.assert_allclose(float(value), float(ref_value), rtol=2e-6)
    assert_gradients_close(grad, ref_grad, REMAT_RTOL)


def test_off_loss_cells_get_no_gradient(variant):
    """The loss cells are all the corrected run differentiates: a loss on an off-glacier cell
    has no gradient through the run (only its SWE, which does not move the corrector)."""
    model, arrays = variant
    off = np.setdiff1d(np.arange(arrays.shape[0] * arrays.shape[1]), np.asarray(arrays.loss_cells))
    assert off.size, "the tiny glacier should have off-glacier cells"
    trainable, static = eqx.partition(model, model.trainable_filter())

    def smb_off(trainable):
        run = run_glacier(eqx.combine(trainable, static), arrays, custom_vjp=True)
        return jnp.sum(run.season_smb.reshape(run.season_smb.shape[:2] + (-1,))[..., off])

    grad = eqx.filter_jit(jax.grad(smb_off))(trainable)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree_util.tree_leaves(grad))
