"""core.apps.notebook.setup, the cell the three analysis notebooks share: it picks the dataset,
glacier and output folder from its arguments, then the environment, then the defaults; loads
model A from a parameter file when there is one; and writes figures and key numbers where the
notebook tests look for them. (Its fine-tuning fallback runs in tests/test_notebooks.py.)"""

from __future__ import annotations

import json

import pytest
from matplotlib.figure import Figure

import constants
from core.apps.notebook import fast_mode, setup
from dataloader import DataError, Dataset
from glaunti import PARAM_NAMES, TIModel, save_params


@pytest.fixture
def environment(tiny_twin, monkeypatch, tmp_path):
    monkeypatch.setenv("GLAUNTI_DATA_FOLDER", str(tiny_twin))
    monkeypatch.setenv("GLAUNTI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GLAUNTI_NOTEBOOK_GLACIER", raising=False)
    monkeypatch.delenv("GLAUNTI_NOTEBOOK_FAST", raising=False)
    monkeypatch.setenv("GLAUNTI_NOTEBOOK_OUT", str(tmp_path / "out"))
    # A model A that is not the prior, so that loading it is told apart from fine-tuning.
    model = TIModel.prior()
    model = type(model)(**{name: getattr(model, name) + 0.125 for name in PARAM_NAMES})
    params = tmp_path / "a.eqx"
    save_params(model, params)
    return tmp_path, params, model


def test_setup_loads_model_a_and_writes_where_the_tests_look(environment, tiny_twin, monkeypatch):
    tmp_path, params, model = environment
    nb = setup("demo", params=params)
    assert nb.glacier == Dataset(tiny_twin).test_names[0] and nb.out == tmp_path / "out"
    assert nb.fast is False and fast_mode() is False
    for name in PARAM_NAMES:
        assert float(getattr(nb.model, name)) == float(getattr(model, name))
    assert nb.arrays.shape == nb.tensors.outlines.shape[1:]
    assert nb.study_years.min() == constants.study_period_start_year and nb.years.size == nb.tensors.outlines.shape[0]

    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    assert nb.save(fig, "line") == tmp_path / "out" / "demo_line.png"
    written = nb.write_summary({"offset_c": -0.5})
    on_disk = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert on_disk == written == {"glacier": nb.glacier, "fast": False, "offset_c": -0.5,
                                  "figures": ["demo_line.png"]}

    monkeypatch.setenv("GLAUNTI_NOTEBOOK_FAST", "1")
    other = Dataset(tiny_twin).names[-1]
    monkeypatch.setenv("GLAUNTI_NOTEBOOK_GLACIER", other)
    nb = setup("demo", params=params, out=tmp_path / "elsewhere")
    assert nb.glacier == other and nb.fast is True and (tmp_path / "elsewhere").is_dir()
    assert setup("demo", glacier=nb.dataset.names[0], params=params).glacier == nb.dataset.names[0]


def test_setup_names_what_is_missing(environment, monkeypatch):
    _, params, _ = environment
    with pytest.raises(DataError, match=r"index\.csv: column 'name' has no glacier 'Nowhere'"):
        setup("demo", glacier="Nowhere", params=params)
    monkeypatch.setattr(Dataset, "test_names", property(lambda self: []))
    with pytest.raises(DataError, match=r"index\.csv: column 'fold' has no test glacier .*GLAUNTI_NOTEBOOK_GLACIER"):
        setup("demo", params=params)
