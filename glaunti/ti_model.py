"""Model A: the differentiable temperature-index (TI) model (docs/model.md §1–2).

Shapes: T = days of one period (or one day block), H×W = grid.

The arithmetic of :func:`ti_day_step` follows the published implementation operation by
operation (same grouping of products and sums, float32 throughout): with that order a run
reproduces the golden fixtures to the last bit or within a few ulps. Do not "simplify" it.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from glaunti.glacier import at_published_precision, fields_forcing, period_days, scan_block, scan_days

# Stored (unconstrained) parameter names in docs/model.md §2 table order.
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

# Priors in constrained space (docs/model.md §2) ...
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


# The day terms a TI step can return beside its SMB (``terms=True``), m w.e. per day, weighted
# like the SMB: the accumulated snowfall (after prec_scale), the rainfall (the liquid share of
# the precipitation, which the model does not scale) and the melt of snow and ice, so that
# smb = snowfall − melt.
TERMS: tuple[str, ...] = ("snowfall", "rainfall", "melt")


def ti_day_step(p: TIParams, swe, temperature, precipitation, weight, temperature_shift=None,
                terms: bool = False):
    """One day of model A for every cell.

    Args:
        p: constrained parameters (scalars or (H, W) fields).
        swe: (H, W) snow water equivalent before the day (m w.e.).
        temperature, precipitation: (H, W) °C and m w.e./day.
        weight: scalar day weight (½ on period boundaries).
        temperature_shift: optional (H, W) Δ added to T inside T⁺ only (model C/D's d5).

        terms: also return the day's :data:`TERMS` (3, H, W).

    Returns:
        (swe_new (H, W), smb_day (H, W)), or with ``terms`` (swe_new, (smb_day, terms)).
    """
    snow_share, t_pos = temperature_terms(p, temperature, temperature_shift)
    return day_balance(p, swe, precipitation, snow_share, t_pos, weight, terms)


def temperature_terms(p: TIParams, temperature, temperature_shift=None):
    """The day's terms that depend on temperature only: the snow share of precipitation
    (sigmoid) and the positive temperature T⁺ (sharpened softplus of T + Δ). Runs that see
    the same temperature can share them (model C's computed channels)."""
    snow_share = jax.nn.sigmoid(p.snow_to_rain_steepness * (p.snow_to_rain_centre - temperature))
    t_melt = temperature if temperature_shift is None else temperature + temperature_shift
    return snow_share, softplus_t(p.t_softplus_sharpness, t_melt)


def day_balance(p: TIParams, swe, precipitation, snow_share, t_pos, weight, terms: bool = False):
    """The rest of :func:`ti_day_step` given its :func:`temperature_terms`."""
    solid = precipitation * snow_share
    f_snow = hill(p.snow_depletion_steepness, p.snow_depletion_centre, swe)
    accumulation = p.prec_scale * solid
    # Melt "potentials" grouped as in the published code: ddf·(f·T⁺) and ri·((1−f)·T⁺).
    snow_melt = f_snow * t_pos
    ice_melt = p.ddf_relative_ice * ((1.0 - f_snow) * t_pos)
    swe_new = softplus_t(
        p.swe_softplus_sharpness, swe + weight * (accumulation - p.ddf_snow * snow_melt)
    )
    smb_day = weight * (accumulation - p.ddf_snow * (snow_melt + ice_melt))
    if not terms:
        return swe_new, smb_day
    rainfall = precipitation * (1.0 - snow_share)
    day_terms = jnp.stack(jnp.broadcast_arrays(accumulation, rainfall, p.ddf_snow * (snow_melt + ice_melt)))
    return swe_new, (smb_day, weight * day_terms)


def _sum_to(g, like):
    """Reduce a broadcast cotangent ``g`` to the shape of ``like`` (scalar or per-cell field)."""
    shape = jnp.shape(like)
    if g.shape == shape:
        return g
    axes = tuple(range(g.ndim - len(shape)))
    g = jnp.sum(g, axis=axes) if axes else g
    keep = tuple(i for i, (a, b) in enumerate(zip(g.shape, shape)) if a != b)
    return jnp.sum(g, axis=keep, keepdims=True).reshape(shape) if keep else g.reshape(shape)


@jax.custom_vjp
def ti_day_step_vjp(p: TIParams, swe, temperature, precipitation, weight, temperature_shift):
    """:func:`ti_day_step` with a hand-written reverse-mode derivative (training only).

    The forward pass is :func:`ti_day_step` itself (bit-identical). The backward pass reuses
    the forward's intermediate values (sigmoid of the snow fraction, the two softplus slopes,
    the snow-cover fraction) instead of differentiating each operation, which removes most of
    the transcendental functions autodiff would evaluate. Forward-mode (``jax.jvp``) is not
    defined for it: analysis code differentiating the climate uses :func:`ti_day_step`.
    ``temperature_shift`` is None (model A) or an (H, W) array (C/D's d5).
    """
    return ti_day_step(p, swe, temperature, precipitation, weight, temperature_shift)


def _ti_fwd(p, swe, temperature, precipitation, weight, temperature_shift):
    swe_new, smb = ti_day_step(p, swe, temperature, precipitation, weight, temperature_shift)
    # The slopes the backward pass needs (the outputs above are computed exactly as in the
    # forward-only step, so they are bit-identical to it).
    sig, t_pos = temperature_terms(p, temperature, temperature_shift)
    t_melt = temperature if temperature_shift is None else temperature + temperature_shift
    slope_t = jax.nn.sigmoid(p.t_softplus_sharpness * t_melt)
    f_snow = hill(p.snow_depletion_steepness, p.snow_depletion_centre, swe)
    solid = precipitation * sig
    accumulation = p.prec_scale * solid
    snow_melt = f_snow * t_pos
    u = swe + weight * (accumulation - p.ddf_snow * snow_melt)
    slope_s = jax.nn.sigmoid(p.swe_softplus_sharpness * u)
    res = (p, swe, temperature, precipitation, weight, temperature_shift, sig, t_pos, slope_t,
           f_snow, u, slope_s, swe_new)
    return (swe_new, smb), res


def _ti_bwd(res, cotangents):
    p, swe, temperature, precipitation, weight, shift, sig, t_pos, slope_t, f_snow, u, slope_s, \
        swe_new = res
    g_swe_new, g_smb = cotangents
    w = weight
    ri, ddf, ps = p.ddf_relative_ice, p.ddf_snow, p.prec_scale
    solid = precipitation * sig
    accumulation = ps * solid
    snow_melt = f_snow * t_pos
    ice_melt = ri * ((1.0 - f_snow) * t_pos)

    g_u = g_swe_new * slope_s
    g_ss = g_swe_new * (u * slope_s - swe_new) / p.swe_softplus_sharpness
    g_acc = (g_smb + g_u) * w
    g_ddf = -w * (g_smb * (snow_melt + ice_melt) + g_u * snow_melt)
    g_sm = -(g_smb + g_u) * w * ddf
    g_im = -g_smb * w * ddf
    g_w = g_smb * (accumulation - ddf * (snow_melt + ice_melt)) + g_u * (accumulation - ddf * snow_melt)
    g_ps = g_acc * solid
    g_solid = g_acc * ps
    g_f = g_sm * t_pos - g_im * ri * t_pos
    g_tp = g_sm * f_snow + g_im * ri * (1.0 - f_snow)
    g_ri = g_im * (1.0 - f_snow) * t_pos
    g_p = g_solid * sig
    g_a = g_solid * precipitation * sig * (1.0 - sig)
    g_k = g_a * (p.snow_to_rain_centre - temperature)
    g_c = g_a * p.snow_to_rain_steepness
    g_tm = g_tp * slope_t
    t_melt = temperature if shift is None else temperature + shift
    g_st = g_tp * (t_melt * slope_t - t_pos) / p.t_softplus_sharpness
    g_t = g_tm - g_a * p.snow_to_rain_steepness
    # Hill curve f = S^h / (S^h + c^h): df/dS = h f (1 − f) / S, df/dh = f (1 − f) log(S/c),
    # df/dc = −h f (1 − f) / c (all 0 where S = 0, as f is flat there for h > 1).
    fp = g_f * f_snow * (1.0 - f_snow)
    h, c = p.snow_depletion_steepness, p.snow_depletion_centre
    positive = swe > 0
    safe = jnp.where(positive, swe, 1.0)
    g_swe = g_u + jnp.where(positive, fp * h / safe, 0.0)
    g_h = jnp.where(positive, fp * (jnp.log(safe) - jnp.log(c)), 0.0)
    g_cc = -fp * h / c
    g_p_params = TIParams(
        prec_scale=_sum_to(g_ps, p.prec_scale),
        ddf_snow=_sum_to(g_ddf, p.ddf_snow),
        ddf_relative_ice=_sum_to(g_ri, p.ddf_relative_ice),
        snow_to_rain_steepness=_sum_to(g_k, p.snow_to_rain_steepness),
        snow_to_rain_centre=_sum_to(g_c, p.snow_to_rain_centre),
        snow_depletion_steepness=_sum_to(g_h, p.snow_depletion_steepness),
        snow_depletion_centre=_sum_to(g_cc, p.snow_depletion_centre),
        t_softplus_sharpness=_sum_to(g_st, p.t_softplus_sharpness),
        swe_softplus_sharpness=_sum_to(g_ss, p.swe_softplus_sharpness),
    )
    return (g_p_params, _sum_to(g_swe, swe), _sum_to(g_t, temperature), _sum_to(g_p, precipitation),
            _sum_to(g_w, weight), None if shift is None else _sum_to(g_tm, shift))


ti_day_step_vjp.defvjp(_ti_fwd, _ti_bwd)


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
    """Apply the corrector's d1..d5 (5, H, W) (docs/model.md §4).

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


def ti_step(p: TIParams, temperature_shift=None, custom_vjp: bool = False, terms: bool = False):
    """The day step ``(swe, T, P, weight, flag) -> (swe, smb)`` of the engine's day scan
    (``glaunti.glacier.scan_days``) for parameters ``p``. ``custom_vjp`` selects
    :func:`ti_day_step_vjp` (reverse mode only), else :func:`ti_day_step`; ``terms`` (forward
    only) makes the step return ``(swe, (smb, terms))``."""
    if terms and custom_vjp:
        raise ValueError("the day terms are an inference output; the training step has none")
    if custom_vjp:
        def step(swe, temperature, precipitation, weight, _flag):
            return ti_day_step_vjp(p, swe, temperature, precipitation, weight, temperature_shift)
        return step

    def step(swe, temperature, precipitation, weight, _flag):
        return ti_day_step(p, swe, temperature, precipitation, weight, temperature_shift, terms)

    return step


def cold_start(p: TIParams, shape) -> Float[Array, "H W"]:
    """The cold-start SWE: every cell at the snow-depletion centre."""
    return jnp.full(shape, p.snow_depletion_centre, jnp.float32)


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
    """One period of model A with the engine's day scan (pure function behind :meth:`TIModel.run`).

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
    if initial_swe is None:
        swe0 = cold_start(p, (height, width))
    else:
        swe0 = jnp.broadcast_to(jnp.asarray(initial_swe, jnp.float32), (height, width))
    if temperature_shift is not None:
        temperature_shift = jnp.asarray(temperature_shift, jnp.float32)
    days = period_days(temperature, precipitation, weights, valid)
    swe, acc, series = scan_days(ti_step(p, temperature_shift), swe0, days, fields_forcing,
                                 (height, width), return_series)
    return (series if return_series else acc[0]), swe


class TIModel(eqx.Module):
    """Model A: the nine stored (unconstrained) TI parameters, float32 scalars.

    Implements the engine's model interface (``glaunti.glacier``); the state is the SWE (H, W).
    """

    kind: ClassVar[str] = "A"
    TERMS: ClassVar[tuple[str, ...]] = TERMS
    cell_independent: ClassVar[bool] = True
    state_cell_axis: ClassVar[int] = 1  # SWE (H, W): a "cells" row (1, N) has its cells on W

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
        """Constrained values (docs/model.md §2 table)."""
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

    @at_published_precision
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

        ``corrections`` (5, H, W) = d1..d5 of docs/model.md §4; its d5 adds to
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

    # -- the engine's model interface -------------------------------------------------------
    def initial_state(self, shape) -> Float[Array, "H W"]:
        return cold_start(self.constrained(), shape)

    def year_step(self, arrays, k, state, *, series=False, spinup=False, custom_vjp=False, terms=False):
        """Balance year k of a glacier (``glaunti.glacier.year_step``); no corrections."""
        del spinup  # spin-up and study years are the same for A
        valid = arrays.day_valid[k]
        step = ti_step(self.constrained(), None, custom_vjp, terms)
        state, acc, out = scan_block(step, state, arrays, k, valid, jnp.zeros_like(valid), series)
        return state, acc, None, out

    def trainable_filter(self):
        """Equinox filter spec: True on the seven calibrated leaves, False on the two fixed."""
        spec = jax.tree_util.tree_map(lambda _: False, self)
        return eqx.tree_at(
            lambda m: [getattr(m, name) for name in CALIBRATED], spec, [True] * len(CALIBRATED)
        )

    def regularisers(self, run, arrays):
        """(terms for the log, penalties added to the loss in order): the prior penalty."""
        del run, arrays
        penalty = prior_penalty(self)
        return {"reg_ti": penalty}, [penalty]

    def authors_tree(self):
        """The authors' parameter tree: ({7 calibrated}, {2 fixed}) stored parameters."""
        return (
            {name: getattr(self, name) for name in CALIBRATED},
            {name: getattr(self, name) for name in FIXED},
        )

    def from_authors_tree(self, tree) -> TIModel:
        return TIModel(**tree[0], **tree[1])


def prior_penalty(model: TIModel) -> Array:
    """0.1 · Σ over the nine stored parameters of ((p − p_prior)/p_prior)² (docs/model.md §6)."""
    total = jnp.float32(0.0)
    for name in PARAM_NAMES:
        prior = PRIOR_STORED[name]
        total = total + ((getattr(model, name) - prior) / prior) ** 2
    return PRIOR_WEIGHT * total
