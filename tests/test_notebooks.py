"""The three analysis notebooks run top to bottom on the synthetic twin's tiny preset (fast sizes)
and their key numbers say what the analyses should: the offset balances the glacier, integrated
gradients are complete, first-order spread agrees with Monte Carlo where the model is near-linear."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from glaunti.analysis import BLOCK_DAYS, SIGMA_LOG_PRECIPITATION, SIGMA_TEMPERATURE

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
KERNEL = "glaunti-test"


@pytest.fixture(scope="module")
def notebook_env(tiny_twin, tmp_path_factory):
    """Environment of the notebook kernels: this interpreter as the kernel, the tiny twin as the
    data, fast sizes, and one output folder shared by the three notebooks (the second and third
    reuse the first one's fine-tuned model A)."""
    kernels = tmp_path_factory.mktemp("jupyter")
    spec = kernels / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "GlaUnTI test kernel",
        "language": "python",
    }))
    out = tmp_path_factory.mktemp("notebooks")
    patch = pytest.MonkeyPatch()
    for key, value in {
        "JUPYTER_PATH": str(kernels),
        "GLAUNTI_DATA_FOLDER": str(tiny_twin),
        "GLAUNTI_NOTEBOOK_FAST": "1",
        "GLAUNTI_NOTEBOOK_OUT": str(out),
        "PYTHONPATH": str(REPO),
        "MPLBACKEND": "Agg",
    }.items():
        patch.setenv(key, value)
    patch.delenv("GLAUNTI_NOTEBOOK_GLACIER", raising=False)
    yield out
    patch.undo()


def execute(name: str, out: Path) -> dict:
    notebook = nbformat.read(REPO / f"{name}.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        f"{name}.ipynb is committed with outputs"
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()
    summary = json.loads((out / f"{name}.json").read_text())
    for figure in summary["figures"]:
        assert (out / figure).stat().st_size > 10_000, figure
    return summary


def test_inverse_modelling_notebook(notebook_env):
    summary = execute("inverse_modelling", notebook_env)
    assert len(summary["figures"]) == 3
    assert abs(summary["balance_with_mwe"]) < 0.1 * abs(summary["balance_without_mwe"])
    assert summary["offset_c"] * summary["balance_without_mwe"] > 0  # cooler for a shrinking glacier
    years = summary["window"][1] - summary["window"][0] + 1
    assert abs(summary["cumulative_smb_with_mwe"] / years - summary["balance_with_mwe"]) < 1e-3


def test_xai_notebook(notebook_env):
    summary = execute("xai", notebook_env)
    assert len(summary["figures"]) == 2
    assert summary["completeness_relative_gap"] < 0.02
    total = summary["attribution_temperature_mwe"] + summary["attribution_precipitation_mwe"]
    assert abs(total - summary["difference_mwe"]) < 0.02 * abs(summary["difference_mwe"]) + 1e-4


def test_aleatoric_notebook(notebook_env):
    summary = execute("aleatoric_uq", notebook_env)
    assert len(summary["figures"]) == 2
    # The published errors come from their one home in the library, not re-typed in the notebook.
    assert summary["sigma_temperature_c"] == SIGMA_TEMPERATURE
    assert summary["sigma_log_precipitation"] == SIGMA_LOG_PRECIPITATION
    assert summary["block_days"] == BLOCK_DAYS
    assert summary["cumulative_smb_std_mwe"] > 0
    assert summary["small_errors_agree"], summary
    # With the full log-normal precipitation error the ensemble is wider than first order says.
    assert summary["variance_ratio_full_errors"] > 1
