"""Calibration losses of one glacier over all its study years (MODEL.md §6, §9.7).

Everything here is a pure JAX function of the model and of ``GlacierArrays`` so that one
compiled function evaluates a glacier's whole loss (spin-up included) and its gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glaunti.glacier import GlacierArrays, run_glacier
from glaunti.ti_corr_model import GlaUnTI
from glaunti.ti_model import TIModel, prior_penalty

SEASONS = ("annual", "winter", "summer")
GLACIER_WIDE_WEIGHT = 0.1
CORRECTION_WEIGHTS = (5.0, 20.0, 5.0)  # magnitude, spatial variance, d2 − d3 coupling


def masked_mean(field, mask):
    """Outline-weighted mean over the last two axes. field (..., H, W), mask (H, W)."""
    return jnp.sum(field * mask, axis=(-2, -1)) / jnp.sum(mask, axis=(-2, -1))


def season_fields(season_smb):
    """(Y, 2, H, W) per-period sums → (Y, 3, H, W) annual, winter, summer."""
    winter, summer = season_smb[:, 0], season_smb[:, 1]
    return jnp.stack([winter + summer, winter, summer], axis=1)


def data_terms(arrays: GlacierArrays, fields):
    """Point and glacier-wide errors per season.

    Returns a dict with, per season c, ``total_c_error``, ``total_c_n`` (number of years),
    ``point_c_error`` and ``point_c_n`` (sum of date weights), all JAX scalars.
    """
    study = arrays.study
    glacier_wide_pred = masked_mean(fields, arrays.outlines[:, None])  # (Y, 3)
    obs = arrays.glacier_wide
    has_obs = study[:, None] & ~jnp.isnan(obs)
    sq = jnp.where(has_obs, (glacier_wide_pred - jnp.where(has_obs, obs, 0.0)) ** 2, 0.0)

    stake_pred = fields[arrays.stake_year, jnp.minimum(arrays.stake_code, 2), arrays.stake_row, arrays.stake_col]
    stake_w = jnp.where(study[arrays.stake_year] & (arrays.stake_code < 3), arrays.stake_weight, 0.0)
    stake_sq = stake_w * (stake_pred - arrays.stake_balance) ** 2

    terms = {}
    for c, season in enumerate(SEASONS):
        terms[f"total_{season}_error"] = jnp.sum(sq[:, c])
        terms[f"total_{season}_n"] = jnp.sum(has_obs[:, c])
        of_code = arrays.stake_code == c
        terms[f"point_{season}_error"] = jnp.sum(jnp.where(of_code, stake_sq, 0.0))
        terms[f"point_{season}_n"] = jnp.sum(jnp.where(of_code, stake_w, 0.0))
    return terms


def _mse(error, n):
    return jnp.where(n > 0, error / jnp.where(n > 0, n, 1), 0.0)


def data_loss(terms):
    """Σ_c (point MSE_c + 0.1 · glacier-wide MSE_c); missing terms count as 0."""
    total = 0.0
    for season in SEASONS:
        terms[f"total_{season}_mse"] = _mse(terms[f"total_{season}_error"], terms[f"total_{season}_n"])
        terms[f"point_{season}_mse"] = _mse(terms[f"point_{season}_error"], terms[f"point_{season}_n"])
        total = total + terms[f"point_{season}_mse"] + GLACIER_WIDE_WEIGHT * terms[f"total_{season}_mse"]
    return total


def correction_penalty(corrections, outlines, study):
    """Corrector regulariser averaged over study years: 5·Σ⟨d²⟩ + 20·Σ⟨(d − ⟨d⟩)²⟩ + 5·⟨(d2 − d3)²⟩.

    corrections (Y, 5, H, W), outlines (Y, H, W), study (Y,) bool.
    """
    mask = outlines[:, None]
    mean = masked_mean(corrections, mask)  # (Y, 5)
    magnitude = jnp.sum(masked_mean(corrections**2, mask), axis=1)
    spread = jnp.sum(masked_mean((corrections - mean[..., None, None]) ** 2, mask), axis=1)
    coupling = masked_mean((corrections[:, 1] - corrections[:, 2]) ** 2, outlines)
    a, b, c = CORRECTION_WEIGHTS
    per_year = a * magnitude + b * spread + c * coupling
    acc = jnp.sum(jnp.where(study, per_year, 0.0))
    n = jnp.sum(study).astype(jnp.float32)
    return acc, n


def ti_of(model):
    if isinstance(model, TIModel):
        return model
    if isinstance(model, GlaUnTI):
        return model.ti
    return None


def glacier_loss(model, arrays: GlacierArrays):
    """Calibration loss of one glacier and its terms (the published ``aux``)."""
    run = run_glacier(model, arrays)
    terms = data_terms(arrays, season_fields(run.season_smb))
    loss = data_loss(terms)
    terms["data_loss"] = loss
    ti = ti_of(model)
    if isinstance(model, GlaUnTI):
        acc, n = correction_penalty(run.corrections, arrays.outlines, arrays.study)
        terms["reg_ti_corr_acc"], terms["reg_ti_corr_n"] = acc, n
        terms["reg_ti_corr"] = acc / n
        loss = loss + terms["reg_ti_corr"]
    if ti is not None:
        terms["reg_ti"] = prior_penalty(ti)
        loss = loss + terms["reg_ti"]
    return loss, terms


def aux_to_python(terms) -> dict:
    """JAX scalars → floats/ints, with the published conventions: counts of years are ints,
    MSEs of empty terms are None."""
    out = {}
    for key, value in terms.items():
        value = jax.device_get(value)
        if key.startswith("total_") and key.endswith("_n"):
            out[key] = int(value)
        else:
            out[key] = float(value)
    for season in SEASONS:
        for scale in ("total", "point"):
            if out.get(f"{scale}_{season}_n", 0) == 0:
                out[f"{scale}_{season}_mse"] = None
    return out
