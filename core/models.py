"""The four published model variants by name: construction, parameter files, trainable leaves."""

from __future__ import annotations

from pathlib import Path

import equinox as eqx
import jax
import jax.random as jr

from glaunti import gru_model, ti_corr_model, ti_model
from glaunti.params import load_params

MODELS = ("a", "b", "c", "d")
DESCRIPTIONS = {
    "a": "temperature-index model",
    "b": "per-cell GRU baseline",
    "c": "GlaUnTI (corrector without facies)",
    "d": "GlaUnTI with facies",
}
# The model each variant starts from (MODEL.md §7).
STARTS_FROM = {"c": "a", "d": "c"}
# The authors' PRNG key: with it B's and C's initial parameters are theirs, leaf for leaf.
DEFAULT_SEED = 42


# The authors' published weights ship with the project (params/published/README.md).
PUBLISHED_PARAMS = Path(__file__).resolve().parents[1] / "params" / "published"


def published_params_path(name: str) -> Path:
    """The published parameter file of model ``name``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return PUBLISHED_PARAMS / f"{name}.eqx"


def uses_facies(name: str) -> bool:
    return name == "d"


def skeleton(name: str, key=None):
    """A freshly initialised model of variant ``name`` (A at its prior; ``key`` defaults to
    the authors' key ``PRNGKey(DEFAULT_SEED)``)."""
    key = jr.PRNGKey(DEFAULT_SEED) if key is None else key
    if name == "a":
        return ti_model.TIModel.prior()
    if name == "b":
        return gru_model.GRUModel(key=key)
    if name in ("c", "d"):
        return ti_corr_model.GlaUnTI(ti_model.TIModel.prior(), key=key)
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")


def load_model(name: str, path: str | Path, unfreeze_ti: bool = False):
    """Load a parameter file into model ``name``; ``unfreeze_ti`` is accepted for the published
    interface (the TI parameters of C/D are frozen in training only, the file is the same)."""
    del unfreeze_ti
    return load_params(skeleton(name), path)


def trainable_filter(model):
    """Leaves that calibration changes: A's seven calibrated parameters, all of B, C/D's corrector."""
    if isinstance(model, ti_model.TIModel):
        return ti_model.trainable_filter(model)
    if isinstance(model, gru_model.GRUModel):
        return gru_model.trainable_filter(model)
    if isinstance(model, ti_corr_model.GlaUnTI):
        return ti_corr_model.trainable_filter(model)
    raise TypeError(f"not a GlaUnTI model: {type(model).__name__}")


def initial_model(name: str, seed: int = DEFAULT_SEED, params_folder: str | Path = "params",
                  start_path=None):
    """The starting point of calibration: A's prior, a random B, C from calibrated A (new corrector),
    D from calibrated C. The default seed reproduces the authors' initial parameters."""
    key = jr.PRNGKey(seed)
    model = skeleton(name, key)
    if name in STARTS_FROM:
        base = STARTS_FROM[name]
        path = Path(start_path) if start_path else Path(params_folder) / f"{base}.eqx"
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: model {name.upper()} starts from calibrated model {base.upper()}; "
                f"run train_{base}.py first (or pass its params file)"
            )
        if name == "c":
            ti = load_params(ti_model.TIModel.prior(), path)
            model = eqx.tree_at(lambda m: m.ti, model, ti)
        else:
            model = load_params(model, path)
    return model


def count_parameters(model) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(model, trainable_filter(model))))
