"""Glaciers as device arrays for calibration and inference, streamed from the tensor cache."""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import equinox as eqx
import jax
import numpy as np

from dataloader import Dataset
from glaunti.layouts import GlacierArrays, make_arrays

# Glaciers whose device arrays add up to less than this stay resident between epochs; beyond it
# they are re-read from the (memory-mapped) cache every epoch so that memory does not grow with
# the number of glaciers.
DEFAULT_RESIDENT_BYTES = 2 * 1024**3


def nbytes(arrays: GlacierArrays) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(arrays))


def with_study_years(arrays: GlacierArrays, years: np.ndarray, first: int, last: int) -> GlacierArrays:
    """The same glacier with only study years in [first, last] scored (others still run).
    ``years`` are the glacier's real years; padded years of a training layout stay unscored."""
    years = np.asarray(years)
    years = np.concatenate([years, np.full(arrays.n_years - len(years), -1, years.dtype)])
    keep = (years >= first) & (years <= last)
    return eqx.tree_at(lambda a: a.study, arrays, arrays.study & keep)


class GlacierSet:
    """A re-iterable set of glaciers: ``for name, arrays in glacier_set()``.

    ``layout`` is the ``glaunti.layouts`` layout of the arrays ("exact", or the training layouts
    "padded"/"cells" that share compiled functions between glaciers). Glaciers stay resident
    (on their device) while their arrays add up to less than :data:`DEFAULT_RESIDENT_BYTES`; the
    others are re-read from the memory-mapped cache when needed, so host memory does not grow with the
    number of glaciers. The trainer asks for this process's glaciers only, each on its device,
    through :meth:`iter_placed`.
    """

    def __init__(self, dataset: Dataset, names: Sequence[str], facies: bool, layout: str = "exact"):
        self.dataset, self.names, self.facies, self.layout = dataset, list(names), facies, layout
        self.budget = DEFAULT_RESIDENT_BYTES
        self._resident: dict[str, GlacierArrays] = {}
        self._used = 0

    def _make(self, name, tensors, device=None) -> GlacierArrays:
        arrays = make_arrays(tensors, facies=self.facies, layout=self.layout, device=device)
        size = nbytes(arrays)
        if self._used + size <= self.budget:
            self._resident[name] = arrays
            self._used += size
        return arrays

    def __call__(self) -> Iterable[tuple[str, GlacierArrays]]:
        for _, name, arrays in self.iter_placed([(i, None) for i in range(len(self.names))]):
            yield name, arrays

    def iter_placed(self, placed: Sequence[tuple[int, object]]) -> Iterator[tuple[int, str, GlacierArrays]]:
        """``(i, name, arrays)`` for the given ``(index, device)`` pairs, arrays on ``device``
        (None: JAX's default device)."""
        placed = list(placed)
        missing = [self.names[i] for i, _ in placed if self.names[i] not in self._resident]
        fresh = iter(self.dataset.iter_glaciers(missing)) if missing else iter(())
        for i, device in placed:
            name = self.names[i]
            arrays = self._resident.get(name)
            if arrays is None:
                arrays = self._make(name, next(fresh), device)
            elif device is not None:
                arrays = jax.device_put(arrays, device)  # no-op when already there
            yield i, name, arrays

    def __len__(self) -> int:
        return len(self.names)
