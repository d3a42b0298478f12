"""Where glaciers run: every local device, and several processes (hosts) with ``jax.distributed``.

Calibration and inference spread glaciers over all devices JAX sees. Work item ``i`` (a batch
of glaciers in training, ``core.execute.sets``, or one glacier; in a fixed order) belongs to process
``i % P`` and, inside it, to local device ``(i // P) % n_local`` (with one process, training
batches go where ``core.execute.sets.assign_devices`` puts them: a shape compiles once per device).
Each process computes the losses and gradients of its own items (JAX's asynchronous dispatch
keeps all its devices busy), the results are gathered to every process, and the gradients are
summed on the host in the fixed item order. Batches depend only on the glaciers and a memory
budget, never on the devices, so the sum is bit-identical whatever the number of devices and
processes, and every process ends an epoch with the same parameters; only process 0 writes
files.

Environment (read by :func:`setup`, which the scripts call before any computation):

- ``GLAUNTI_COORDINATOR`` (host:port), ``GLAUNTI_NUM_PROCESSES``, ``GLAUNTI_PROCESS_ID``:
  start ``jax.distributed`` explicitly. Under SLURM (``srun`` with more than one task) it is
  started automatically from SLURM's variables; ``GLAUNTI_DISTRIBUTED=0`` disables both.
- ``GLAUNTI_CPU_DEVICES``: expose this many CPU devices (JAX's ``jax_num_cpu_devices``; default
  one per core, at most 8): on a CPU-only host glaciers then run concurrently on several cores.
- ``GLAUNTI_COMPILATION_CACHE``: folder of JAX's persistent compilation cache (default
  ``$XDG_CACHE_HOME/glaunti/jax``, i.e. ``~/.cache/glaunti/jax``); ``0``/``off`` disables it.
  With it, a function compiled for one CPU device is loaded from the cache, not compiled
  again, by the others (:func:`share_cpu_executables`).

On CPU the cross-process gather uses gloo collectives (``jax_cpu_collectives_implementation``).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Iterator

import jax
import numpy as np

_SETUP_DONE = False
_SHARED_EXECUTABLES = False


def _backend_initialised() -> bool:
    """Whether JAX has already started a backend. JAX has no public query; its private
    registry is read when it exists, and a changed layout reads as "not started" (then
    ``jax_num_cpu_devices`` is set, which an old backend ignores)."""
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - internal layout changed
        return False
    return bool(getattr(xla_bridge, "_backends", None))


def compilation_cache_dir() -> Path | None:
    value = os.environ.get("GLAUNTI_COMPILATION_CACHE")
    if value is not None and value.strip().lower() in ("", "0", "off", "false", "no"):
        return None
    if value:
        return Path(value).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "glaunti" / "jax"


def enable_compilation_cache(path: Path | str | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache (compiled functions reused across processes)."""
    path = compilation_cache_dir() if path is None else Path(path)
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except Exception as err:  # read-only home, old jax: run without it
        warnings.warn(f"persistent compilation cache disabled ({err})", stacklevel=2)
        return None
    return path


def share_cpu_executables() -> bool:
    """Key the persistent compilation cache of single-device CPU computations without their
    device, so that one compile serves every CPU device (and every process of a host).

    XLA's CPU code does not depend on which CPU device runs it, but JAX keys its cache by the
    device assignment everywhere except on GPUs (where it drops it, as here): with N CPU
    devices a shape compiled N times (C's gradient: ~25 s each on 2 cores). Now the second
    device loads the first one's executable (:func:`executables_shared`; the training engine
    lets a device wait for a shape another device is compiling). JAX has no public switch for
    this; if its private key function has moved, nothing changes (each device compiles).
    Returns whether it is in effect."""
    global _SHARED_EXECUTABLES
    if _SHARED_EXECUTABLES:
        return True
    try:
        from jax._src import cache_key
        original = cache_key._hash_serialized_compile_options
    except (ImportError, AttributeError):  # pragma: no cover - internal layout changed
        return False

    def hash_compile_options(hash_obj, compile_options, strip_device_assignment=False):
        assignment = compile_options.device_assignment
        single = assignment is not None and assignment.replica_count() * assignment.computation_count() == 1
        strip = strip_device_assignment or (single and jax.default_backend() == "cpu")
        return original(hash_obj, compile_options, strip_device_assignment=strip)

    cache_key._hash_serialized_compile_options = hash_compile_options
    _SHARED_EXECUTABLES = True
    return True


def executables_shared() -> bool:
    """Whether a shape compiled for one CPU device is loaded from the persistent cache by the
    others (:func:`share_cpu_executables` and the cache both on)."""
    return (_SHARED_EXECUTABLES and bool(jax.config.jax_enable_compilation_cache)
            and bool(jax.config.jax_compilation_cache_dir))


