"""GlaUnTI surface-mass-balance models (docs/model.md §1–4).

- :class:`TIModel` — model A, the differentiable temperature-index model;
- :class:`GRUModel` — model B, the per-cell GRU baseline;
- :class:`Corrector`, :class:`GlaUnTI` — models C and D (frozen TI + CNN corrector);
- :mod:`glaunti.registry` — the variants A–D by name; :mod:`glaunti.glacier` — the engine
  that runs any of them over a glacier's years;
- :func:`load_params` / :func:`save_params` — ``.eqx`` files interchangeable with the
  published ones.
"""

from glaunti.corrector import Corrector
from glaunti.gru_model import GRUModel
from glaunti.params import ParamsError, leaf_manifest, load_params, save_params, template
from glaunti.ti_corr_model import GlaUnTI
from glaunti.ti_model import (
    CALIBRATED,
    PARAM_NAMES,
    TIModel,
    TIParams,
    default_weights,
    prior_penalty,
    ti_day_step,
)

__all__ = [
    "CALIBRATED",
    "PARAM_NAMES",
    "Corrector",
    "GRUModel",
    "GlaUnTI",
    "ParamsError",
    "TIModel",
    "TIParams",
    "default_weights",
    "leaf_manifest",
    "load_params",
    "prior_penalty",
    "save_params",
    "template",
    "ti_day_step",
]
