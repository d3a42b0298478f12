"""On-disk cache of prepared `GlacierTensors`, one folder per glacier.

Layout: `<cache root>/<stem>-<key>/` holds one `.npy` per array field and `meta.json` with the
scalar fields. `<stem>` is a file-system-safe form of the glacier name, `<key>` a hash of
`CACHE_VERSION` and the path, size and mtime of every source file (a missing optional file
counts too), so editing, adding or removing any input makes a new entry. Arrays are loaded
with `np.load(mmap_mode='r')`: a cached glacier costs address space, not RAM, until its
pages are touched.

Entries are built in a temporary folder and renamed into place, so a crash or a failed read
never leaves a half-written entry; older entries of the same glacier are removed afterwards.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

import constants
from dataloader import tensors as T

# Bump whenever the preparation changes what ends up in the cache: the key holds this version and
# the source files' stats, not the code. The preparation is reader.py, rasters.py,
# climate_columns.py, tables.py and tensors.py (and the constants they use).
CACHE_VERSION = 2  # 2: climate stored as distinct cell columns + climate_cell

CACHE_DIR_ENV = "GLAUNTI_CACHE_DIR"

_META = "meta.json"
_KEY_LENGTH = 16


def resolve_cache_dir(data_folder: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Cache root: `cache_dir` > env GLAUNTI_CACHE_DIR > `constants.cache_folder` (relative to
    the data folder)."""
    chosen = cache_dir or os.environ.get(CACHE_DIR_ENV)
    if chosen:
        return Path(chosen).expanduser().absolute()
    return (Path(data_folder) / constants.cache_folder).absolute()


def source_key(paths: Iterable[Path]) -> str:
    """Hash of CACHE_VERSION and (path, size, mtime_ns) of each file, or 'absent'."""
    digest = hashlib.sha256(f"glaunti-cache-v{CACHE_VERSION}".encode())
    for path in paths:
        try:
            stat = os.stat(path)
            state = f"{stat.st_size}:{stat.st_mtime_ns}"
        except FileNotFoundError:
            state = "absent"
        digest.update(f"\0{Path(path).resolve()}\0{state}".encode())
    return digest.hexdigest()[:_KEY_LENGTH]


