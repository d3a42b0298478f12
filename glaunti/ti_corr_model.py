"""Models C and D: GlaUnTI = frozen TI model + CNN corrector (docs/model.md §4).

C and D are the same class; D's corrector gets the facies map of the year where C's gets
the −1 placeholder. Shapes: T = days of a block, H×W = grid, M = months (12–14, or 14 padded).
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from glaunti.corrector import N_GIVEN_FIELDS, Corrector, check_grid
from glaunti.glacier import (
    at_published_precision,
    fields_forcing,
    grid_row,
    masked_mean,
    period_days,
    scan_block,
    scan_days,
    to_grid,
    to_row,
)
from glaunti.ti_model import (
    TERMS,
    TIModel,
    apply_corrections,
    day_balance,
    default_weights,
    temperature_terms,
    ti_step,
)

# The corrector's three computed input channels (docs/model.md §4): the frozen TI balance of the
# year, scaled, and its changes under two perturbations of the forcing.
SMB_SCALE = 10.0
DELTA_T = 0.5  # °C added to the temperature (the whole input, not only inside T⁺)
PRECIP_FACTOR = 1.05
# Name of the computed channels among a year's residuals: the engine's year rematerialisation
# (``GlaUnTI.year_remat_policy``) keeps them, so that a backward pass does not rerun their three
# whole-grid TI runs.
CHANNELS_NAME = "glaunti_computed_channels"
# Name of the SWE at the start of each half of a spin-up year, kept for the same reason: the
# summer half starts from the winter's whole-grid run, which the backward pass then need not rerun.
SPINUP_SWE_NAME = "glaunti_spinup_half_swe"
# Weights of the corrector's regulariser: magnitude, spatial variance, d2 − d3 coupling.
CORRECTION_WEIGHTS = (5.0, 20.0, 5.0)


def sensitivity_step(params):
    """Day step of the frozen TI model run three times at once (over a leading axis of the SWE
    state (3, ...)): as is, with T + :data:`DELTA_T`, with P × :data:`PRECIP_FACTOR`.

    Runs 0 and 2 see the same temperature, so its terms (a sigmoid and a softplus per cell)
    are computed for two temperatures, not three: the same values, bit for bit, as three
    separate :func:`ti_day_step` calls, for a sixth less work."""
    p_factor = jnp.array([1.0, 1.0, PRECIP_FACTOR], jnp.float32)
    runs = jnp.array([0, 1, 0])  # which temperature each run sees

    def step(swe3, temperature, precipitation, weight, _flag):
        snow_share, t_pos = temperature_terms(params, jnp.stack([temperature, temperature + DELTA_T]))

        def one(swe, share, tp, pf):
            return day_balance(params, swe, precipitation * pf, share, tp, weight)
        return jax.vmap(one)(swe3, snow_share[runs], t_pos[runs], p_factor)

    return step


def computed_channels(ti: TIModel, swe, scan) -> Float[Array, "3 H W"]:
    """The corrector's three computed channels from the year's initial SWE (H, W):
    ``smb0 / SMB_SCALE``, ``smb0(T + DELTA_T) − smb0``, ``smb0(P · PRECIP_FACTOR) − smb0``,
    where ``smb0`` is the frozen TI balance of the whole year block (winter + summer, as the
    published code adds its two runs). ``scan(step, state) -> (state, (2, ...) sums, _)`` runs
    the block (a glacier year: ``scan_block``; given fields: ``scan_days``). The three runs
    share one scan; gradients are stopped (``ti`` is the frozen TI, ``GlaUnTI.frozen_ti``)."""
    params = ti.constrained()
    swe = jax.lax.stop_gradient(swe)
    _, acc, _ = scan(sensitivity_step(params), jnp.broadcast_to(swe, (3,) + swe.shape))
    smb = acc[0] + acc[1]
    smb0 = smb[0]
    channels = jnp.stack([smb0 / SMB_SCALE, smb[1] - smb0, smb[2] - smb0])
    return checkpoint_name(jax.lax.stop_gradient(channels), CHANNELS_NAME)


def corrected_run(base, corrections, swe, arrays, k, days, *, series=False, custom_vjp=False,
                  terms=False):
    """The TI run of year k's ``days`` (L,) bool with per-cell ``corrections`` (5, H, W) from
    ``swe`` (H, W): (swe, (2, H, W) per-period sums, (L, H, W) daily SMB (with ``terms``: and
    the day terms, ``glaunti.ti_model.TERMS``) or None).

    With ``custom_vjp`` (a reverse-mode training loss) only the cells of ``arrays.loss_cells``
    carry a gradient: the whole grid runs under ``stop_gradient`` (its SWE starts the next
    year's computed channels; the backward pass does not revisit it), and those cells run again,
    differentiably, as a (1, K) row whose values replace theirs. Every value is the same as one
    run of the grid: a cell's run reads only its own corrections, SWE and forcing. The other
    cells cannot affect the loss (off-glacier in every year, no stake), so their cotangents
    were zero.
    """
    no_flag = jnp.zeros_like(days)

    def run(corrections, swe, cell_arrays, shape, custom_vjp):
        params, shift = apply_corrections(base, corrections)
        step = ti_step(params, shift, custom_vjp, terms)
        return scan_block(step, swe, cell_arrays, k, days, no_flag, series, shape)

    if not custom_vjp:
        return run(corrections, swe, arrays, arrays.shape, False)
    grid = run(jax.lax.stop_gradient(corrections), jax.lax.stop_gradient(swe), arrays, arrays.shape, False)
    cells = arrays.loss_cells
    n_cells = arrays.shape[0] * arrays.shape[1]

    def gather(a):  # (..., H, W) -> (..., 1, K); padding (index H·W) reads the last cell
        return jnp.take(a.reshape(a.shape[:-2] + (1, n_cells)), cells, axis=-1, mode="clip")

    def scatter(into, values):  # values (..., 1, K) into the cells of (..., H, W); padding dropped
        flat = into.reshape(into.shape[:-2] + (n_cells,))
        return flat.at[..., cells].set(values[..., 0, :], mode="drop").reshape(into.shape)

    row = eqx.tree_at(lambda a: (a.climate_cell, a.lapse_offset), arrays,
                      (gather(arrays.climate_cell), gather(arrays.lapse_offset)))
    on_cells = run(gather(corrections), gather(swe), row, (1, cells.shape[0]), True)
    return jax.tree_util.tree_map(scatter, grid, on_cells)


def correction_penalty(corrections, outlines, study):
    """Corrector regulariser summed over study years, and their number:
    5·Σ⟨d²⟩ + 20·Σ⟨(d − ⟨d⟩)²⟩ + 5·⟨(d2 − d3)²⟩ per year (⟨⟩: outline mean).

    corrections (Y, 5, H, W), outlines (Y, H, W), study (Y,) bool → (sum, n) scalars.
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


class GlaUnTI(eqx.Module):
    """Corrector + frozen TI parameters (taken from calibrated model A).

    Implements the engine's model interface (``glaunti.glacier``); the state is the SWE (H, W).
    """

    corrector: Corrector
    ti: TIModel

    kind: ClassVar[str] = "C/D"
    TERMS: ClassVar[tuple[str, ...]] = TERMS
    cell_independent: ClassVar[bool] = False  # the corrector sees the whole grid
    state_cell_axis: ClassVar[int | None] = None
    # What a year keeps for its backward pass (``glaunti.glacier.walk_years``): the computed
    # channels, which cost three whole-grid TI runs and carry no gradient; the rest of the
    # year (corrector, corrected run on the loss cells) is recomputed.
    year_remat_policy: ClassVar = jax.checkpoint_policies.save_only_these_names(CHANNELS_NAME,
                                                                                 SPINUP_SWE_NAME)
    # The corrector masks cells beyond ``arrays.grid_size``: glaciers of different sizes can
    # share one padded grid, hence one compiled function (``glaunti.layouts`` "padded_grid").
    pads_grid: ClassVar[bool] = True

    def __init__(self, ti: TIModel, corrector: Corrector | None = None,
                 key: PRNGKeyArray | None = None):
        """``GlaUnTI(ti)`` starts a fresh corrector (``key``) on top of a calibrated A."""
        self.ti = ti
        self.corrector = Corrector(key) if corrector is None else corrector

    def frozen_ti(self) -> TIModel:
        """The TI model as every computation of C/D uses it: frozen, no gradient may reach its
        parameters from any loss (the one home of that rule; ``trainable_filter`` leaves them
        out of calibration accordingly)."""
        return jax.lax.stop_gradient(self.ti)

    @at_published_precision
    def computed_channels(
        self,
        temperature: Float[Array, "T H W"],
        precipitation: Float[Array, "T H W"],
        weights: Float[Array, " T"] | None = None,
        valid: Bool[Array, " T"] | None = None,
        initial_swe: Float[Array, "H W"] | None = None,
    ) -> Float[Array, "3 H W"]:
        """The three TI channels of the corrector input for a balance-year block given as
        fields (a split year's block is winter then summer, midseason day twice), from
        ``initial_swe`` (None: cold start); see :func:`computed_channels`."""
        temperature = jnp.asarray(temperature, jnp.float32)
        precipitation = jnp.asarray(precipitation, jnp.float32)
        shape = temperature.shape[1:]
        if weights is None:
            weights = default_weights(temperature.shape[0], valid)
        if initial_swe is None:
            initial_swe = self.ti.initial_state(shape)
        swe = jnp.broadcast_to(jnp.asarray(initial_swe, jnp.float32), shape)
        days = period_days(temperature, precipitation, weights, valid)

        def scan(step, state):
            return scan_days(step, state, days, fields_forcing, state.shape)

        return computed_channels(self.frozen_ti(), swe, scan)

    @at_published_precision
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

    @at_published_precision
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
        return self.frozen_ti().run(
            temperature, precipitation, initial_swe, weights, valid,
            corrections=corrections, return_series=return_series,
        )

    # -- the engine's model interface -------------------------------------------------------
    def initial_state(self, shape) -> Float[Array, "H W"]:
        return self.ti.initial_state(shape)

    def corrections_at(self, arrays, k, swe, custom_vjp: bool = False) -> Float[Array, "5 H W"]:
        """d1..d5 of glacier year k given the SWE its computed channels start from.
        ``custom_vjp`` (a reverse-mode training loss) runs the corrector's convolutions
        channels-last with their hand-written derivative (``glaunti.corrector.conv``)."""
        valid = arrays.day_valid[k]
        row = grid_row(arrays)  # the TI runs treat every cell alone: bit-identical, faster

        def scan(step, state):
            return scan_block(step, state, row, k, valid, jnp.zeros_like(valid), False, state.shape)

        channels = to_grid(computed_channels(self.frozen_ti(), to_row(swe), scan), arrays.shape)
        inputs = jnp.concatenate([channels, arrays.fields[k]], axis=0)
        grid_size = arrays.grid_size if arrays.grid_padded else None
        return self.corrector(inputs, arrays.climate_monthly[k], arrays.n_months[k], grid_size=grid_size,
                              channels_last=custom_vjp)

    def year_step(self, arrays, k, state, *, series=False, spinup=False, custom_vjp=False, terms=False):
        """Balance year k of a glacier (``glaunti.glacier.year_step``) with its corrections.

        In a study year the corrections come from the year's initial SWE and apply to the whole
        block. In a spin-up year (``spinup``, static) the summer's corrections are recomputed
        from the post-winter SWE, as the published spin-up does (docs/model.md §9.1); in an
        annual-only year this is the same as one run.
        """
        valid = arrays.day_valid[k]
        base = self.frozen_ti().constrained()
        row = grid_row(arrays)

        def run(corrections, swe, days):
            out = corrected_run(base, to_row(corrections), to_row(swe), row, k, days, series=series,
                                custom_vjp=custom_vjp, terms=terms)
            return jax.tree_util.tree_map(lambda x: to_grid(x, arrays.shape), out)

        if not spinup:
            corrections = self.corrections_at(arrays, k, state, custom_vjp)
            state, acc, out = run(corrections, state, valid)
            return state, acc, corrections, out
        # Winter then summer, each with corrections from its own initial SWE: one scan over the
        # two halves, so that the corrector appears once in this graph (compile time), not twice.
        season = arrays.day_season[k]

        def half(swe, s):
            swe = checkpoint_name(swe, SPINUP_SWE_NAME)

            def compute(swe):
                corrections = self.corrections_at(arrays, k, swe, custom_vjp)
                swe, acc, out = run(corrections, swe, valid & (season == s))
                return swe, (acc, corrections, out)

            def skip(swe):  # an annual-only year has no summer half
                out = jax.eval_shape(compute, swe)[1]
                return swe, jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), out)

            return jax.lax.cond((s == 0) | arrays.seasonal[k], compute, skip, swe)

        swe, (accs, corrections, outs) = jax.lax.scan(half, state, jnp.arange(2))
        out = None if outs is None else jax.tree_util.tree_map(lambda x: x[0] + x[1], outs)
        return swe, accs[0] + accs[1], corrections[0], out

    def trainable_filter(self):
        """Equinox filter spec: True on the corrector's array leaves only (TI frozen)."""
        spec = jax.tree_util.tree_map(lambda _: False, self)
        return eqx.tree_at(
            lambda m: m.corrector, spec,
            jax.tree_util.tree_map(eqx.is_inexact_array, self.corrector),
        )

    def regularisers(self, run, arrays):
        """(terms for the log, penalties added to the loss in order): the corrector's
        regulariser averaged over study years, then the (constant) prior penalty of the TI."""
        acc, n = correction_penalty(run.corrections, arrays.outlines, arrays.study)
        terms = {"reg_ti_corr_acc": acc, "reg_ti_corr_n": n, "reg_ti_corr": acc / n}
        ti_terms, ti_penalties = self.ti.regularisers(run, arrays)
        terms.update(ti_terms)
        return terms, [terms["reg_ti_corr"], *ti_penalties]

    def authors_tree(self):
        """The authors' parameter tree: ({'corrector': <corrector>}, {9 stored TI params})."""
        return ({"corrector": self.corrector}, self.ti.stored())

    def from_authors_tree(self, tree) -> GlaUnTI:
        return GlaUnTI(TIModel(**tree[1]), tree[0]["corrector"])
