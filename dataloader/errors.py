"""The one exception the dataloader raises for input it cannot use."""

from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """Bad or missing input data.

    The message names the file, the variable or field, and what was expected, e.g.
    ``<path>: variable 'temperature_2m' has dims ('x', 'y', 'time'), expected ('time', 'y', 'x')``.

    Args:
        path: the offending file or folder (None when no single file is at fault).
        field: what in that file, e.g. ``"variable 'z'"`` or ``"column 'year', line 4"``
            (None when the whole file is at fault).
        problem: what is wrong and what was expected.
    """

    def __init__(self, path: str | Path | None, field: str | None, problem: str):
        self.path = None if path is None else str(path)
        self.field = field
        self.problem = problem
        where = f"{self.path}: " if self.path else ""
        what = f"{field} " if field else ""
        super().__init__(f"{where}{what}{problem}")

    def __reduce__(self):
        # Keep the three arguments when the error crosses a process boundary (pickling).
        return (type(self), (self.path, self.field, self.problem))
