"""The published model variants by name, as the scripts use them: the registry
(``glaunti.registry``), where their parameter files are, loading and starting calibration."""

from __future__ import annotations

from pathlib import Path

import jax.random as jr

from glaunti import trainable_filter  # noqa: F401  (re-exported for the scripts and tests)
from glaunti.params import load_params
from glaunti.registry import DEFAULT_SEED, MODELS, REGISTRY, build, spec

DESCRIPTIONS = {name: s.description for name, s in REGISTRY.items()}
# The model each variant starts from (docs/model.md §7).
STARTS_FROM = {name: s.starts_from for name, s in REGISTRY.items() if s.starts_from}
# The published calibration schedule (epochs per variant).
EPOCHS = {name: s.epochs for name, s in REGISTRY.items()}

# The authors' published weights ship with the project (params/published/README.md).
PUBLISHED_PARAMS = Path(__file__).resolve().parents[1] / "params" / "published"

__all__ = ["DEFAULT_SEED", "DESCRIPTIONS", "EPOCHS", "MODELS", "PUBLISHED_PARAMS", "STARTS_FROM",
           "initial_model", "load_model", "published_params_path", "skeleton", "trainable_filter",
           "uses_facies"]


def published_params_path(name: str) -> Path:
    """The published parameter file of model ``name``."""
    return PUBLISHED_PARAMS / f"{spec(name).name}.eqx"


def uses_facies(name: str) -> bool:
    return spec(name).facies


def skeleton(name: str, key=None):
    """A freshly initialised model of variant ``name`` (A at its prior; ``key`` defaults to
    the authors' key ``PRNGKey(DEFAULT_SEED)``)."""
    return build(name, key)


def load_model(name: str, path: str | Path):
    """The model ``name`` with the parameters of file ``path`` (a fine-tuned A loads as any A)."""
    return load_params(skeleton(name), path)


def initial_model(name: str, seed: int = DEFAULT_SEED, params_folder: str | Path = "params",
                  start_path=None):
    """The starting point of calibration: A's prior, a random B, C from calibrated A (new corrector),
    D from calibrated C. The default seed reproduces the authors' initial parameters."""
    variant = spec(name)
    model = build(name, jr.PRNGKey(seed))
    if variant.starts_from is None:
        return model
    base = variant.starts_from
    path = Path(start_path) if start_path else Path(params_folder) / f"{base}.eqx"
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: model {name.upper()} starts from calibrated model {base.upper()}; "
            f"run train_{base}.py first (or pass its params file)"
        )
    return variant.inherit(model, load_params(base, path))
