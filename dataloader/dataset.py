"""The dataset: index.csv, normalisation factors, folds, and glaciers one at a time."""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import queue
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import pandas as pd

import constants
from dataloader import reader
from dataloader.cache import GlacierCache, resolve_cache_dir
from dataloader.errors import DataError
from dataloader.layout import NORMALISATION_FACTORS
from dataloader.tensors import GlacierTensors

DATA_FOLDER_ENV = "GLAUNTI_DATA_FOLDER"
INDEX = "index.csv"
NORMALISATION = "normalisation_factors.pkl"
INT_COLUMNS = ("fold", "max_year", "height", "width")
# The factors the models use. Their values live in constants.py: a dataset's file must agree.
NORMALISATION_KEYS = ("elevation", "elevation_std", "t_monthly", "p_monthly")

_REPOSITORY = Path(__file__).resolve().parents[1]


def resolve_data_folder(cli_value: str | Path | None = None) -> Path:
    """Data folder: `cli_value` > env GLAUNTI_DATA_FOLDER > `constants.data_folder`.

    The first two are taken as given (relative to the working directory, like any command-line
    path); the constants default is relative to the repository root, where scripts run from.
    """
    if cli_value:
        return Path(cli_value).expanduser()
    if os.environ.get(DATA_FOLDER_ENV):
        return Path(os.environ[DATA_FOLDER_ENV]).expanduser()
    return _REPOSITORY / constants.data_folder


def read_index(path: Path) -> list[reader.GlacierInfo]:
    """Rows of index.csv, validated (columns, integer fields, unique safe names)."""
    if not path.is_file():
        raise DataError(path, None, "is missing (required file)")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as error:
        raise DataError(path, None, f"could not be read as CSV ({error})") from error
    columns = [f.name for f in dataclasses.fields(reader.GlacierInfo)]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(path, f"columns {missing}", f"are missing (found {list(table.columns)})")
    glaciers = []
    for i, row in enumerate(table.to_dict("records")):
        values = {}
        for column in columns:
            text = row[column]
            if column in INT_COLUMNS:
                try:
                    values[column] = int(text)
                except ValueError:
                    raise DataError(path, f"column {column!r}, line {i + 2},",
                                    f"is {text!r}, expected an integer") from None
            else:
                values[column] = text
        glaciers.append(reader.GlacierInfo(**values))
    names = [g.name for g in glaciers]
    for g in glaciers:
        # The name is a folder name under the data folder: no separators, no '.'/'..'.
        if g.name in ("", ".", "..") or "/" in g.name or "\\" in g.name:
            raise DataError(path, "column 'name'", f"holds {g.name!r}, expected a folder name")
        if names.count(g.name) > 1:
            raise DataError(path, "column 'name'", f"repeats {g.name!r}, expected unique names")
        if g.max_year < constants.initialisation_period_start_year:
            raise DataError(path, f"max_year of {g.name!r}", f"is {g.max_year}, expected ≥ "
                            f"{constants.initialisation_period_start_year}")
    return glaciers


def read_normalisation(path: Path) -> dict[str, float]:
    """normalisation_factors.pkl: a dict str → positive float with at least NORMALISATION_KEYS,
    each equal to the published value in constants.py.

    The divisors belong to the published weights, not to the data at hand, and their one home is
    constants.py (the models divide by those values); a file with other values is refused rather
    than used for the monthly climate alone.
    """
    if not path.is_file():
        raise DataError(path, None, "is missing (required file)")
    try:
        with open(path, "rb") as file:
            factors = pickle.load(file)
    except Exception as error:
        raise DataError(path, None, f"could not be unpickled ({error})") from error
    if not isinstance(factors, dict):
        raise DataError(path, None, f"holds a {type(factors).__name__}, expected a dict")
    for key in NORMALISATION_KEYS:
        value = factors.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise DataError(path, f"key {key!r}", f"is {value!r}, expected a positive number")
    for key in NORMALISATION_KEYS:
        if float(factors[key]) != NORMALISATION_FACTORS[key]:
            raise DataError(path, f"key {key!r}", f"is {factors[key]!r}, expected the published "
                            f"{NORMALISATION_FACTORS[key]!r} (constants.py) that the models use")
    return {str(k): float(v) for k, v in factors.items()}


class FoldSplit(NamedTuple):
    """Glacier names of one split of the folds, each list in index.csv order."""

    train: list[str]
    val: list[str]
    test: list[str]


