"""Which compiled shapes exist in this process, and the lines that say XLA is compiling.

Training and inference both note each new shape here (the first call of a shape compiles: on a
CPU, model C's gradient takes tens of seconds, which would look like a hang without a line), and
a CPU device waits here for a shape another device is compiling
(``core.execute.distributed.share_cpu_executables``).
"""

from __future__ import annotations

import sys
import threading
import time

import jax
from tqdm.auto import tqdm

# (compiled function, model type, batch signature) → set once the first call of that shape in
# this process has returned (compiled, and in the persistent cache where devices share
# executables). The first call says so, since XLA may take a while (model C: tens of seconds on
# CPU); with shared executables another device waits for it instead of compiling too.
# core.infer.runner notes its shapes here too, as ("inference", model type, array shapes).
_COMPILED: dict[tuple, threading.Event] = {}
_COMPILED_LOCK = threading.Lock()


def claim_compile(key) -> tuple[bool, threading.Event]:
    """(whether this call is the first of ``key`` in the process, the event set when it returned)."""
    with _COMPILED_LOCK:
        ready = _COMPILED.get(key)
        if ready is None:
            ready = _COMPILED[key] = threading.Event()
            return True, ready
        return False, ready


def compiled_signatures(fn, static) -> set:
    """The batch signatures of compiled function ``fn`` that have compiled for models like ``static``."""
    with _COMPILED_LOCK:
        return {s for f, kind, s in _COMPILED if f == id(fn) and kind is type(static)}


def release_compiled() -> None:
    """Free every compiled function of this process (JAX's in-memory caches) and forget which
    shapes have compiled; later calls load from the persistent compilation cache, or compile.

    Each CPU executable holds a few memory maps, and a process that compiles for many glacier
    shapes (a cross-validation rotation on ``science``: over 10 000 maps) otherwise reaches
    Linux's default ``vm.max_map_count`` of 65 530 in its third rotation, where LLVM fails with
    "Unable to allocate section memory"."""
    jax.clear_caches()
    with _COMPILED_LOCK:
        _COMPILED.clear()


def progress_note(text: str) -> None:
    """A line above any progress bar, on stderr with the bars: stdout stays for results (a
    script may print JSON there)."""
    tqdm.write(text, file=sys.stderr)


def announce_compile(what: str, describe: str, number: int = 0, total: int = 0) -> float:
    """Say above any progress bar that XLA compiles now (it can take minutes that would look
    like a hang); returns the start time for the "compiled in" line."""
    progress_note(f"compiling {what} for {describe}" + (f" ({number} of {total})…" if total else "…"))
    return time.perf_counter()


