"""Aleatoric uncertainty: weekly forcing errors through the cumulative glacier-wide SMB.

How uncertain is the cumulative glacier-wide SMB, day by day, given weekly errors of the
reanalysis temperature (additive) and precipitation (multiplicative)? First order by forward-mode
derivatives (:func:`forcing_uncertainty_jvp`), checked by Monte Carlo (:func:`forcing_uncertainty_mc`).
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from glaunti.analysis.common import Period, daily_smb, period_window, perturb_climate, state_at
from glaunti.layouts import GlacierArrays

# Weekly-block forcing errors of the reanalysis: additive temperature error (°C) and
# multiplicative precipitation error, as the standard deviation of log(P_true / P).
SIGMA_TEMPERATURE = 1.589
SIGMA_LOG_PRECIPITATION = 0.964
BLOCK_DAYS = 7


def propagate_variance(fn, n_blocks: int, sigma_t: float, sigma_p: float, chunk: int = 16):
    """First-order variance of ``fn(eps_t (B,), eps_p (B,)) -> (n,)`` for independent errors
    ``eps_t ~ N(0, sigma_t²)``, ``eps_p ~ N(0, sigma_p²)`` per block:

        Var ≈ Σ_b (σ_t ∂fn/∂eps_t,b)² + Σ_b (σ_p ∂fn/∂eps_p,b)²,

    one forward-mode JVP per (variable, block) with a σ-scaled one-hot tangent, ``chunk`` JVPs at
    a time (vmap) and their squares summed as they come (scan). Exact for linear ``fn``.

    Returns (fn(0, 0) (n,), temperature part of the variance (n,), precipitation part (n,)).
    """
    zeros = jnp.zeros(n_blocks, jnp.float32)
    n_tangents = 2 * n_blocks
    # Tangent i < B perturbs temperature block i, B ≤ i < 2B precipitation block i − B; the padding
    # indices ≥ 2B give zero tangents (one_hot of an out-of-range index is all zeros).
    ids = jnp.arange(n_tangents + (-n_tangents) % chunk).reshape(-1, chunk)

    def response(i):
        tangent_t = sigma_t * jax.nn.one_hot(i, n_blocks, dtype=jnp.float32)
        tangent_p = sigma_p * jax.nn.one_hot(i - n_blocks, n_blocks, dtype=jnp.float32)
        return jax.jvp(fn, (zeros, zeros), (tangent_t, tangent_p))[1]

    def body(variance, i):
        squared = jax.vmap(response)(i) ** 2  # (chunk, n)
        is_t = (i < n_blocks)[:, None]
        return (variance[0] + jnp.sum(jnp.where(is_t, squared, 0.0), axis=0),
                variance[1] + jnp.sum(jnp.where(is_t, 0.0, squared), axis=0)), None

    mean = fn(zeros, zeros)
    (var_t, var_p), _ = jax.lax.scan(body, (jnp.zeros_like(mean), jnp.zeros_like(mean)), ids)
    return mean, var_t, var_p


def _blocks(period: Period, block_days: int):
    """(n_run,) weekly block of each run day (−1 outside the reported days) and the block count."""
    offset = period.run_days() - period.first_day
    block = np.where((offset >= 0) & (offset < period.n_days), offset // block_days, -1)
    return jnp.asarray(block, jnp.int32), -(-period.n_days // block_days)


def _cumulative_smb(model, arrays, period: Period, state, block, eps_t, eps_p):
    """Cumulative glacier-wide SMB (n_days,) with block errors eps_t, eps_p (B,) on the period's days."""
    inside = block >= 0
    per_day_t = jnp.where(inside, eps_t[jnp.maximum(block, 0)], 0.0)
    per_day_p = jnp.where(inside, eps_p[jnp.maximum(block, 0)], 0.0)
    window = perturb_climate(period_window(arrays, period), per_day_t, per_day_p)
    return jnp.cumsum(daily_smb(model, window, period, state))