def entry_stem(name: str) -> str:
    """File-system-safe, collision-free folder prefix for a glacier name (no glob wildcards)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:64] or "glacier"
    return f"{safe}.{hashlib.sha1(name.encode()).hexdigest()[:8]}"


class GlacierCache:
    """Cache of prepared glaciers under `root` (created on first write)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()

    def entry(self, name: str, key: str) -> Path:
        return self.root / f"{entry_stem(name)}-{key}"

    def load(self, name: str, key: str) -> T.GlacierTensors | None:
        """The cached tensors of `name` for this source key, memory-mapped; None if absent or
        unreadable (an unreadable entry is removed so that it gets rebuilt)."""
        folder = self.entry(name, key)
        if not folder.is_dir():
            return None
        try:
            return _read_entry(folder, name, key)
        except (OSError, ValueError, KeyError) as error:
            warnings.warn(f"discarding unreadable cache entry {folder} ({error})", stacklevel=2)
            shutil.rmtree(folder, ignore_errors=True)
            return None

    def load_or_build(
        self,
        name: str,
        sources: list[Path],
        build: Callable[[Callable | None], T.GlacierTensors],
    ) -> T.GlacierTensors:
        """Cached tensors of `name`, built with `build(allocate)` when the cache has none.

        Args:
            name: glacier name.
            sources: every file the build reads (their stat forms the key).
            build: reads the glacier; `allocate(field, shape, dtype)` gives it memory-mapped
                arrays inside the entry being built (None: build in memory).
        """
        key = source_key(sources)
        cached = self.load(name, key)
        if cached is not None:
            return cached
        try:
            if not _may_write(self.root):
                raise PermissionError("marked read-only")
            self.root.mkdir(parents=True, exist_ok=True)
            staging = _new_folder(self.root, prefix=f".tmp-{entry_stem(name)}-")
        except OSError as error:
            warnings.warn(f"cache folder {self.root} is not writable ({error}); reading without "
                          "cache (set GLAUNTI_CACHE_DIR or pass cache_dir)", stacklevel=3)
            return build(None)

        try:
            tensors = build(lambda field, shape, dtype: np.lib.format.open_memmap(
                staging / f"{field}.npy", mode="w+", dtype=dtype, shape=shape))
            if source_key(sources) != key:
                # A source changed while we read it: hand out what we read, cache nothing
                # (the memory maps stay valid after their files are unlinked).
                shutil.rmtree(staging, ignore_errors=True)
                return tensors
            _write_entry(staging, tensors, key)
            del tensors  # drop the writable memmaps; the entry is reloaded read-only below
            try:
                os.rename(staging, self.entry(name, key))
            except OSError:
                # Another process published the same entry first; theirs is as good as ours.
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._remove_stale(name, key)
        return _read_entry(self.entry(name, key), name, key)

    def _remove_stale(self, name: str, key: str) -> None:
        """Remove other keys' entries of this glacier and abandoned build folders."""
        stem = entry_stem(name)
        entry_name = re.compile(re.escape(stem) + f"-[0-9a-f]{{{_KEY_LENGTH}}}")
        for folder in self.root.glob(f"{stem}-*"):
            if folder.name != f"{stem}-{key}" and entry_name.fullmatch(folder.name):
                shutil.rmtree(folder, ignore_errors=True)
        for folder in self.root.glob(f".tmp-{stem}-*"):
            try:
                abandoned = time.time() - folder.stat().st_mtime > constants.abandoned_temporary_age_s
            except FileNotFoundError:
                continue
            if abandoned:
                shutil.rmtree(folder, ignore_errors=True)


def _new_folder(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder in ``parent``, created like ``tempfile.mkdtemp`` but with
    mode 0o777 so that the umask applies: mkdtemp's 0o700 would survive the rename and hide a
    shared cache from the rest of a project group."""
    for _ in range(100):
        folder = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            folder.mkdir(mode=0o777)
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free folder name {prefix}* in {parent} after 100 tries")


def _may_write(root: Path) -> bool:
    """Whether the cache may write under `root`: its first existing ancestor must be writable
    and carry a write permission bit. The bit matters for root, whom `os.access` always lets
    write: a read-only reference dataset must never receive a cache folder."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return bool(existing.stat().st_mode & 0o222) and os.access(existing, os.W_OK)


def _write_entry(folder: Path, tensors: T.GlacierTensors, key: str) -> None:
    """Write every array not yet memory-mapped into `folder`, then meta.json."""
    for field in T.array_fields():
        value = getattr(tensors, field)
        path = folder / f"{field}.npy"
        if path.exists():  # memory-mapped here by the build: only flush it
            value.flush()
        else:
            np.save(path, np.ascontiguousarray(value))
    meta = {field: getattr(tensors, field) for field in T.SCALAR_FIELDS}
    meta["first_date"] = str(tensors.first_date)
    meta["cache_version"] = CACHE_VERSION
    meta["key"] = key
    (folder / _META).write_text(json.dumps(meta, indent=1))


def _read_entry(folder: Path, name: str, key: str) -> T.GlacierTensors:
    meta = json.loads((folder / _META).read_text())
    if meta["cache_version"] != CACHE_VERSION or meta["key"] != key or meta["name"] != name:
        raise ValueError("entry belongs to another version, key or glacier")
    scalars = {field: meta[field] for field in T.SCALAR_FIELDS}
    scalars["first_date"] = np.datetime64(meta["first_date"], "D")
    arrays = {field: np.load(folder / f"{field}.npy", mmap_mode="r") for field in T.array_fields()}
    return T.GlacierTensors(**scalars, **arrays)
