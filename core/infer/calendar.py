"""The calendar of daily SMB output: a glacier's balance years, as the model runs them, placed
on consecutive calendar days."""

from __future__ import annotations

import warnings

import numpy as np


class Calendar:
    """Places one glacier's study years, as the model runs them, on the calendar.

    :meth:`add` takes year k's daily series (T, H, W) and returns the ``(first_day, smb)``
    pieces of consecutive days that are final; :meth:`finish` returns the rest. A day shared by
    two balance years (a year boundary) holds the sum of both; days between two years that no
    year models hold 0, with a warning."""

    def __init__(self, tensors):
        self.tensors = tensors
        self.pending_day, self.pending = None, None

    def add(self, k: int, series: np.ndarray) -> list[tuple[int, np.ndarray]]:
        tensors = self.tensors
        begin, end = int(tensors.begin_day[k]), int(tensors.end_day[k])
        year = np.zeros((end - begin + 1,) + series.shape[1:], dtype=np.float32)
        valid = np.asarray(tensors.day_valid[k])
        np.add.at(year, np.asarray(tensors.day_index[k])[valid] - begin, series[valid])
        out = []
        pending = self.pending
        if pending is not None:
            overlap = self.pending_day + len(pending) - begin
            if overlap > 0:
                year[:overlap] += pending[len(pending) - overlap:]
                pending = pending[: len(pending) - overlap]
            elif overlap < 0:
                warnings.warn(f"{tensors.name}: {-overlap} day(s) between balance years "
                              f"{int(tensors.years[k]) - 1} and {int(tensors.years[k])} are not modelled; "
                              "they hold 0 in the daily output", stacklevel=3)
                pending = np.concatenate([pending, np.zeros((-overlap,) + pending.shape[1:], np.float32)])
            if len(pending):
                out.append((self.pending_day, pending))
        self.pending_day, self.pending = begin, year
        return out

    def finish(self) -> list[tuple[int, np.ndarray]]:
        return [] if self.pending is None else [(self.pending_day, self.pending)]


class BatchCalendar:
    """The calendars of a stacked batch's glaciers: :meth:`add` takes year k of the batch (daily
    SMB (B, L, H, W) and, optionally, glacier-wide day terms (B, L, n)) and returns each
    glacier's final pieces ``(i, first_day, smb (n, H_i, W_i), terms (n, n_terms) or None)``,
    cropped to its own grid; :meth:`finish` returns the rest."""

    def __init__(self, tensors, terms: bool = False):
        self.tensors = list(tensors)
        self._smb = [Calendar(t) for t in self.tensors]
        self._terms = [Calendar(t) for t in self.tensors] if terms else None

    def _pieces(self, i, smb_pieces, term_pieces):
        if term_pieces is None:
            return [(i, day, data, None) for day, data in smb_pieces]
        return [(i, day, data, terms) for (day, data), (_, terms) in zip(smb_pieces, term_pieces)]

    def add(self, k: int, series: np.ndarray, terms: np.ndarray | None = None) -> list[tuple]:
        out = []
        for i, t in enumerate(self.tensors):
            if k < len(t.years):
                smb = self._smb[i].add(k, series[i, :, : len(t.y), : len(t.x)])
                out += self._pieces(i, smb, None if self._terms is None else self._terms[i].add(k, terms[i]))
        return out

    def finish(self) -> list[tuple]:
        out = []
        for i in range(len(self.tensors)):
            out += self._pieces(i, self._smb[i].finish(), None if self._terms is None else self._terms[i].finish())
        return out
