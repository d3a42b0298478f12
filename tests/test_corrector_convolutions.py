"""The corrector's convolutions in the training loss (``channels_last=True``, ``glaunti.corrector.conv``).

Inside a loop XLA's CPU backend computes a channels-first convolution (and the convolutions
autodiff derives from it) with a fallback loop nest whose float32 sums differ from the Eigen
convolution it uses at a jitted function's top level, where the published code calls the
corrector. Written channels-last with a hand-written derivative, value and gradients inside a
scan must be the top-level ones bit for bit.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from core.models import load_model, published_params_path
from glaunti.corrector import Corrector, conv
from glaunti.glacier import published_precision

# (spatial dims, in, out, kernel, bias, input shape without channels): every kind the corrector has.
CONVS = {
    "2d 3x3": (2, 32, 32, 3, False, (13, 22)),
    "2d 1x1 in": (2, 15, 32, 1, False, (13, 22)),
    "2d 1x1 out": (2, 32, 5, 1, True, (6, 7)),
    "1d width 3": (1, 8, 8, 3, False, (13,)),
    "1d width 1": (1, 2, 8, 1, False, (14,)),
}


def _in_scan(fn):
    """``fn(*args)`` evaluated in the body of a two-step scan (the training loss's context)."""
    def scanned(*args):
        def body(carry, _):
            return carry, fn(*args)
        return jax.tree_util.tree_map(lambda a: a[0], jax.lax.scan(body, 0, None, length=2)[1])
    return scanned


def _assert_same(new, old):
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kind", list(CONVS))
def test_convolution_in_a_loop_is_the_top_level_one(kind):
    dims, c_in, c_out, kernel, bias, shape = CONVS[kind]
    k1, k2, k3 = jr.split(jr.PRNGKey(3), 3)
    module = eqx.nn.Conv(dims, c_in, c_out, kernel, padding="SAME", use_bias=bias, key=k1)
    module = eqx.tree_at(lambda m: m.weight, module, jr.normal(k2, module.weight.shape))
    x = jr.normal(k3, (c_in,) + shape)

    def value_and_grads(canonical):
        def loss(module, x):
            with published_precision():
                return jnp.sum(jnp.sin(conv(module, x, channels_last=canonical)))
        return jax.value_and_grad(loss, argnums=(0, 1))(module, x)

    top_level = jax.jit(lambda: value_and_grads(False))()
    _assert_same(jax.jit(_in_scan(lambda: value_and_grads(True)))(), top_level)


@pytest.fixture(scope="module")
def corrector_inputs():
    model = load_model("c", published_params_path("c"))
    k1, k2 = jr.split(jr.PRNGKey(7))
    fields = jr.normal(k1, (15, 24, 32))
    climate = jnp.pad(jr.normal(k2, (2, 13)), ((0, 0), (0, 1)))
    return model.corrector, fields, climate


@pytest.mark.parametrize("padded", [False, True], ids=["exact grid", "padded grid"])
def test_corrector_in_a_loop_is_the_top_level_one(corrector_inputs, padded):
    """The whole corrector: corrections and their gradient with respect to every parameter."""
    corrector, fields, climate = corrector_inputs
    grid_size = np.array([20, 27]) if padded else None

    def value_and_grad(corrector, fields, climate, canonical):
        def loss(corrector: Corrector):
            with published_precision():
                return jnp.sum(corrector(fields, climate, 13, grid_size=grid_size, channels_last=canonical) ** 2)
        return eqx.filter_value_and_grad(loss)(corrector)

    # Inputs as arguments, as in training (a constant operand lets XLA rewrite a convolution).
    top_level = eqx.filter_jit(lambda *a: value_and_grad(*a, False))(corrector, fields, climate)
    in_loop = eqx.filter_jit(_in_scan(lambda *a: value_and_grad(*a, True)))(corrector, fields, climate)
    _assert_same(in_loop, top_level)


def test_plain_convolutions_keep_forward_mode(corrector_inputs):
    """By default the corrector is plain JAX: forward-mode derivatives work (the analysis
    code's ``jax.jvp``); channels-last they are refused, as for any custom VJP."""
    corrector, fields, climate = corrector_inputs

    def corrections(fields, channels_last=False):
        with published_precision():
            return corrector(fields, climate, 13, channels_last=channels_last)

    _, tangent = jax.jvp(corrections, (fields,), (jnp.ones_like(fields),))
    assert np.isfinite(np.asarray(tangent)).all()
    with pytest.raises(TypeError):
        jax.jvp(lambda f: corrections(f, True), (fields,), (jnp.ones_like(fields),))
