"""Model B: the data-driven per-cell GRU baseline (MODEL.md §3).

Shapes: T = days, H×W = grid, N = H·W cells, 16 = hidden size.

The cell follows ``equinox.nn.GRUCell`` exactly (same leaves, same gate order and bias
placement), but one day is computed for all N cells at once with two (N, ·) @ (·, 48)
matmuls instead of a vmap of N tiny matvecs.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray

import constants
from glaunti.ti_model import default_weights

HIDDEN_SIZE = 16
N_INPUTS = 2  # [P / p_monthly_norm, T / t_monthly_norm]
INIT_H_SCALE = 0.01  # standard deviation of the initial learned state


def gru_cells_step(cell: eqx.nn.GRUCell, x: Float[Array, "N 2"], h: Float[Array, "N 16"]):
    """``eqx.nn.GRUCell.__call__`` batched over the leading axis of ``x`` and ``h``."""
    gi = x @ cell.weight_ih.T + cell.bias
    gh = h @ cell.weight_hh.T
    i_r, i_z, i_n = jnp.split(gi, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(gh, 3, axis=-1)
    reset = jax.nn.sigmoid(i_r + h_r)
    update = jax.nn.sigmoid(i_z + h_z)
    new = jnp.tanh(i_n + reset * (h_n + cell.bias_n))
    return new + update * (h - new)


def gru_day_step(model: "GRUModel", h: Float[Array, "N 16"], x: Float[Array, "N 2"], weight, skip):
    """One GRU day for all cells → (h (N, 16), smb (N,)); a skipped day keeps ``h`` but still
    outputs ``weight · Linear(h)`` (the continuation rule)."""
    h = jnp.where(skip, h, gru_cells_step(model.rnn, x, h))
    return h, weight * (h @ model.out.weight.T + model.out.bias)[:, 0]


def gru_inputs(temperature, precipitation) -> Float[Array, "... 2"]:
    """Per-day GRU input ``[P / p_norm, T / t_norm]`` stacked on the last axis."""
    return jnp.stack(
        [precipitation / constants.p_monthly_norm, temperature / constants.t_monthly_norm],
        axis=-1,
    )


class GRUModel(eqx.Module):
    """Per-cell GRU (hidden 16) + linear read-out + learned initial state."""

    rnn: eqx.nn.GRUCell
    out: eqx.nn.Linear
    init_h: Float[Array, " 16"]

    def __init__(self, key: PRNGKeyArray | None = None, hidden_size: int = HIDDEN_SIZE):
        """Random Equinox-default initialisation of the cell and read-out (``key`` defaults
        to PRNGKey(0)); the learned initial state starts as ``INIT_H_SCALE`` · N(0, 1).

        Keys and scale are the authors': the same key gives their initial parameters."""
        key = jr.PRNGKey(0) if key is None else key
        k_rnn, k_out, k_h = jr.split(key, 3)
        self.rnn = eqx.nn.GRUCell(N_INPUTS, hidden_size, key=k_rnn)
        self.out = eqx.nn.Linear(hidden_size, 1, key=k_out)
        self.init_h = INIT_H_SCALE * jr.normal(k_h, (hidden_size,), jnp.float32)

    def run(
        self,
        temperature: Float[Array, "T H W"],
        precipitation: Float[Array, "T H W"],
        initial_h: Float[Array, "H W 16"] | None = None,
        weights: Float[Array, " T"] | None = None,
        valid: Bool[Array, " T"] | None = None,
        skip_update: Bool[Array, " T"] | None = None,
        return_series: bool = False,
    ):
        """Run one period; returns (smb, h).

        Args:
            temperature, precipitation: (T, H, W).
            initial_h: (H, W, 16) state carried from the previous period; None = the
                learned ``init_h`` in every cell.
            weights: (T,) day weights; None = 1 with ½ on the first/last (valid) day.
            valid: (T,) bool; False (padding) days change nothing and output 0.
            skip_update: (T,) bool; True days keep the state but still output
                ``w·Linear(h)``. None = skip the first (valid) day iff ``initial_h`` is
                given (continuation rule: that day was consumed by the previous period).
            return_series: False = accumulated (H, W); True = daily (T, H, W).

        Returns:
            (smb (H, W) or (T, H, W), final h (H, W, 16)).
        """
        temperature = jnp.asarray(temperature, jnp.float32)
        precipitation = jnp.asarray(precipitation, jnp.float32)
        n_days, height, width = temperature.shape
        hidden = self.init_h.shape[0]
        if weights is None:
            weights = default_weights(n_days, valid)
        weights = jnp.asarray(weights, jnp.float32)
        if initial_h is None:
            h0 = jnp.broadcast_to(self.init_h, (height * width, hidden))
        else:
            h0 = jnp.asarray(initial_h, jnp.float32).reshape(height * width, hidden)
        valid = jnp.ones((n_days,), bool) if valid is None else jnp.asarray(valid, bool)
        if skip_update is None:
            if initial_h is None:
                skip_update = jnp.zeros((n_days,), bool)
            else:  # the first valid day
                skip_update = jnp.arange(n_days) == jnp.argmax(valid)
        skip_update = jnp.asarray(skip_update, bool)

        # Cells flattened to N so that each day is two matmuls.
        xs = (
            gru_inputs(temperature, precipitation).reshape(n_days, height * width, N_INPUTS),
            weights,
            skip_update,
            valid,
        )

        @jax.checkpoint
        def day(h, x):
            x_day, w, skip, ok = x
            h_new, smb_day = gru_day_step(self, h, x_day, w, skip | ~ok)
            return h_new, jnp.where(ok, smb_day, 0.0)

        if return_series:
            h, series = jax.lax.scan(day, h0, xs)
            return series.reshape(n_days, height, width), h.reshape(height, width, hidden)

        def step_acc(carry, x):
            h, acc = carry
            h, smb_day = day(h, x)
            return (h, acc + smb_day), None

        (h, acc), _ = jax.lax.scan(step_acc, (h0, jnp.zeros((height * width,), jnp.float32)), xs)
        return acc.reshape(height, width), h.reshape(height, width, hidden)


def trainable_filter(model: GRUModel):
    """Equinox filter spec: every array leaf of the GRU is trained."""
    return jax.tree_util.tree_map(eqx.is_inexact_array, model)
