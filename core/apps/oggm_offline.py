"""OGGM (and salem) imported and initialised offline, in a cache folder of the run's own.

``import oggm`` imports salem, which downloads its sample data into ``~/.salem_cache`` unless a
file ``salem-sample-data-<pinned commit>.zip`` is there; ``cfg.initialize()`` reads seven small
files from ``~/.oggm/oggm-sample-data-<pinned commit>/`` and downloads that folder when absent;
and OGGM writes ``~/.oggm_config`` on import when it is missing. Neither package lets one point
those paths elsewhere before import (they are module globals computed from ``~``), so
:func:`import_oggm` fills a project-owned home (``<work_dir>/oggm_home``) with the bundled files
(``examples/oggm_init/``, see its README) and imports both packages with ``HOME`` pointing there
for the duration of the import only. The user's own ``~/.oggm*`` and ``~/.salem_cache`` are
neither read nor written. After import OGGM runs with ``has_internet = False``: any attempt to
download raises OGGM's ``NoInternetException`` instead of reaching for the network.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

from core.execute.distributed import temporary_environ
from core.io import atomic_write_text

REPOSITORY = Path(__file__).resolve().parents[2]
OGGM_INIT = REPOSITORY / "examples" / "oggm_init"
EXTRA = "oggm"


class MissingExtraError(ImportError):
    """The optional extra ``glaunti[oggm]`` is not installed."""


def require_oggm() -> None:
    """Raise :class:`MissingExtraError` naming the first missing package of the extra."""
    for package in ("oggm", "salem"):
        if importlib.util.find_spec(package) is None:
            raise MissingExtraError(
                f"package {package!r} is not installed: glacier evolution needs the optional extra "
                f"{EXTRA!r} (pip install -e '.[{EXTRA}]', or `make install`)")


def _pinned_commit(package: str, relative: str, pattern: str) -> str:
    """The sample-data commit a package pins, read from its source without importing it (the
    import itself is what would download)."""
    path = Path(importlib.util.find_spec(package).origin).parent / relative
    match = re.search(pattern, path.read_text())
    if match is None:
        raise ImportError(f"{path}: no pinned sample-data commit found ({pattern!r}); "
                          "this version of the package is not supported offline")
    return match.group(1)


def _fill_home(home: Path) -> None:
    """The files OGGM and salem look for under ``~``, in ``home`` (idempotent)."""
    oggm_commit = _pinned_commit("oggm", "utils/_downloads.py", r"SAMPLE_DATA_COMMIT = '([0-9a-f]+)'")
    salem_commit = _pinned_commit("salem", "__init__.py", r"sample_data_gh_commit = '([0-9a-f]+)'")
    sample = home / ".oggm" / f"oggm-sample-data-{oggm_commit}"
    for source in sorted(OGGM_INIT.rglob("*")):
        if source.is_file() and source.name != "README.md":
            target = sample / source.relative_to(OGGM_INIT)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
    salem_zip = home / ".salem_cache" / f"salem-sample-data-{salem_commit}.zip"
    if not salem_zip.exists():
        salem_zip.parent.mkdir(parents=True, exist_ok=True)
        # salem only tests that the zip exists; an empty archive keeps it from downloading.
        with zipfile.ZipFile(salem_zip, "w"):
            pass
    config = home / ".oggm_config"
    if not config.exists():
        downloads = home / "OGGM"
        atomic_write_text(
            config,
            f"dl_cache_dir = {downloads / 'download_cache'}\n"
            "dl_cache_readonly = False\n"
            f"tmp_dir = {downloads / 'tmp'}\n"
            f"rgi_dir = {downloads / 'rgi'}\n"
            f"test_dir = {downloads / 'tests'}\n"
            "has_internet = False\n")


def import_oggm(work_dir: str | os.PathLike, verbose: bool = True):
    """Import OGGM offline and initialise it for one run; returns ``oggm.cfg``.

    ``work_dir/oggm_home`` receives OGGM's and salem's sample-data folders and config; OGGM's
    working directory is ``work_dir/oggm``. In a process that imported OGGM already (the user's
    own set-up), the import is left alone and only the cache paths are redirected. ``verbose``
    False silences OGGM's log (its workflow messages sit above WARNING; its errors still raise)."""
    require_oggm()
    home = Path(work_dir).resolve() / "oggm_home"
    _fill_home(home)
    if "oggm" not in sys.modules:
        # matplotlib resolves its own config and cache folders from HOME: settle them first.
        import matplotlib.font_manager  # noqa: F401

        with temporary_environ({"HOME": str(home)}):
            import oggm  # noqa: F401
            import oggm.core.flowline  # noqa: F401
            import oggm.core.massbalance  # noqa: F401
            import oggm.tasks  # noqa: F401
            import oggm.workflow  # noqa: F401
            import salem  # noqa: F401
    from oggm import cfg

    cfg.CACHE_DIR = str(home / ".oggm")
    cfg.initialize(logging_level="WARNING" if verbose else "CRITICAL")
    cfg.PARAMS["has_internet"] = False
    for key in ("dl_cache_dir", "tmp_dir", "rgi_dir", "test_dir"):
        cfg.PATHS[key] = str(home / "OGGM" / key.removesuffix("_dir"))
    cfg.PATHS["working_dir"] = str(Path(work_dir).resolve() / "oggm")
    Path(cfg.PATHS["working_dir"]).mkdir(parents=True, exist_ok=True)
    cfg.PARAMS["use_multiprocessing"] = False
    # One outline, no neighbours: OGGM's intersects are a download we do not need.
    cfg.PARAMS["use_intersects"] = False
    return cfg
