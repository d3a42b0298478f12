"""Model B: the data-driven per-cell GRU baseline (docs/model.md §3).

Shapes: T = days, H×W = grid, N = H·W cells, 16 = hidden size.

The cell follows ``equinox.nn.GRUCell`` exactly (same leaves, same gate order and bias
placement), but one day is computed for all N cells at once with two (N, ·) @ (·, 48)
matmuls instead of a vmap of N tiny matvecs.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray

import constants
from glaunti.glacier import at_published_precision, fields_forcing, period_days, scan_block, scan_days
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

    kind: ClassVar[str] = "B"
    TERMS: ClassVar[tuple[str, ...]] = ()  # no TI step, so no snowfall / rainfall / melt
    cell_independent: ClassVar[bool] = True
    state_cell_axis: ClassVar[int] = 0  # hidden state (N, 16), cells flattened

    def __init__(self, key: PRNGKeyArray | None = None, hidden_size: int = HIDDEN_SIZE):
        """Random Equinox-default initialisation of the cell and read-out (``key`` defaults
        to PRNGKey(0)); the learned initial state starts as ``INIT_H_SCALE`` · N(0, 1).

        Keys and scale are the authors': the same key gives their initial parameters."""
        key = jr.PRNGKey(0) if key is None else key
        k_rnn, k_out, k_h = jr.split(key, 3)
        self.rnn = eqx.nn.GRUCell(N_INPUTS, hidden_size, key=k_rnn)
        self.out = eqx.nn.Linear(hidden_size, 1, key=k_out)
        self.init_h = INIT_H_SCALE * jr.normal(k_h, (hidden_size,), jnp.float32)

    @at_published_precision
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
        """Run one period with the engine's day scan; returns (smb, h).

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
        if initial_h is None:
            h0 = self.initial_state((height, width))
        else:
            h0 = jnp.asarray(initial_h, jnp.float32).reshape(height * width, hidden)
        if skip_update is None and initial_h is not None:
            first = 0 if valid is None else jnp.argmax(jnp.asarray(valid, bool))
            skip_update = jnp.arange(n_days) == first
        days = period_days(temperature, precipitation, weights, valid, skip_update)
        h, acc, series = scan_days(self.day_step, h0, days, fields_forcing, (height, width),
                                   return_series)
        return (series if return_series else acc[0]), h.reshape(height, width, hidden)

    # -- the engine's model interface -------------------------------------------------------
    def initial_state(self, shape) -> Float[Array, "N 16"]:
        """The learned initial state in every cell, cells flattened (N = H·W)."""
        height, width = shape
        return jnp.broadcast_to(self.init_h, (height * width,) + self.init_h.shape)

    def day_step(self, h, temperature, precipitation, weight, skip):
        """One day of every cell: h (N, 16), T and P (H, W) → (h, smb (H, W))."""
        x = gru_inputs(temperature, precipitation).reshape(-1, N_INPUTS)
        h, smb = gru_day_step(self, h, x, weight, skip)
        return h, smb.reshape(temperature.shape)

    def year_step(self, arrays, k, state, *, series=False, spinup=False, custom_vjp=False):
        """Balance year k of a glacier (``glaunti.glacier.year_step``); no corrections."""
        del spinup, custom_vjp  # the same in every year; no hand-written derivative
        # Continuation rule: the first day of a period continued from a previous state does not
        # update it; only the very first period of the run starts from the learned state.
        skip = arrays.day_period_start[k] & ((k > 0) | (arrays.day_season[k] == 1))
        state, acc, out = scan_block(self.day_step, state, arrays, k, arrays.day_valid[k], skip, series)
        return state, acc, None, out

    def trainable_filter(self):
        """Equinox filter spec: every array leaf of the GRU is trained."""
        return jax.tree_util.tree_map(eqx.is_inexact_array, self)

    def regularisers(self, run, arrays):
        """No regulariser: (no terms, no penalties)."""
        del run, arrays
        return {}, []

    def authors_tree(self):
        """The authors' parameter tree: ({'gru': <rnn, out, init_h>}, {})."""
        return ({"gru": self}, {})

    def from_authors_tree(self, tree) -> GRUModel:
        return tree[0]["gru"]
