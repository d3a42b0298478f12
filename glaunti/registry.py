"""The one registry of the published model variants A–D: name → how to build, train and start it.

Adding a variant E: write its module (an Equinox module with the engine's model interface,
``glaunti.glacier``) and add one :class:`ModelSpec` to :data:`REGISTRY`; the engine, losses,
parameter files, scripts and demo then know it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import equinox as eqx
import jax.random as jr

from glaunti.gru_model import GRUModel
from glaunti.ti_corr_model import GlaUnTI
from glaunti.ti_model import TIModel

# The authors' PRNG key: with it B's and C's initial parameters are theirs, leaf for leaf.
DEFAULT_SEED = 42


@dataclass(frozen=True)
class ModelSpec:
    """One variant.

    build: PRNG key → a freshly initialised model (A: its prior).
    epochs: the published number of calibration epochs.
    facies: its corrector reads the facies maps (D) instead of the placeholder.
    starts_from: the variant whose calibrated parameters calibration starts from, if any;
        ``inherit(fresh, calibrated)`` then builds the starting model.
    """

    name: str
    description: str
    build: Callable
    epochs: int
    facies: bool = False
    starts_from: str | None = None
    inherit: Callable | None = None


def _corrector_on(fresh: GlaUnTI, calibrated_a: TIModel) -> GlaUnTI:
    return eqx.tree_at(lambda m: m.ti, fresh, calibrated_a)


def _continue(fresh: GlaUnTI, calibrated_c: GlaUnTI) -> GlaUnTI:
    del fresh
    return calibrated_c


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("a", "temperature-index model", lambda key: TIModel.prior(), epochs=50),
        ModelSpec("b", "per-cell GRU baseline", lambda key: GRUModel(key=key), epochs=100),
        ModelSpec("c", "GlaUnTI (corrector without facies)",
                  lambda key: GlaUnTI(TIModel.prior(), key=key), epochs=50,
                  starts_from="a", inherit=_corrector_on),
        ModelSpec("d", "GlaUnTI with facies", lambda key: GlaUnTI(TIModel.prior(), key=key),
                  epochs=50, facies=True, starts_from="c", inherit=_continue),
    )
}
MODELS = tuple(REGISTRY)


def spec(name: str) -> ModelSpec:
    """The variant ``name`` ('a'..'d', any case); ValueError naming the known ones otherwise."""
    try:
        return REGISTRY[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown model kind {name!r}; expected one of {', '.join(MODELS)}") from None


def build(name: str, key=None):
    """A freshly initialised model of variant ``name`` (``key`` defaults to the authors' key
    ``PRNGKey(DEFAULT_SEED)``)."""
    return spec(name).build(jr.PRNGKey(DEFAULT_SEED) if key is None else key)