class Uncertainty(NamedTuple):
    dates: np.ndarray  # (n,) datetime64[D]
    mean: np.ndarray  # (n,) cumulative glacier-wide SMB, m w.e. (JVP: the unperturbed run)
    std: np.ndarray  # (n,) its standard deviation, m w.e.
    std_temperature: np.ndarray | None  # (n,) JVP: the part due to temperature errors alone
    std_precipitation: np.ndarray | None  # (n,) JVP: the part due to precipitation errors alone
    members: np.ndarray | None  # (n_members, n) Monte Carlo members


@eqx.filter_jit
def _jvp_uncertainty(model, arrays, period: Period, block_days: int, sigma_t: float, sigma_p: float, chunk: int):
    state = state_at(model, arrays, period.first_year)
    block, n_blocks = _blocks(period, block_days)

    def fn(eps_t, eps_p):
        return _cumulative_smb(model, arrays, period, state, block, eps_t, eps_p)

    return propagate_variance(fn, n_blocks, sigma_t, sigma_p, chunk)


def forcing_uncertainty_jvp(model, arrays: GlacierArrays, period: Period, sigma_t: float = SIGMA_TEMPERATURE,
                            sigma_p: float = SIGMA_LOG_PRECIPITATION, block_days: int = BLOCK_DAYS,
                            chunk: int = 16) -> Uncertainty:
    """First-order (linearised) spread of the cumulative glacier-wide SMB over ``period`` under
    weekly-block forcing errors: ``T + eps_t`` and ``P · exp(eps_p)``, independent between blocks
    and uniform over the glacier. See :func:`propagate_variance`."""
    mean, var_t, var_p = _jvp_uncertainty(model, arrays, period, int(block_days), float(sigma_t),
                                          float(sigma_p), int(chunk))
    var_t, var_p = np.asarray(var_t, np.float64), np.asarray(var_p, np.float64)
    return Uncertainty(period.dates(), np.asarray(mean), np.sqrt(var_t + var_p), np.sqrt(var_t), np.sqrt(var_p), None)


@eqx.filter_jit
def _monte_carlo(model, arrays, period: Period, block_days: int, sigma_t: float, sigma_p: float, keys):
    state = state_at(model, arrays, period.first_year)
    block, n_blocks = _blocks(period, block_days)

    def member(key):
        key_t, key_p = jax.random.split(key)
        eps_t = sigma_t * jax.random.normal(key_t, (n_blocks,), jnp.float32)
        eps_p = sigma_p * jax.random.normal(key_p, (n_blocks,), jnp.float32)
        return _cumulative_smb(model, arrays, period, state, block, eps_t, eps_p)

    _, members = jax.lax.scan(lambda _, k: (None, jax.vmap(member)(k)), None, keys)
    return members.reshape(-1, members.shape[-1])


def forcing_uncertainty_mc(model, arrays: GlacierArrays, period: Period, n_members: int = 100, seed: int = 0,
                           sigma_t: float = SIGMA_TEMPERATURE, sigma_p: float = SIGMA_LOG_PRECIPITATION,
                           block_days: int = BLOCK_DAYS, chunk: int = 16) -> Uncertainty:
    """Monte-Carlo ensemble of ``n_members`` runs with the same weekly-block errors as
    :func:`forcing_uncertainty_jvp`, ``chunk`` members at a time; the reference the first-order
    spread is checked against. Mean and standard deviation (ddof 1) over the members."""
    n_chunks = -(-n_members // chunk)
    keys = jax.random.split(jax.random.PRNGKey(seed), n_chunks * chunk).reshape(n_chunks, chunk, -1)
    members = np.asarray(_monte_carlo(model, arrays, period, int(block_days), float(sigma_t),
                                      float(sigma_p), keys))[:n_members]
    return Uncertainty(period.dates(), members.mean(axis=0), members.std(axis=0, ddof=1), None, None, members)
