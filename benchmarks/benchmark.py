"""Benchmark of calibration and inference for models A–D on the synthetic twin.

    python benchmarks/benchmark.py --preset demo --models abcd --epochs 3 --json bench.json

For each model, in a fresh subprocess (so that compile times and peak memory are its own):

- compile: seconds XLA spent compiling (JAX's monitoring events) and the first epoch's excess
  over a steady epoch (tracing + compiling + first transfers);
- epoch: steady-state time of one forward+gradient pass over all training glaciers (median of
  ``--epochs`` epochs after the first), wall clock and this process's CPU time;
- training epoch: an epoch as training runs it, with its step, validation and saving (the slope
  of the training loop's wall time over ``--epochs`` more epochs), beside the median
  ``epoch_time_s`` its log records (they should agree; docs/performance.md);
- cell-days per second: modelled days × grid cells of the training glaciers per steady epoch
  (the work the published implementation does), and the cell-days the engine actually stepped
  (its training layout drops off-glacier cells for A/B and adds bucket padding);
- inference: seconds per glacier-year of the daily-series inference of one glacier (after a
  warm-up run that compiles);
- batching (``core.execute.sets``; planned for ``--passes`` epochs): on a GPU the glaciers of one shape
  bucket run as one vmapped computation, on a CPU glaciers share a compiled shape but run one
  after another; ``sequential_day_steps`` counts the day-loop iterations one training epoch
  (training and its validation) executes one after another over all its compiled calls (years
  walked × L per batch), ``glacier_day_steps`` what a per-glacier engine iterates (Σ glaciers ×
  their years × L), ``compiled_shapes`` the distinct shapes of training and validation batches
  and ``compiled_programs`` the distinct batch signatures (gradient for training, loss for
  validation) that XLA compiles; ``gpu_plan`` the same figures of the plan a GPU would run;
- peak host RAM (``ru_maxrss``) and, on GPUs, peak device memory (``memory_stats``);
- floor: bytes of forcing (T and P, float32, once per stepped cell-day) over the device memory
  bandwidth measured by a copy benchmark, and the ratio epoch / floor.

Without ``--data_folder`` the preset is generated once into ``~/.cache/glaunti/synthetic``.
The persistent compilation cache is off here (``--cache`` turns it on) so that compile times
are measured, not cache hits. Not a test: ``tests/test_benchmark.py`` only checks that it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODELS = "abcd"
# Documented fallback bandwidths (bytes/s) when the copy benchmark is skipped.
NOMINAL_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "cpu": 10e9}


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", choices=("tiny", "demo", "bench"),
                   help="Synthetic twin preset (default demo)")
    p.add_argument("--data_folder", default=None, help="Use this dataset instead of generating the preset")
    p.add_argument("--models", default=MODELS, help="Models to run, e.g. 'ab' (default abcd)")
    p.add_argument("--epochs", type=int, default=3, help="Steady epochs after the first (default 3)")
    p.add_argument("--glaciers", type=int, default=None, help="Use only the first N training glaciers")
    p.add_argument("--json", default=None, help="Write the results here")
    p.add_argument("--passes", type=int, default=50,
                   help="Epochs the batching plans for (on a CPU it weighs compiles against padded "
                        "arithmetic; default 50, the published schedule)")
    p.add_argument("--cpu_devices", type=int, default=None,
                   help="Expose N CPU devices (default: one per core, at most 8)")
    p.add_argument("--cache", action="store_true", help="Use the persistent compilation cache")
    p.add_argument("--no_inference", action="store_true", help="Skip the inference timing")
    p.add_argument("--infer_glaciers", type=int, default=0,
                   help="Also time the batched inference (daily series, not written) of the first N "
                        "glaciers of the dataset, as the cross-validation runs it (default 0: not)")
    p.add_argument("--layout", default=None, choices=("exact", "padded", "padded_grid", "cells"),
                   help="Override the training layout ('exact' = the engine before bucketing/packing)")
    p.add_argument("--batch_bytes", type=int, default=None,
                   help="Device memory per batch of glaciers (default: core.execute.sets.batch_budget(); "
                        "1 = one glacier per batch)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _dataset_folder(args) -> Path:
    if args.data_folder:
        return Path(args.data_folder)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "glaunti" / "synthetic"
    folder = base / args.preset
    if not (folder / "index.csv").exists():
        from dataloader.synthetic import generate

        print(f"generating the '{args.preset}' twin in {folder} ...", flush=True)
        generate(folder, preset=args.preset, seed=0)
    return folder


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _bandwidth(jax, jnp) -> tuple[float, str]:
    """Device memory bandwidth from a copy (read + write) of 256 MiB, best of 5."""
    try:
        n = 64 * 1024 * 1024
        x = jnp.ones((n,), jnp.float32)
        f = jax.jit(lambda v: v * 1.0000001)
        f(x).block_until_ready()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            f(x).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        del x
        return 2 * 4 * n / best, "measured (copy of 256 MiB, best of 5)"
    except Exception:  # out of memory on a small device
        kind = jax.devices()[0].device_kind
        for key, value in NOMINAL_BANDWIDTH.items():
            if key.lower() in kind.lower():
                return value, f"nominal for {key}"
        return NOMINAL_BANDWIDTH["cpu"], "nominal (cpu)"


def worker(args) -> dict:
    from collections import defaultdict

    from core.execute import distributed

    distributed.setup(cpu_devices=args.cpu_devices, compilation_cache=args.cache)
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "float32")
    events = defaultdict(float)
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: events.__setitem__(name, events[name] + secs))

    from core.execute.sets import GlacierSet
    from core.infer.runner import iter_daily_smb
    from core.models import build, uses_facies
    from core.train.loop import epoch_gradient, loss_and_grad
    from dataloader import Dataset
    from glaunti.layouts import layout_for, make_arrays

    name = args._worker
    dataset = Dataset(_dataset_folder(args))
    names = dataset.train_names[: args.glaciers] if args.glaciers else dataset.train_names
    model = build(name)  # A at its prior, fresh B/corrector: the cost does not depend on values
    trainable, static = eqx.partition(model, model.trainable_filter())
    layout = args.layout or layout_for(model)
    glaciers = GlacierSet(dataset, names, uses_facies(name), layout=layout, batch_bytes=args.batch_bytes,
                          passes=args.passes)
    validation = GlacierSet(dataset, dataset.val_names, uses_facies(name), layout=layout,
                            batch_bytes=args.batch_bytes, passes=args.passes + 1)
    value_and_grad = loss_and_grad

    # Work per epoch: the published grid cell-days and what the engine steps (every glacier of a
    # batch is stepped on the batch's grid).
    grid_cell_days = computed_cell_days = 0
    for tensors in dataset.iter_glaciers(names):
        h, w = tensors.climate_cell.shape
        days = int(np.asarray(tensors.day_valid).sum())
        grid_cell_days += h * w * days
    for batch in glaciers.batches():
        for tensors in dataset.iter_glaciers([names[i] for i in batch.indices]):
            computed_cell_days += batch.grid[0] * batch.grid[1] * int(np.asarray(tensors.day_valid).sum())
    def plan_figures(train, val):
        every = train + val
        return {
            "sequential_day_steps": sum(b.walked_years * b.block_length for b in every),
            "glacier_day_steps": sum(b.glacier_years * b.block_length for b in every),
            "compiled_shapes": len({(b.key, b.grid) for b in every}),
            "compiled_programs": len({("grad", b.signature) for b in train} | {("loss", b.signature) for b in val}),
            "batches": {subset: [[names_of[i] for i in b.indices] for b in plan]
                        for subset, plan, names_of in (("train", train, names), ("val", val, dataset.val_names))},
        }

    steps = plan_figures(glaciers.batches(), validation.batches())
    # What the same sets would run as on a GPU (coarse buckets, vmapped batches): not run here.
    steps["gpu_plan"] = plan_figures(glaciers.plan(gpu=True), validation.plan(gpu=True))

    walls, cpus = [], []
    compile_before = dict(events)
    for epoch in range(args.epochs + 1):
        c0, t0 = _cpu_seconds(), time.perf_counter()
        grads, _ = epoch_gradient(value_and_grad, trainable, static, glaciers, verbose=False)
        jax.block_until_ready(grads)
        walls.append(time.perf_counter() - t0)
        cpus.append(_cpu_seconds() - c0)
        if epoch == 0:
            compile_events = {k: v - compile_before.get(k, 0.0) for k, v in events.items()}
    steady = statistics.median(walls[1:]) if len(walls) > 1 else walls[0]
    steady_cpu = statistics.median(cpus[1:]) if len(cpus) > 1 else cpus[0]

    result = {
        "model": name, "layout": layout, "glaciers": len(names), **steps,
        "compile_s": compile_events.get("/jax/core/compile/backend_compile_duration", 0.0),
        "trace_lower_s": compile_events.get("/jax/core/compile/jaxpr_trace_duration", 0.0)
        + compile_events.get("/jax/core/compile/jaxpr_to_mlir_module_duration", 0.0),
        "first_epoch_s": walls[0], "first_epoch_overhead_s": walls[0] - steady,
        "epoch_s": steady, "epoch_cpu_s": steady_cpu, "epochs_s": walls,
        "grid_cell_days": grid_cell_days, "computed_cell_days": computed_cell_days,
        "cell_days_per_s": grid_cell_days / steady, "computed_cell_days_per_s": computed_cell_days / steady,
        "cell_days_per_cpu_s": grid_cell_days / steady_cpu,
    }

    result.update(training_epoch(model, glaciers, validation, args.epochs))

    if not args.no_inference:
        infer_name = (dataset.test_names or names)[0]
        tensors = dataset.glacier(infer_name)
        arrays = make_arrays(tensors, facies=uses_facies(name))
        c0, t0 = _cpu_seconds(), time.perf_counter()
        for _ in iter_daily_smb(model, arrays, tensors):
            pass
        first = time.perf_counter() - t0
        c0, t0 = _cpu_seconds(), time.perf_counter()
        for _ in iter_daily_smb(model, arrays, tensors):
            pass
        wall = time.perf_counter() - t0
        n_years = len(tensors.years)
        result.update({"inference_glacier": infer_name, "inference_grid": list(arrays.shape),
                       "inference_years": n_years, "inference_first_s": first,
                       "inference_s_per_glacier_year": wall / n_years,
                       "inference_cpu_s_per_glacier_year": (_cpu_seconds() - c0) / n_years})

    if args.infer_glaciers:
        result.update(batched_inference(model, dataset, dataset.names[: args.infer_glaciers], uses_facies(name)))

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the copy test
    bandwidth, how = _bandwidth(jax, jnp)
    forcing_bytes = 8 * computed_cell_days  # T and P as float32, once per stepped cell-day
    floor = forcing_bytes / bandwidth
    stats = jax.devices()[0].memory_stats() or {}
    result.update({
        "forcing_bytes": forcing_bytes, "bandwidth_bytes_per_s": bandwidth, "bandwidth_source": how,
        "floor_s": floor, "epoch_over_floor": steady / floor,
        "peak_host_rss_mb": peak_rss_mb,
        "peak_device_mb": stats.get("peak_bytes_in_use", 0) / 2**20 if stats else None,
        "devices": [str(d) for d in jax.local_devices()], "device_kind": jax.devices()[0].device_kind,
        "processes": jax.process_count(),
    })
    return result


def batched_inference(model, dataset, names, facies: bool) -> dict:
    """Seconds of the daily-series inference of ``names`` in batches (``core.execute.sets`` plan of this
    machine, as ``core.workflows`` infers a fold; the series are fetched to the host, not written):
    a first pass (compiles) and a second one."""
    import numpy as np

    from core.execute.sets import GlacierSet
    from core.infer.runner import batch_series

    glaciers = GlacierSet(dataset, names, facies)
    plan = glaciers.batches()

    def one_pass() -> tuple[float, float, int]:
        c0, t0, years = _cpu_seconds(), time.perf_counter(), 0
        for _, batch, arrays in glaciers.iter_batches([(b, None) for b in range(len(plan))]):
            tensors = [dataset.glacier(names[i]) for i in batch.indices]
            for _, series, _ in batch_series(model, arrays, tensors, verbose=False, terms=bool(model.TERMS)):
                np.asarray(series)  # on the host, as the writer needs it
                years += len(batch.indices)
        return time.perf_counter() - t0, _cpu_seconds() - c0, years

    first, _, _ = one_pass()
    wall, cpu, years = one_pass()
    return {"batched_inference_glaciers": len(names), "batched_inference_batches": len(plan),
            "batched_inference_first_s": first, "batched_inference_s": wall,
            "batched_inference_cpu_s": cpu, "batched_inference_glacier_years": years}


def _machine() -> dict:
    import jax

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "jax": jax.__version__}
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return info


COLUMNS = [("model", "{}"), ("glaciers", "{}"), ("compiled_shapes", "{}"), ("compiled_programs", "{}"),
           ("sequential_day_steps", "{}"), ("glacier_day_steps", "{}"), ("compile_s", "{:.1f}"),
           ("epoch_s", "{:.2f}"), ("epoch_cpu_s", "{:.2f}"), ("training_epoch_s", "{:.2f}"),
           ("log_epoch_s", "{:.2f}"), ("cell_days_per_s", "{:.3g}"),
           ("computed_cell_days_per_s", "{:.3g}"), ("inference_s_per_glacier_year", "{:.3f}"),
           ("peak_host_rss_mb", "{:.0f}"), ("peak_device_mb", "{}"), ("epoch_over_floor", "{:.0f}")]


def table(results: list[dict]) -> str:
    header = [c for c, _ in COLUMNS]
    rows = [[(fmt.format(r[c]) if r.get(c) is not None else "-") for c, fmt in COLUMNS] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def training_epoch(model, glaciers, validation, epochs: int) -> dict:
    """A training epoch as ``core.train.loop.train`` runs it (gradient, step, validation with
    its overlap, saving): the slope of the loop's wall time between runs of 2 and 2 + ``epochs``
    epochs (compiled functions warm), so it does not rest on the log's bookkeeping; and, beside
    it, the median ``epoch_time_s`` the log of the longer run records for epochs 2..N."""
    import tempfile

    import pandas as pd

    from core.train.loop import TrainConfig, train

    def run(n: int) -> tuple[float, pd.Series]:
        with tempfile.TemporaryDirectory(prefix="glaunti-bench-") as tmp:
            config = TrainConfig(epochs=n, params_path=Path(tmp) / "p.eqx", log_path=Path(tmp) / "log.csv",
                                 show_progress=False)
            t0 = time.perf_counter()
            train(model, glaciers, validation, config)
            wall = time.perf_counter() - t0
            return wall, pd.read_csv(config.log_path).groupby("epoch")["epoch_time_s"].first()

    run(1)  # compiles the validation
    short, _ = run(2)
    long, log = run(2 + epochs)
    return {"training_epoch_s": (long - short) / epochs,
            "log_epoch_s": float(log[log.index >= 2].median())}


def main(argv=None) -> int:
    args = _parse(argv)
    if args._worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    folder = _dataset_folder(args)
    results = []
    load_before = os.getloadavg()
    for model in args.models:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", model, "--data_folder", str(folder),
               "--epochs", str(args.epochs), "--passes", str(args.passes)]
        for flag, value in (("--glaciers", args.glaciers), ("--cpu_devices", args.cpu_devices),
                            ("--layout", args.layout), ("--batch_bytes", args.batch_bytes)):
            if value:
                cmd += [flag, str(value)]
        cmd += ["--cache"] if args.cache else []
        cmd += ["--no_inference"] if args.no_inference else []
        cmd += ["--infer_glaciers", str(args.infer_glaciers)] if args.infer_glaciers else []
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        print(f"model {model} ...", flush=True)
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            sys.stderr.write(out.stderr[-4000:])
            raise SystemExit(f"benchmark of model {model} failed (exit {out.returncode})")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    report = {"dataset": str(folder), "preset": None if args.data_folder else args.preset,
              "epochs": args.epochs, "passes": args.passes, "machine": _machine(), "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "results": results}
    print(table(results))
    print(f"machine: {report['machine'].get('cpu_model', '?')}, {report['machine']['cpus']} CPUs; "
          f"devices {results[0]['devices'] if results else '?'}; load average {load_before[0]:.1f} "
          f"-> {report['load_average_after'][0]:.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
