"""The training checkpoint: everything a resumed run needs to end bit-identical to an
uninterrupted one (current and best parameters, optimiser state, epoch counters).

It lives next to the parameters file as ``<params>.ckpt`` and is rewritten atomically after every
epoch, so an interrupted run leaves the last complete epoch behind, never half a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import numpy as np

from core.io import atomic_path


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read (truncated, or written for another model)."""


def checkpoint_path(params_path: Path) -> Path:
    """``<params_path>.ckpt``: the checkpoint that belongs to a parameters file."""
    return Path(str(params_path) + ".ckpt")


@dataclass
class Checkpoint:
    """The training state after ``epoch``: ``trainable`` and ``best_trainable`` are Equinox
    trees of the trained leaves, ``opt_state`` the optax state, ``best_val`` the best validation
    loss so far (inf before any) and ``best_epoch`` the epoch it was reached."""

    trainable: object
    best_trainable: object
    opt_state: object
    epoch: int
    best_epoch: int
    best_val: float

    def _tree(self) -> tuple:
        return (self.trainable, self.best_trainable, self.opt_state,
                np.int64(self.epoch), np.int64(self.best_epoch), np.float64(self.best_val))

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            eqx.tree_serialise_leaves(tmp, self._tree())

    @classmethod
    def load(cls, path: Path, like: "Checkpoint") -> "Checkpoint":
        """Read ``path`` into the structure of ``like`` (a freshly initialised state)."""
        try:
            t, b, o, e, be, bv = eqx.tree_deserialise_leaves(path, like._tree())
        except Exception as err:  # a truncated or foreign file
            raise CheckpointError(f"{path}: cannot read training checkpoint ({err}); delete it or "
                                  "run without --resume") from None
        return cls(t, b, o, int(e), int(be), float(bv))
