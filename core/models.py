"""The published model variants by name, as the scripts use them: the registry
(``glaunti.registry``), where their parameter files are, loading and starting calibration."""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax.random as jr

from core.io import atomic_path
from glaunti.params import load_params, save_params
from glaunti.registry import DEFAULT_SEED, MODELS, REGISTRY, build, spec

DESCRIPTIONS = {name: s.description for name, s in REGISTRY.items()}
# The model each variant starts from (docs/model.md §7).
STARTS_FROM = {name: s.starts_from for name, s in REGISTRY.items() if s.starts_from}
# The published calibration schedule (docs/model.md §7): epochs per variant, Adam's learning
# rate; and per-glacier fine-tuning of model A.
EPOCHS = {name: s.epochs for name, s in REGISTRY.items()}
LEARNING_RATE = 1e-3
FINETUNE_EPOCHS = 250
FINETUNE_LEARNING_RATE = 1e-2
FINETUNE_TRAIN_YEARS = (1995, 2012)
FINETUNE_VAL_YEARS = (2013, 2018)

# The authors' published weights ship with the project (params/published/README.md).
PUBLISHED_PARAMS = Path(__file__).resolve().parents[1] / "params" / "published"

__all__ = ["DEFAULT_SEED", "DESCRIPTIONS", "EPOCHS", "FINETUNE_EPOCHS", "FINETUNE_LEARNING_RATE",
           "FINETUNE_TRAIN_YEARS", "FINETUNE_VAL_YEARS", "LEARNING_RATE", "MODELS", "PUBLISHED_PARAMS",
           "STARTS_FROM", "build", "finetuned_name", "initial_model", "label", "load_model", "log_path", "params_path",
           "params_provenance", "published_params_path", "save_model", "uses_facies"]


def params_path(name: str, folder: str | Path = "params") -> Path:
    """Where ``train_<name>.py`` writes model ``name``'s parameters (and fine-tuning reads A's)."""
    return Path(folder) / f"{name}.eqx"


def log_path(name: str, folder: str | Path = "logs") -> Path:
    """Where ``train_<name>.py`` writes model ``name``'s training log."""
    return Path(folder) / f"{name}.csv"


def finetuned_name(glacier: str) -> str:
    """The name under which A fine-tuned on ``glacier`` is stored (``params/<it>.eqx``,
    ``logs/<it>.csv``)."""
    return "a_" + glacier.replace(" ", "_")


def params_provenance(path: str | Path) -> dict:
    """Which weights made a result: the parameter file's path and SHA-256 (outputs record it)."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return {"path": str(path), "sha256": digest}


def save_model(model, path: str | Path) -> Path:
    """Write ``model``'s parameter file (``glaunti.params.save_params``) atomically: a crash
    leaves the previous file or the new one (``core.io.atomic_path``)."""
    with atomic_path(path) as tmp:
        save_params(model, tmp)
    return Path(path)


def published_params_path(name: str) -> Path:
    """The published parameter file of model ``name``."""
    return PUBLISHED_PARAMS / f"{spec(name).name}.eqx"


def uses_facies(name: str) -> bool:
    return spec(name).facies


def label(name: str, facies_maps: bool = True) -> str:
    """"D: GlaUnTI with facies" for a legend; a facies model on a glacier without facies maps
    says that it ran without them (the −1 placeholder, C's inputs)."""
    text = f"{name.upper()}: {DESCRIPTIONS[name]}"
    return text + " (no facies maps here)" if uses_facies(name) and not facies_maps else text


def load_model(name: str, path: str | Path):
    """The model ``name`` with the parameters of file ``path`` (a fine-tuned A loads as any A)."""
    return load_params(build(name), path)


def initial_model(name: str, seed: int = DEFAULT_SEED, params_folder: str | Path = "params",
                  start_path=None):
    """The starting point of calibration: A's prior, a random B, C from calibrated A (new corrector),
    D from calibrated C. The default seed reproduces the authors' initial parameters."""
    variant = spec(name)
    model = build(name, jr.PRNGKey(seed))
    if variant.starts_from is None:
        return model
    base = variant.starts_from
    path = Path(start_path) if start_path else params_path(base, params_folder)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: model {name.upper()} starts from calibrated model {base.upper()}; "
            f"run train_{base}.py first (or pass its params file)"
        )
    return variant.inherit(model, load_params(base, path))
