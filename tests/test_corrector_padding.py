"""The corrector on a padded grid (``grid_size``) equals the corrector on the true grid.

Published weights of model C, random fields and climate. Every true size below is padded at the
bottom/right into one 32×32 bucket whose padded cells hold large junk; the padded call must
give the unpadded corrections on the true block, exactly 0 elsewhere, the same parameter
gradient, and be compiled once for all of them.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import PUBLISHED
from core.models import load_model
from glaunti.corrector import N_FIELDS, N_OUT, bilinear_weights, resize_bilinear_padded

BUCKET = (32, 32)
# True sizes: both directions padded, odd sizes (the pools drop a row/column at some level),
# the smallest grid, padded in one direction only, not padded at all.
SIZES = [(16, 24), (24, 16), (24, 24), (17, 23), (31, 9), (8, 8), (32, 20), (32, 32)]
N_MONTHS = 13
# Float32 rounding, relative to the largest |value|: the RMS norms sum x² over the true cells
# in another order than over the unpadded grid, and the deepest levels normalise a few cells,
# which amplifies that. Measured: forward up to 4e-6 (the unpadded call jitted vs run op by op
# differs by 2e-6 on the 31×9 grid); parameter gradients up to 3e-5 here, 4e-4 on an 8×8 grid,
# where the unpadded float32 gradient is itself 1.5e-4 from float64 and the padded and unpadded
# float64 gradients agree to 4e-13.
FORWARD_RTOL = 1e-5
GRADIENT_RTOL = 1e-4


@pytest.fixture(scope="module")
def corrector():
    return load_model("c", PUBLISHED / "c.eqx").corrector


@pytest.fixture(scope="module")
def inputs():
    """Fields (15, 32, 32) of order 1 and a zero-padded monthly climate (2, 14)."""
    rng = np.random.default_rng(14)
    fields = rng.normal(size=(N_FIELDS,) + BUCKET).astype(np.float32)
    climate = np.zeros((2, 14), np.float32)
    climate[:, :N_MONTHS] = rng.normal(size=(2, N_MONTHS))
    return fields, jnp.asarray(climate)


def padded(fields, size, junk):
    """The true top-left block of ``fields`` with ``junk`` in every padded cell."""
    height, width = size
    out = np.full_like(fields, junk)
    out[:, :height, :width] = fields[:, :height, :width]
    return jnp.asarray(out)


def relative_error(actual, wanted):
    return float(np.max(np.abs(np.asarray(actual) - np.asarray(wanted))) / np.max(np.abs(wanted)))


@pytest.fixture(scope="module")
def padded_call(corrector, inputs):
    """One jitted padded corrector and the number of times it was traced."""
    _, climate = inputs
    traces = []

    @jax.jit
    def run(fields, grid_size):
        traces.append(grid_size.shape)
        return corrector(fields, climate, N_MONTHS, grid_size=grid_size)

    return run, traces


def unpadded(corrector, climate, fields):
    return jax.jit(lambda f: corrector(f, climate, N_MONTHS))(fields)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward_equals_unpadded_and_zero_outside(corrector, inputs, padded_call, size):
    fields, climate = inputs
    run, _ = padded_call
    height, width = size
    wanted = unpadded(corrector, climate, jnp.asarray(fields[:, :height, :width]))
    out = np.asarray(run(padded(fields, size, 1e3), jnp.array(size)))
    assert out.shape == (N_OUT,) + BUCKET
    assert relative_error(out[:, :height, :width], wanted) < FORWARD_RTOL
    outside = np.ones(BUCKET, bool)
    outside[:height, :width] = False
    assert np.all(out[:, outside] == 0.0)
    # The padded cells influence nothing: other junk, the same bits.
    other = np.asarray(run(padded(fields, size, -7.5), jnp.array(size)))
    np.testing.assert_array_equal(other, out)


def test_one_compile_serves_every_size(inputs, padded_call):
    fields, _ = inputs
    run, traces = padded_call
    for size in SIZES:
        run(padded(fields, size, 0.0), jnp.array(size)).block_until_ready()
    assert len(traces) == 1


def test_parameter_gradient_equals_unpadded(corrector, inputs):
    """d(loss on the true block)/d(corrector parameters), and nothing reaches the padded cells."""
    fields, climate = inputs
    rng = np.random.default_rng(3)

    @eqx.filter_jit
    @eqx.filter_grad
    def grad_padded(model_and_fields, target, grid_size):
        model, fields_in = model_and_fields
        return jnp.sum(model(fields_in, climate, N_MONTHS, grid_size=grid_size) * target)

    @eqx.filter_jit
    @eqx.filter_grad
    def grad_unpadded(model, fields_in, target):
        return jnp.sum(model(fields_in, climate, N_MONTHS) * target)

    for size in [(17, 23), (31, 9), (32, 20)]:
        height, width = size
        target = rng.normal(size=(N_OUT, height, width)).astype(np.float32)
        target_padded = np.zeros((N_OUT,) + BUCKET, np.float32)
        target_padded[:, :height, :width] = target
        got, field_grad = grad_padded(
            (corrector, padded(fields, size, 1e3)), target_padded, jnp.array(size)
        )
        wanted = grad_unpadded(corrector, jnp.asarray(fields[:, :height, :width]), target)
        got_leaves = jax.tree_util.tree_leaves(eqx.filter(got, eqx.is_array))
        wanted_leaves = jax.tree_util.tree_leaves(eqx.filter(wanted, eqx.is_array))
        assert len(got_leaves) == len(wanted_leaves) > 0
        for g, w in zip(got_leaves, wanted_leaves):
            assert relative_error(g, w) < GRADIENT_RTOL
        assert np.all(np.asarray(field_grad)[:, height:, :] == 0.0)
        assert np.all(np.asarray(field_grad)[:, :, width:] == 0.0)


def test_vmap_over_glaciers_of_different_sizes(corrector, inputs):
    fields, climate = inputs
    sizes = [(16, 24), (31, 9), (32, 32)]
    batch = jnp.stack([padded(np.roll(fields, i, axis=0), s, 1e3) for i, s in enumerate(sizes)])
    out = jax.jit(
        jax.vmap(lambda f, g: corrector(f, climate, N_MONTHS, grid_size=g))
    )(batch, jnp.array(sizes))
    for i, (height, width) in enumerate(sizes):
        wanted = unpadded(corrector, climate, jnp.asarray(np.roll(fields, i, axis=0)[:, :height, :width]))
        assert relative_error(out[i, :, :height, :width], wanted) < FORWARD_RTOL
        assert np.all(np.asarray(out[i, :, height:, :]) == 0.0)
        assert np.all(np.asarray(out[i, :, :, width:]) == 0.0)


@pytest.mark.parametrize("size", [(10, 20), (17, 23), (31, 9), (47, 64), (8, 64)])
def test_resize_equals_jax_image_resize(size):
    """The padded resize against jax.image.resize of the true block, to float32 rounding."""
    height, width = size
    small = (height // 8, width // 8)
    shape = (48, 64)
    rng = np.random.default_rng(height * 100 + width)
    x = rng.normal(size=(N_OUT, shape[0] // 8, shape[1] // 8)).astype(np.float32)
    x[:, small[0]:, :] = 0.0
    x[:, :, small[1]:] = 0.0
    out = np.asarray(resize_bilinear_padded(jnp.asarray(x), jnp.array(small), jnp.array(size), shape))
    wanted = jax.image.resize(x[:, : small[0], : small[1]], (N_OUT, height, width), "bilinear",
                              antialias=False)
    assert np.max(np.abs(out[:, :height, :width] - wanted)) < 4 * np.finfo(np.float32).eps * np.abs(x).max()
    assert not out[:, height:, :].any() and not out[:, :, width:].any()


def test_bilinear_weights_scale_is_jaxs():
    """jax rounds 1/(H/h) from float64 to float32; the traced weights compute h/H in float32."""
    big = np.arange(8, 2**16, dtype=np.int64)
    small = big // 8
    np.testing.assert_array_equal(
        np.float32(small) / np.float32(big), (1.0 / (big / small)).astype(np.float32)
    )
    big, small = np.meshgrid(np.arange(1, 1025), np.arange(1, 1025))
    keep = small <= big
    np.testing.assert_array_equal(
        (np.float32(small) / np.float32(big))[keep], (1.0 / (big / small)).astype(np.float32)[keep]
    )
    # Interpolating weights of a 2 → 17 upsampling: columns sum to 1, nothing beyond the sizes.
    weights = np.asarray(bilinear_weights(jnp.int32(2), jnp.int32(17), 4, 24))
    np.testing.assert_allclose(weights[:2, :17].sum(axis=0), 1.0, rtol=1e-6)
    assert not weights[2:].any() and not weights[:, 17:].any()


@pytest.mark.parametrize(
    "grid_size, message",
    [
        (np.array([7, 20]), "at least 8×8"),
        (np.array([20, 33]), "exceeds the padded corrector grid 32×32"),
        (np.array([20, 20, 1]), r"integer array \(2,\)"),
        (np.array([20.0, 20.0]), r"integer array \(2,\)"),
    ],
)
def test_bad_grid_size_is_refused(corrector, inputs, grid_size, message):
    fields, climate = inputs
    with pytest.raises(ValueError, match=message):
        corrector(jnp.asarray(fields), climate, N_MONTHS, grid_size=grid_size)
