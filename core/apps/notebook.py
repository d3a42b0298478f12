"""The setup the analysis notebooks share (docs/notebooks.md): which data, which glacier, where
the figures go, and a model A to analyse.

Each notebook calls :func:`setup` once::

    nb = setup("xai")
    ... analysis.integrated_gradients(nb.model, nb.arrays, ...)
    nb.save(fig, "monthly")          # <out>/xai_monthly.png
    nb.write_summary({...})          # <out>/xai.json

The environment picks what the notebooks do not set themselves, so that a test (or a headless
run) can point them at another dataset, glacier or output folder:

- ``GLAUNTI_DATA_FOLDER``: the dataset (else the project default);
- ``GLAUNTI_NOTEBOOK_GLACIER``: the glacier (else the dataset's first test glacier);
- ``GLAUNTI_NOTEBOOK_OUT``: figures, key numbers and fine-tuned models (else ``outputs/notebooks``);
- ``GLAUNTI_NOTEBOOK_FAST=1``: small sizes everywhere, for tests and quick looks.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

import constants
from core.io import atomic_path, atomic_write_json
from core.models import FINETUNE_EPOCHS, load_model, params_path, save_model
from core.workflows import finetune
from dataloader import DataError, Dataset, resolve_data_folder
from dataloader.tensors import GlacierTensors
from glaunti import TIModel
from glaunti.layouts import GlacierArrays, make_arrays

FAST_ENV = "GLAUNTI_NOTEBOOK_FAST"
GLACIER_ENV = "GLAUNTI_NOTEBOOK_GLACIER"
OUT_ENV = "GLAUNTI_NOTEBOOK_OUT"
DEFAULT_OUT = Path("outputs/notebooks")
DEFAULT_PARAMS = params_path("a")  # calibrated model A (train_a.py)
FAST_FINETUNE_EPOCHS = 5


def fast_mode() -> bool:
    """True when ``GLAUNTI_NOTEBOOK_FAST=1``: the notebooks then shrink every size."""
    return os.environ.get(FAST_ENV) == "1"


@dataclasses.dataclass
class NotebookSession:
    """One notebook's glacier, model A and output folder; collects the figure file names."""

    notebook: str  # file names start with it: <out>/<notebook>_<figure>.png, <out>/<notebook>.json
    out: Path
    fast: bool
    dataset: Dataset
    glacier: str
    tensors: GlacierTensors
    arrays: GlacierArrays  # the "exact" layout, which the analyses run on
    model: TIModel
    figures: list[str] = dataclasses.field(default_factory=list)

    @property
    def years(self) -> np.ndarray:
        """(Y,) balance-year labels, spin-up included."""
        return np.asarray(self.tensors.years)

    @property
    def study_years(self) -> np.ndarray:
        """Balance-year labels of the study period."""
        return self.years[np.asarray(self.tensors.study)]

    def save(self, fig, name: str) -> Path:
        """Save a matplotlib figure as <out>/<notebook>_<name>.png (and list it in the summary)."""
        path = self.out / f"{self.notebook}_{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png")
        self.figures.append(path.name)
        return path

    def write_summary(self, numbers: dict) -> dict:
        """Write the key numbers, with the glacier, the fast flag and the figures, to
        <out>/<notebook>.json; returns what was written."""
        summary = {"glacier": self.glacier, "fast": self.fast, **numbers, "figures": list(self.figures)}
        atomic_write_json(self.out / f"{self.notebook}.json", summary)
        return summary


def finetuned_model_a(dataset: Dataset, glacier: str, tensors: GlacierTensors, out: Path,
                      epochs: int) -> TIModel:
    """Model A fine-tuned on ``glacier`` from the prior: the early study years train it, the last
    third of them validates it. Kept as <out>/a_finetuned_<glacier>_<epochs>epochs.eqx and reused
    from there (by the other notebooks too) until that file is deleted."""
    cached = out / f"a_finetuned_{glacier.replace(' ', '_')}_{epochs}epochs.eqx"
    if cached.exists():
        print(f"model A fine-tuned earlier on {glacier}: {cached} (delete it to fine-tune again)")
        return load_model("a", cached)
    years = np.asarray(tensors.years)
    study_years = years[np.asarray(tensors.study)]
    n_val = max(1, len(study_years) // 3)
    train = (int(study_years[0]), int(study_years[-n_val - 1]))
    val = (int(study_years[-n_val]), int(study_years[-1]))
    print(f"fine-tuning model A on {glacier} from the prior, {epochs} epochs, "
          f"training {train[0]}–{train[1]}, validation {val[0]}–{val[1]}")
    with tempfile.TemporaryDirectory(prefix="glaunti_notebook_") as work:
        work = Path(work)
        save_model(TIModel.prior(), work / "prior.eqx")
        # Fine-tuned away from the cache path, which then only ever holds a finished run.
        model, _ = finetune(glacier, dataset.folder, init_params_path=work / "prior.eqx",
                            final_params_path=work / "a.eqx", log_path=work / "finetune.csv",
                            epochs=epochs, train_years=train, val_years=val, show_progress=False)
        shutil.copy(work / "a.eqx", cached)
    return model


def setup(notebook: str, glacier: str | None = None, params: str | Path = DEFAULT_PARAMS,
          finetune_epochs: int | None = None, data_folder: str | Path | None = None,
          out: str | Path | None = None) -> NotebookSession:
    """Everything a notebook needs before its analysis: the dataset (``data_folder``, else
    ``GLAUNTI_DATA_FOLDER``, else the project default), the glacier (``glacier``, else
    ``GLAUNTI_NOTEBOOK_GLACIER``, else the first test glacier), the output folder (``out``, else
    ``GLAUNTI_NOTEBOOK_OUT``, else outputs/notebooks; created) and model A: ``params`` if that
    file exists, else fine-tuned on the glacier from the prior (:func:`finetuned_model_a`, with
    ``finetune_epochs``, default ``core.models.FINETUNE_EPOCHS``, or 5 in fast mode)."""
    fast = fast_mode()
    out = Path(out or os.environ.get(OUT_ENV) or DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    dataset = Dataset(resolve_data_folder(data_folder))
    glacier = glacier or os.environ.get(GLACIER_ENV)
    if not glacier:
        if not dataset.test_names:
            raise DataError(dataset.index_path, "column 'fold'",
                            f"has no test glacier (fold {constants.test_fold}) to analyse by default; "
                            f"name one with {GLACIER_ENV}")
        glacier = dataset.test_names[0]
    tensors = dataset.glacier(glacier)
    params = Path(params)
    if params.exists():
        print(f"model A from {params}")
        model = load_model("a", params)
    else:
        if finetune_epochs is None:
            finetune_epochs = FAST_FINETUNE_EPOCHS if fast else FINETUNE_EPOCHS
        print(f"no {params}")
        model = finetuned_model_a(dataset, glacier, tensors, out, finetune_epochs)
    return NotebookSession(notebook, out, fast, dataset, glacier, tensors, make_arrays(tensors), model)