def _distributed_args() -> dict | None:
    if os.environ.get("GLAUNTI_DISTRIBUTED", "").strip() == "0":
        return None
    coordinator = os.environ.get("GLAUNTI_COORDINATOR")
    if coordinator:
        try:
            n = int(os.environ["GLAUNTI_NUM_PROCESSES"])
            pid = int(os.environ["GLAUNTI_PROCESS_ID"])
        except (KeyError, ValueError):
            raise ValueError("GLAUNTI_COORDINATOR needs GLAUNTI_NUM_PROCESSES and GLAUNTI_PROCESS_ID "
                             "(integers)") from None
        return {"coordinator_address": coordinator, "num_processes": n, "process_id": pid}
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_ID" in os.environ:
        return {}  # jax.distributed detects SLURM itself
    return None


def setup(cpu_devices: int | None = None, compilation_cache: bool = True) -> None:
    """Configure devices, processes and the compilation cache; call before any computation.

    Idempotent. Settings that need a fresh backend are skipped with a warning if JAX has
    already computed something.
    """
    global _SETUP_DONE
    if _SETUP_DONE:
        return
    if compilation_cache and enable_compilation_cache() is not None:
        share_cpu_executables()
    fresh = not _backend_initialised()
    explicit = cpu_devices is not None or bool(os.environ.get("GLAUNTI_CPU_DEVICES"))
    if cpu_devices is None and os.environ.get("GLAUNTI_CPU_DEVICES"):
        cpu_devices = int(os.environ["GLAUNTI_CPU_DEVICES"])
    if cpu_devices is None and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # Default: one CPU device per core (at most 8), so that a CPU-only host trains several
        # glaciers at once. Harmless on GPU hosts (JAX then computes on the GPUs).
        cpu_devices = max(1, min(8, os.cpu_count() or 1))
    if cpu_devices:
        if fresh:
            jax.config.update("jax_num_cpu_devices", int(cpu_devices))
        elif explicit:
            warnings.warn("GLAUNTI_CPU_DEVICES ignored: JAX was already initialised", stacklevel=2)
    args = _distributed_args()
    if args is not None:
        if not fresh:
            raise RuntimeError("jax.distributed must start before any JAX computation; call "
                               "core.execute.distributed.setup() first")
        # CPU hosts exchange the per-glacier results with gloo (GPUs use NCCL).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**args)
    _SETUP_DONE = True


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main_process() -> bool:
    return jax.process_index() == 0


class Placement:
    """Work item (batch or glacier) ``i`` of a fixed list → its process and its local device
    (as assigned, else round-robin; ``offset`` items further on: a second list that runs
    beside the first, like the validation glaciers beside the next epoch's gradient, then
    starts on the devices the first list leaves idle)."""

    def __init__(self, devices=None, offset: int = 0, assignment=None):
        self.devices = list(jax.local_devices() if devices is None else devices)
        self.n_processes = jax.process_count()
        self.process = jax.process_index()
        self.offset = int(offset)
        # Local device index per item (one process only), e.g. ``core.execute.sets.assign_devices``.
        self.assignment = None if assignment is None else list(assignment)

    def owner(self, i: int) -> int:
        return (i + self.offset) % self.n_processes

    def is_local(self, i: int) -> bool:
        return self.owner(i) == self.process

    def device(self, i: int):
        if self.assignment is not None:
            return self.devices[(self.assignment[i] + self.offset) % len(self.devices)]
        return self.devices[((i + self.offset) // self.n_processes) % len(self.devices)]

    def shifted(self, offset: int) -> "Placement":
        """The same devices and processes, items starting ``offset`` further on."""
        return Placement(self.devices, self.offset + offset, self.assignment)

    def assigned(self, assignment) -> "Placement":
        """Items on the given local devices (by index, still shifted by the offset); ignored
        across processes, where items go round-robin."""
        return Placement(self.devices, self.offset, assignment if self.n_processes == 1 else None)

    def local_indices(self, n: int) -> list[int]:
        return [i for i in range(n) if self.is_local(i)]


def gather_rows(local: dict[int, np.ndarray], n: int, width: int, placement: Placement) -> np.ndarray:
    """(n, width) float32 rows, row ``i`` computed by process ``placement.owner(i)``: every
    process contributes its rows and receives all of them."""
    if placement.n_processes == 1:
        return np.stack([local[i] for i in range(n)]) if n else np.zeros((0, width), np.float32)
    from jax.experimental import multihost_utils

    per_process = -(-n // placement.n_processes)
    mine = np.zeros((per_process, width), np.float32)
    for i, row in local.items():
        mine[i // placement.n_processes] = row
    gathered = np.asarray(multihost_utils.process_allgather(mine))  # (P, per_process, width)
    return np.stack([gathered[placement.owner(i), i // placement.n_processes] for i in range(n)])


def sync(name: str) -> None:
    """Barrier across processes (no-op for one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def temporary_environ(settings: dict[str, str]) -> Iterator[None]:
    """``settings`` in ``os.environ`` for the block and the previous values back afterwards, so
    that work run in the calling process (a region's task, OGGM's import) leaves the
    environment as it found it."""
    before = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
