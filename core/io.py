"""Atomic file output: every result is written to a temporary file next to its destination and
renamed into place, so that a crash leaves either the previous file or the new one, never half
of one.

The temporary file is created as an ordinary write would create the result (mode 0o666 minus
the umask, and the folder's default ACL), not private to its writer as ``tempfile.mkstemp``
makes it: results in a shared project folder must stay readable by the group."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import secrets
import time
from pathlib import Path
from typing import Callable, Iterator

import constants


class OutputError(OSError):
    """An output path cannot be written (names the path and the reason)."""


def _check_writable_dir(path: Path) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{path}: cannot create output folder {folder} ({err.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{path}: output folder {folder} is not writable")


def check_output_paths(**paths: str | os.PathLike | None) -> None:
    """Fail before any work if an output cannot be written: each path (keyword = its option
    name; None is skipped) must not be a directory, its first existing ancestor must be a
    writable directory, and no two outputs may be the same file. Creates nothing."""
    seen: dict[Path, str] = {}
    for option, path in paths.items():
        if path is None:
            continue
        names_folder = str(path).endswith(("/", os.sep))  # Path() would drop the slash
        path = Path(path)
        if names_folder or path.is_dir():
            raise OutputError(f"{path}: {option} is a directory, expected a file path")
        ancestor = path.parent if str(path.parent) else Path(".")
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise OutputError(f"{path}: {option} cannot be created, {ancestor} is a file, not a folder")
        if not os.access(ancestor, os.W_OK):
            raise OutputError(f"{path}: {option} cannot be created, folder {ancestor} is not writable")
        key = path.resolve()
        if key in seen:
            raise OutputError(f"{path}: {option} is the same file as {seen[key]}, expected distinct outputs")
        seen[key] = option


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; rename it onto ``path`` on success,
    delete it on failure. The temporary file is flushed to disk before the rename, so that
    even a power cut leaves the previous file or the complete new one."""
    path = Path(path)
    _check_writable_dir(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory, expected a file path")
    try:
        tmp = create_new_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise OutputError(f"{path}: cannot create a file in {path.parent} ({err.strerror})") from None
    try:
        yield tmp
        _fsync(tmp)
        try:
            os.replace(tmp, path)
        except OSError as err:
            raise OutputError(f"{path}: cannot be replaced ({err.strerror})") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    remove_abandoned_temporaries(path)


def create_new_file(folder: Path, prefix: str, suffix: str) -> Path:
    """Create an empty file with a fresh random name in ``folder`` and return its path.

    Exclusive creation (O_EXCL) makes the name ours, as ``tempfile.mkstemp`` does, but with
    mode 0o666 so that the kernel applies the umask like an ordinary ``open(..., "w")``."""
    for _ in range(100):
        candidate = Path(folder) / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(errno.EEXIST, f"no free name {prefix}*{suffix} after 100 tries")




def remove_abandoned_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete ``.<name>.*.tmp`` files next to ``path`` that a killed writer left behind
    (older than ``constants.abandoned_temporary_age_s``); returns them."""
    path = Path(path)
    removed = []
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > constants.abandoned_temporary_age_s:
                tmp.unlink()
                removed.append(tmp)
    return removed


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1) + "\n")
