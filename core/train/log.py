"""The training log: one CSV row per glacier, subset ("train"/"val") and epoch with the loss,
every loss term (the published ``aux``) and the epoch's wall time.

The whole file is rewritten atomically after every epoch. On resume the rows up to the
checkpoint's epoch are read back, so a resumed run's log equals an uninterrupted one's.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime, timezone
from pathlib import Path

from core.io import atomic_write_text

LOG_COLUMNS = ["timestamp", "epoch", "glacier", "subset", "loss", "epoch_time_s"]


def log_row(epoch: int, glacier: str, subset: str, loss: float, terms: dict,
            elapsed: float | None) -> dict:
    """One row: fixed columns first, then the loss terms in the loss's order (None → empty)."""
    row = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "epoch": epoch,
        "glacier": glacier,
        "subset": subset,
        "loss": loss,
        "epoch_time_s": "" if elapsed is None else f"{elapsed:.3f}",
    }
    row.update({k: ("" if v is None else v) for k, v in terms.items()})
    return row


class Log:
    """The rows of one run, kept in memory and written as a whole by :meth:`flush`.

    ``resume_epoch`` (None: a fresh log) keeps the rows of an existing file up to that epoch.
    """

    def __init__(self, path: Path, resume_epoch: int | None):
        self.path = Path(path)
        self.rows: list[dict] = []
        self.columns = list(LOG_COLUMNS)
        if resume_epoch is not None and self.path.exists():
            with open(self.path, newline="") as f:
                for row in csv.DictReader(f):
                    if int(row["epoch"]) <= resume_epoch:
                        self.add(row)

    def add(self, row: dict) -> None:
        for key in row:
            if key not in self.columns:
                self.columns.append(key)
        self.rows.append(row)

    def set_epoch_time(self, epoch: int, seconds: float) -> None:
        """Fill the wall time of the rows of ``epoch`` that have none yet (training rows are
        logged before the epoch ends)."""
        for row in self.rows:
            if row["epoch"] == epoch and row["epoch_time_s"] in (None, ""):
                row["epoch_time_s"] = f"{seconds:.3f}"

    def flush(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())
