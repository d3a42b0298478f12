"""Models C and D: GlaUnTI = frozen TI model + CNN corrector (MODEL.md §4).

C and D are the same class; D's corrector gets the facies map of the year where C's gets
the −1 placeholder. Shapes: T = days of a block, H×W = grid, M = months (12–14, or 14 padded).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from glaunti.corrector import Corrector, check_grid
from glaunti.ti_model import TIModel

# Perturbations of the sensitivity channels.
SMB_SCALE = 10.0
DELTA_T = 0.5  # °C added to the temperature (the whole input, not only inside T⁺)
PRECIP_FACTOR = 1.05
N_GIVEN_FIELDS = 12  # outlines, elevation, elevation std, 9 facies bands


class GlaUnTI(eqx.Module):
    """Corrector + frozen TI parameters (taken from calibrated model A)."""

    corrector: Corrector
    ti: TIModel

    def __init__(self, ti: TIModel, corrector: Corrector | None = None,
                 key: PRNGKeyArray | None = None):
        """``GlaUnTI(ti)`` starts a fresh corrector (``key``) on top of a calibrated A."""
        self.ti = ti
        self.corrector = Corrector(key) if corrector is None else corrector

    def _frozen_ti(self) -> TIModel:
        # The TI parameters are frozen: no gradient may reach them from any loss.
        return jax.lax.stop_gradient(self.ti)

    def computed_channels(
        self,
        temperature: Float[Array, "T H W"],
        precipitation: Float[Array, "T H W"],
        weights: Float[Array, " T"] | None = None,
        valid: Bool[Array, " T"] | None = None,
        initial_swe: Float[Array, "H W"] | None = None,
    ) -> Float[Array, "3 H W"]:
        """The three TI channels of the corrector input, gradients stopped.

        ``smb0/10``, ``smb0(T+0.5) − smb0``, ``smb0(P·1.05) − smb0``, where ``smb0`` is the
        frozen TI model's accumulated SMB over the whole balance-year block from
        ``initial_swe`` (a split year's block is winter then summer, midseason day twice).
        """
        ti = self._frozen_ti()
        temperature = jnp.asarray(temperature, jnp.float32)
        precipitation = jnp.asarray(precipitation, jnp.float32)

        def smb(t, p):
            return ti.run(t, p, initial_swe, weights, valid)[0]

        smb0 = smb(temperature, precipitation)
        smb_warm = smb(temperature + DELTA_T, precipitation)
        smb_wet = smb(temperature, precipitation * PRECIP_FACTOR)
        channels = jnp.stack([smb0 / SMB_SCALE, smb_warm - smb0, smb_wet - smb0])
        return jax.lax.stop_gradient(channels)

    def corrections(
        self,
        fields: Float[Array, "12 H W"],
        climate_monthly: Float[Array, "2 M"],
        n_months: Int[Array, ""] | int | None,
        temperature: Float[Array, "T H W"],
        precipitation: Float[Array, "T H W"],
        weights: Float[Array, " T"] | None = None,
        valid: Bool[Array, " T"] | None = None,
        initial_swe: Float[Array, "H W"] | None = None,
    ) -> Float[Array, "5 H W"]:
        """Corrections d1..d5 of one balance year (5, H, W).

        Args:
            fields: (12, H, W) outlines, elevation/norm, elevation std/norm, 9 facies bands
                (−1 placeholder for model C).
            climate_monthly: (2, M) normalised monthly glacier-mean T and P; zero-padded
                to 14 when ``n_months`` (12..14, may be traced) is given, else unpadded.
            temperature, precipitation, weights, valid, initial_swe: the balance-year
                block for :meth:`computed_channels`.
        """
        fields = jnp.asarray(fields, jnp.float32)
        if fields.ndim != 3 or fields.shape[0] != N_GIVEN_FIELDS:
            raise ValueError(
                f"corrector fields must be ({N_GIVEN_FIELDS}, H, W) — outlines, elevation, "
                f"elevation std, 9 facies bands; got {fields.shape}"
            )
        check_grid(*fields.shape[1:])  # before the three TI runs, not after
        computed = self.computed_channels(temperature, precipitation, weights, valid, initial_swe)
        return self.corrector(jnp.concatenate([computed, fields]), climate_monthly, n_months)

    def run(
        self,
        temperature: Float[Array, "T H W"],
        precipitation: Float[Array, "T H W"],
        corrections: Float[Array, "5 H W"],
        initial_swe: Float[Array, "H W"] | None = None,
        weights: Float[Array, " T"] | None = None,
        valid: Bool[Array, " T"] | None = None,
        return_series: bool = False,
    ):
        """The corrected TI run of one period; returns (smb, swe) as :meth:`TIModel.run`."""
        return self._frozen_ti().run(
            temperature, precipitation, initial_swe, weights, valid,
            corrections=corrections, return_series=return_series,
        )


def trainable_filter(model: GlaUnTI):
    """Equinox filter spec: True on the corrector's array leaves only (TI frozen)."""
    spec = jax.tree_util.tree_map(lambda _: False, model)
    return eqx.tree_at(
        lambda m: m.corrector, spec,
        jax.tree_util.tree_map(eqx.is_inexact_array, model.corrector),
    )
