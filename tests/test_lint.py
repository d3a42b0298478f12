"""The repository passes the linter configured in pyproject.toml ([tool.ruff]).

ruff is part of the ``dev`` extra, so it is always there when the tests are.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ruff_check(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m ruff check`` in the repository root (its pyproject.toml applies)."""
    return subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *args],
        cwd=REPO, input=stdin, capture_output=True, text=True, timeout=300,
    )


def findings(source: str, filename: str = "glaunti/_lint_probe.py") -> set[str]:
    """Rule codes ruff reports for ``source`` as if it were ``filename`` (nothing is written)."""
    result = ruff_check("--stdin-filename", filename, "-", stdin=source)
    assert result.returncode in (0, 1), result.stderr
    return {line.split(": ")[1].split()[0] for line in result.stdout.splitlines() if ": " in line
            and line.startswith(filename)}


def test_repository_is_lint_clean():
    result = ruff_check(".")
    assert result.returncode == 0, f"ruff check . found:\n{result.stdout}{result.stderr}"


def test_configuration_applies():
    # Known answers that only hold with this project's [tool.ruff] settings.
    assert findings("import os\n") == {"F401"}
    assert findings("import numpy\nimport os\n\nprint(os, numpy)\n") == {"I001"}
    # jaxtyping shape strings are not flagged (F722 ignored) ...
    assert findings('from jaxtyping import Array, Float\n\nx: Float[Array, "T H W"]\n') == set()
    # ... lines up to 120 columns pass, longer ones do not.
    assert findings(f"x = {'1' * 114}\n") == set()
    assert findings(f"x = {'1' * 117}\n") == {"E501"}
    # `from conftest import` in tests/ sorts with the project's own modules.
    test_file = ("import pytest\n\nimport constants\nfrom conftest import REFERENCE\n\n"
                 "print(pytest, constants, REFERENCE)\n")
    assert findings(test_file, "tests/test_lint_probe.py") == set()


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Run import-linter (``[tool.importlinter]`` of pyproject.toml) on the packages under ``root``."""
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=300,
    )


def test_layers_are_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, f"lint-imports found:\n{result.stdout[-4000:]}{result.stderr[-2000:]}"
    assert "0 broken" in result.stdout


def test_an_import_against_the_layers_is_caught(tmp_path):
    """Inference importing training (what the layers forbid) breaks the contract."""
    for package in ("core", "glaunti", "dataloader"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    runner = tmp_path / "core" / "infer" / "runner.py"
    runner.write_text(runner.read_text() + "\nfrom core.train.loop import train  # noqa: E402,F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "core.infer.runner -> core.train.loop" in result.stdout, result.stdout[-4000:]