class Dataset:
    """A GlaUnTI dataset folder (docs/data_format.md).

    Args:
        data_folder: dataset root; None resolves it with `resolve_data_folder()`.
        use_cache: keep prepared glaciers on disk (`dataloader.cache`).
        cache_dir: cache root; None resolves it with `resolve_cache_dir()`.
    """

    def __init__(
        self,
        data_folder: str | Path | None = None,
        *,
        use_cache: bool = True,
        cache_dir: str | Path | None = None,
    ):
        self.folder = resolve_data_folder(data_folder)
        self.index_path = self.folder / INDEX
        self.normalisation_path = self.folder / NORMALISATION
        self._info = {g.name: g for g in read_index(self.index_path)}
        self.normalisation = read_normalisation(self.normalisation_path)
        self.cache = GlacierCache(resolve_cache_dir(self.folder, cache_dir)) if use_cache else None

    @property
    def names(self) -> list[str]:
        """All glacier names, in index.csv order."""
        return list(self._info)

    @property
    def folds(self) -> dict[str, int]:
        return {name: info.fold for name, info in self._info.items()}

    @property
    def fold_ids(self) -> list[int]:
        """The distinct folds of index.csv, ascending."""
        return sorted(set(self.folds.values()))

    def split(self, test_fold: int = constants.test_fold, val_fold: int = constants.val_fold) -> FoldSplit:
        """Training, validation and test glaciers (index.csv order) when fold ``test_fold`` is
        held out for testing and ``val_fold`` picks the best epoch; every other fold trains.
        The defaults are the published split (``constants.test_fold``, ``constants.val_fold``)."""
        if test_fold == val_fold:
            raise ValueError(f"test fold and validation fold are both {test_fold}, expected two folds")
        folds = self.folds
        return FoldSplit(train=[n for n, f in folds.items() if f not in (test_fold, val_fold)],
                         val=[n for n, f in folds.items() if f == val_fold],
                         test=[n for n, f in folds.items() if f == test_fold])

    @property
    def test_names(self) -> list[str]:
        return self.split().test

    @property
    def val_names(self) -> list[str]:
        return self.split().val

    @property
    def train_names(self) -> list[str]:
        return self.split().train

    def info(self, name: str) -> reader.GlacierInfo:
        """The index.csv row of a glacier."""
        try:
            return self._info[name]
        except KeyError:
            raise DataError(self.index_path, "column 'name'",
                            f"has no glacier {name!r}; available: {self.names}") from None

    def glacier(self, name: str) -> GlacierTensors:
        """The prepared tensors of one glacier, from the cache when it is up to date."""
        info = self.info(name)
        folder = self.folder / name

        def build(allocate=None):
            return reader.read_glacier(folder, info, self.normalisation, allocate)

        if self.cache is None:
            return build()
        sources = [*reader.source_files(folder), self.index_path, self.normalisation_path]
        return self.cache.load_or_build(name, sources, build)

    def iter_glaciers(
        self, names: Iterable[str] | None = None, *, prefetch: bool = False
    ) -> Iterator[GlacierTensors]:
        """Yield the glaciers one at a time (all of them when `names` is None).

        Only the glacier being consumed (and, with `prefetch`, the next one, prepared in a
        background thread) is alive, so memory does not grow with the number of glaciers as
        long as the caller drops each glacier before asking for the next. An error while
        loading is raised here with a note naming the glacier.
        """
        names = self.names if names is None else list(names)
        for name in names:
            self.info(name)  # unknown names fail before any loading
        return _prefetched(self.glacier, names) if prefetch else _sequential(self.glacier, names)


def _sequential(load, names: list[str]) -> Iterator[GlacierTensors]:
    for name in names:
        try:
            glacier = load(name)
        except Exception as error:
            error.add_note(f"while loading glacier {name!r}")
            raise
        yield glacier
        del glacier  # so that only the caller keeps it alive while the next one loads


def _prefetched(load, names: list[str]) -> Iterator[GlacierTensors]:
    """Like `_sequential`, but the next glacier is loaded in a thread while the caller works
    on the current one (depth 1: the thread starts a glacier only once the previous one was
    taken)."""
    ready: queue.Queue = queue.Queue(maxsize=1)
    may_load = threading.Semaphore(1)
    stop = threading.Event()

    def worker():
        for name in names:
            while not may_load.acquire(timeout=0.1):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            try:
                item = (name, load(name), None)
            except BaseException as error:  # handed to the consumer, never swallowed
                item = (name, None, error)
            ready.put(item)
            if item[2] is not None:
                return
            del item

    thread = threading.Thread(target=worker, name="glaunti-prefetch", daemon=True)
    thread.start()
    try:
        for _ in names:
            name, glacier, error = ready.get()
            may_load.release()
            if error is not None:
                error.add_note(f"while loading glacier {name!r} (prefetch thread)")
                raise error
            yield glacier
            del glacier
    finally:
        stop.set()
        thread.join()
