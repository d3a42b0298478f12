"""Model A: the differentiable temperature-index (TI) model (MODEL.md §1–2).

Shapes: T = days of one period (or one day block), H×W = grid.

The arithmetic of :func:`ti_day_step` follows the published implementation operation by
operation (same grouping of products and sums, float32 throughout): with that order a run
reproduces the golden fixtures to the last bit or within a few ulps. Do not "simplify" it.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

# Stored (unconstrained) parameter names in MODEL.md §2 table order.
PARAM_NAMES: tuple[str, ...] = (
    "prec_scale_log",
    "ddf_snow_log",
    "ddf_relative_ice_minus_one_log",
    "snow_to_rain_steepness_log",
    "snow_to_rain_centre",
    "snow_depletion_steepness_log",
    "snow_depletion_centre_log",
    "t_softplus_sharpness_log",
    "swe_softplus_sharpness_log",
)
# The seven calibrated ones; the two softplus sharpnesses stay fixed at their priors.
CALIBRATED: tuple[str, ...] = PARAM_NAMES[:7]
FIXED: tuple[str, ...] = PARAM_NAMES[7:]

# Priors in constrained space (MODEL.md §2) ...
PRIOR_CONSTRAINED: dict[str, float] = {
    "prec_scale": 1.4,
    "ddf_snow": 0.0049,
    "ddf_relative_ice": 1.5,
    "snow_to_rain_steepness": 1.5,
    "snow_to_rain_centre": 1.0,
    "snow_depletion_steepness": 3.0,
    "snow_depletion_centre": 0.03,
    "t_softplus_sharpness": 10.0,
    "swe_softplus_sharpness": 20.0,
}
# ... and in stored space: log, except ddf_relative_ice (log of its excess over 1) and the
# snow-to-rain centre (a temperature, stored as is). These are the float32 values of the
# published implementation, i.e. float32 logs as XLA evaluates them: for log(1.4) that is
# 0.3364722, one ulp below the correctly rounded 0.33647224. With them, prior_penalty of
# the published model A reproduces the published value to ~1e-9 relative.
PRIOR_STORED: dict[str, np.float32] = {
    "prec_scale_log": np.float32("0.3364722"),  # log 1.4
    "ddf_snow_log": np.float32("-5.31852"),  # log 0.0049
    "ddf_relative_ice_minus_one_log": np.float32("-0.6931472"),  # log (1.5 − 1)
    "snow_to_rain_steepness_log": np.float32("0.4054651"),  # log 1.5
    "snow_to_rain_centre": np.float32("1.0"),
    "snow_depletion_steepness_log": np.float32("1.0986123"),  # log 3
    "snow_depletion_centre_log": np.float32("-3.506558"),  # log 0.03
    "t_softplus_sharpness_log": np.float32("2.3025851"),  # log 10
    "swe_softplus_sharpness_log": np.float32("2.9957323"),  # log 20
}

PRIOR_WEIGHT = 0.1


class TIParams(NamedTuple):
    """Constrained TI parameters. Scalars, or H×W fields once corrections are applied."""

    prec_scale: Array
    ddf_snow: Array
    ddf_relative_ice: Array
    snow_to_rain_steepness: Array
    snow_to_rain_centre: Array
    snow_depletion_steepness: Array
    snow_depletion_centre: Array
    t_softplus_sharpness: Array
    swe_softplus_sharpness: Array


def softplus_t(sharpness, x):
    """Sharpened softplus ``softplus(s·x)/s``, a smooth ``max(x, 0)``."""
    return jax.nn.softplus(sharpness * x) / sharpness


def hill(steepness, centre, x):
    """Hill curve ``x^s / (x^s + c^s)``: 0 at x = 0, ½ at x = c, → 1."""
    xs = x**steepness
    return xs / (xs + centre**steepness)


def ti_day_step(p: TIParams, swe, temperature, precipitation, weight, temperature_shift=None):
    """One day of model A for every cell.

    Args:
        p: constrained parameters (scalars or (H, W) fields).
        swe: (H, W) snow water equivalent before the day (m w.e.).
        temperature, precipitation: (H, W) °C and m w.e./day.
        weight: scalar day weight (½ on period boundaries).
        temperature_shift: optional (H, W) Δ added to T inside T⁺ only (model C/D's d5).

    Returns:
        (swe_new (H, W), smb_day (H, W)).
    """
    solid = precipitation * jax.nn.sigmoid(
        p.snow_to_rain_steepness * (p.snow_to_rain_centre - temperature)
    )
    t_melt = temperature if temperature_shift is None else temperature + temperature_shift
    t_pos = softplus_t(p.t_softplus_sharpness, t_melt)
    f_snow = hill(p.snow_depletion_steepness, p.snow_depletion_centre, swe)
    accumulation = p.prec_scale * solid
    # Melt "potentials" grouped as in the published code: ddf·(f·T⁺) and ri·((1−f)·T⁺).
    snow_melt = f_snow * t_pos
    ice_melt = p.ddf_relative_ice * ((1.0 - f_snow) * t_pos)
    swe_new = softplus_t(
        p.swe_softplus_sharpness, swe + weight * (accumulation - p.ddf_snow * snow_melt)
    )
    smb_day = weight * (accumulation - p.ddf_snow * (snow_melt + ice_melt))
    return swe_new, smb_day


def default_weights(n_days: int, valid=None) -> Float[Array, " T"]:
    """Day weights of one period: 1, with ½ on the first and last (valid) day.

    With ``valid`` (T,) bool, the valid days are taken to be one contiguous run (a period
    followed by padding); padding days get weight 0.
    """
    if valid is None:
        w = jnp.ones((n_days,), jnp.float32)
        return w.at[0].set(0.5).at[-1].set(0.5)
    valid = jnp.asarray(valid, bool)
    idx = jnp.arange(n_days)
    first = jnp.argmax(valid)
    last = n_days - 1 - jnp.argmax(valid[::-1])
    w = jnp.where(valid, 1.0, 0.0).astype(jnp.float32)
    return jnp.where((idx == first) | (idx == last), 0.5 * w, w)


def apply_corrections(p: TIParams, corrections) -> tuple[TIParams, Array]:
    """Apply the corrector's d1..d5 (5, H, W) (MODEL.md §4).

    Returns the per-cell parameters and the temperature shift d5 (inside T⁺ only).
    """
    d1, d2, d3, d4, d5 = corrections
    p = p._replace(
        prec_scale=p.prec_scale * jnp.exp(d1),
        ddf_snow=p.ddf_snow * jnp.exp(d2),
        ddf_relative_ice=p.ddf_relative_ice * jnp.exp(d3),
        snow_to_rain_centre=p.snow_to_rain_centre + d4,
    )
    return p, d5


def run_ti(
    p: TIParams,
    temperature,
    precipitation,
    initial_swe=None,
    weights=None,
    valid=None,
    temperature_shift=None,
    return_series: bool = False,
):
    """Scan :func:`ti_day_step` over a period (pure function behind :meth:`TIModel.run`).

    Args:
        p: constrained parameters (scalars or (H, W) fields).
        temperature, precipitation: (T, H, W).
        initial_swe: (H, W); None = cold start (filled with ``snow_depletion_centre``).
        weights: (T,); None = :func:`default_weights` (respecting ``valid``).
        valid: (T,) bool; False days (padding) leave SWE unchanged and contribute 0.
        temperature_shift: None, scalar or (H, W) Δ inside T⁺.
        return_series: False = accumulated SMB (H, W); True = daily SMB (T, H, W).

    Returns:
        (smb, swe): smb (H, W) or (T, H, W), final swe (H, W).
    """
    temperature = jnp.asarray(temperature, jnp.float32)
    precipitation = jnp.asarray(precipitation, jnp.float32)
    n_days, height, width = temperature.shape
    if weights is None:
        weights = default_weights(n_days, valid)
    weights = jnp.asarray(weights, jnp.float32)
    if initial_swe is None:
        swe0 = jnp.full((height, width), p.snow_depletion_centre, jnp.float32)
    else:
        swe0 = jnp.broadcast_to(jnp.asarray(initial_swe, jnp.float32), (height, width))
    if temperature_shift is not None:
        temperature_shift = jnp.asarray(temperature_shift, jnp.float32)

    xs = (temperature, precipitation, weights)
    if valid is not None:
        xs = xs + (jnp.asarray(valid, bool),)

    # Rematerialise each day in the backward pass: thousands of days × H×W would not fit.
    @jax.checkpoint
    def day(swe, x):
        swe_new, smb_day = ti_day_step(p, swe, x[0], x[1], x[2], temperature_shift)
        if valid is not None:
            # softplus_t(s, S) != S, so padding must select the old state, not add 0.
            swe_new = jnp.where(x[3], swe_new, swe)
            smb_day = jnp.where(x[3], smb_day, 0.0)
        return swe_new, smb_day

    if return_series:
        swe, series = jax.lax.scan(day, swe0, xs)
        return series, swe

    def step_acc(carry, x):
        swe, acc = carry
        swe, smb_day = day(swe, x)
        # Summing in the carry (not the series afterwards) is lean and matches the fixtures.
        return (swe, acc + smb_day), None

    (swe, acc), _ = jax.lax.scan(step_acc, (swe0, jnp.zeros_like(swe0)), xs)
    return acc, swe


class TIModel(eqx.Module):
    """Model A: the nine stored (unconstrained) TI parameters, float32 scalars."""

    prec_scale_log: Array
    ddf_snow_log: Array
    ddf_relative_ice_minus_one_log: Array
    snow_to_rain_steepness_log: Array
    snow_to_rain_centre: Array
    snow_depletion_steepness_log: Array
    snow_depletion_centre_log: Array
    t_softplus_sharpness_log: Array
    swe_softplus_sharpness_log: Array

    def __init__(self, **stored):
        """``TIModel(**{name: value})`` with all nine stored names; see :meth:`prior`."""
        missing = set(PARAM_NAMES) - set(stored)
        extra = set(stored) - set(PARAM_NAMES)
        if missing or extra:
            raise TypeError(
                f"TIModel needs exactly the stored parameters {PARAM_NAMES}; "
                f"missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        for name in PARAM_NAMES:
            setattr(self, name, jnp.asarray(stored[name], jnp.float32))

    @classmethod
    def prior(cls) -> TIModel:
        """The prior (uncalibrated starting point) in stored space."""
        return cls(**PRIOR_STORED)

    def stored(self) -> dict[str, Array]:
        """The nine stored parameters by name."""
        return {name: getattr(self, name) for name in PARAM_NAMES}

    def constrained(self) -> TIParams:
        """Constrained values (MODEL.md §2 table)."""
        return TIParams(
            prec_scale=jnp.exp(self.prec_scale_log),
            ddf_snow=jnp.exp(self.ddf_snow_log),
            ddf_relative_ice=1.0 + jnp.exp(self.ddf_relative_ice_minus_one_log),
            snow_to_rain_steepness=jnp.exp(self.snow_to_rain_steepness_log),
            snow_to_rain_centre=self.snow_to_rain_centre,
            snow_depletion_steepness=jnp.exp(self.snow_depletion_steepness_log),
            snow_depletion_centre=jnp.exp(self.snow_depletion_centre_log),
            t_softplus_sharpness=jnp.exp(self.t_softplus_sharpness_log),
            swe_softplus_sharpness=jnp.exp(self.swe_softplus_sharpness_log),
        )

    def run(
        self,
        temperature: Float[Array, "T H W"],
        precipitation: Float[Array, "T H W"],
        initial_swe: Float[Array, "H W"] | None = None,
        weights: Float[Array, " T"] | None = None,
        valid: Bool[Array, " T"] | None = None,
        temperature_shift: Float[Array, "H W"] | None = None,
        corrections: Float[Array, "5 H W"] | None = None,
        return_series: bool = False,
    ):
        """Run one period; returns (smb, swe) — smb (H, W) accumulated or (T, H, W) series.

        ``corrections`` (5, H, W) = d1..d5 of MODEL.md §4; its d5 adds to
        ``temperature_shift`` when both are given. See :func:`run_ti` for the rest.
        """
        p = self.constrained()
        if corrections is not None:
            p, d5 = apply_corrections(p, jnp.asarray(corrections, jnp.float32))
            temperature_shift = d5 if temperature_shift is None else temperature_shift + d5
        return run_ti(
            p, temperature, precipitation, initial_swe, weights, valid, temperature_shift,
            return_series,
        )


def trainable_filter(model: TIModel):
    """Equinox filter spec: True on the seven calibrated leaves, False on the two fixed."""
    spec = jax.tree_util.tree_map(lambda _: False, model)
    return eqx.tree_at(
        lambda m: [getattr(m, name) for name in CALIBRATED], spec, [True] * len(CALIBRATED)
    )


def prior_penalty(model: TIModel) -> Array:
    """0.1 · Σ over the nine stored parameters of ((p − p_prior)/p_prior)² (MODEL.md §6)."""
    total = jnp.float32(0.0)
    for name in PARAM_NAMES:
        prior = PRIOR_STORED[name]
        total = total + ((getattr(model, name) - prior) / prior) ** 2
    return PRIOR_WEIGHT * total
