"""Glaciers as device arrays for calibration and inference, streamed from the tensor cache."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import equinox as eqx
import jax
import numpy as np

from dataloader import Dataset
from glaunti.glacier import GlacierArrays, make_arrays

# Glaciers whose device arrays add up to less than this stay resident between epochs; beyond it
# they are re-read from the (memory-mapped) cache every epoch so that memory does not grow with
# the number of glaciers.
DEFAULT_RESIDENT_BYTES = 2 * 1024**3


def nbytes(arrays: GlacierArrays) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(arrays))


def with_study_years(arrays: GlacierArrays, years: np.ndarray, first: int, last: int) -> GlacierArrays:
    """The same glacier with only study years in [first, last] scored (others still run)."""
    keep = (years >= first) & (years <= last)
    return eqx.tree_at(lambda a: a.study, arrays, arrays.study & keep)


class GlacierSet:
    """A re-iterable set of glaciers: ``for name, arrays in glacier_set()``."""

    def __init__(self, dataset: Dataset, names: Sequence[str], facies: bool,
                 resident_bytes: int = DEFAULT_RESIDENT_BYTES,
                 transform: Callable[[str, GlacierArrays], GlacierArrays] | None = None):
        self.dataset, self.names, self.facies = dataset, list(names), facies
        self.budget, self.transform = resident_bytes, transform
        self._resident: dict[str, GlacierArrays] = {}
        self._used = 0

    def __call__(self) -> Iterable[tuple[str, GlacierArrays]]:
        missing = [n for n in self.names if n not in self._resident]
        fresh = iter(self.dataset.iter_glaciers(missing)) if missing else iter(())
        for name in self.names:
            if name in self._resident:
                yield name, self._resident[name]
                continue
            tensors = next(fresh)
            arrays = make_arrays(tensors, facies=self.facies)
            if self.transform is not None:
                arrays = self.transform(name, arrays)
            size = nbytes(arrays)
            if self._used + size <= self.budget:
                self._resident[name] = arrays
                self._used += size
            yield name, arrays

    def __len__(self) -> int:
        return len(self.names)
