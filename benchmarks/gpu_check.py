"""The GPU check: A and C on the bench twin on the accelerator and on the CPU, in one JSON.

    python benchmarks/gpu_check.py --json gpu_check.json            # on a machine with a GPU
    python benchmarks/gpu_check.py --preset ci --json check.json    # anywhere (tests, CI)

For the device session (``run`` tool; the machine starts bare, the twin is generated there):

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --json $OUT/gpu_check.json

It runs ``benchmarks/benchmark.py`` twice, each model in its own process (compile times and
peak memory are its own, the compilation cache off):

1. on the default device (the GPU where there is one; its batching plan, ``core.execute.sets``: the
   glaciers of a shape bucket as one vmapped batch): models A and C on every training glacier
   of the preset, the first epoch (compiles) and steady epochs, XLA compile seconds, the
   sequential day steps of the plan, peak device memory, and the batched inference (daily
   series to the host) of ``--infer_glaciers`` glaciers;
2. on the CPU (``JAX_PLATFORMS=cpu``, the CPU plan) the same on the first ``--cpu_glaciers``
   training glaciers and inference glaciers (the whole preset on a CPU takes too long: C's
   bench epoch is ~140 s on 2 cores), for the ratio.

The ratios compare rates, not times, because the CPU run covers fewer glaciers: grid cell-days
per second of a steady epoch and glacier-years per second of the batched inference (after its
compiling pass). Presets:

- ``gpu`` (default): bench twin (32 glaciers, 20 training, up to 100×150), 2 steady epochs,
  inference of 20 glaciers; CPU: 1 training glacier, 1 steady epoch, 1 inference glacier.
  Meant for under 8 minutes on one H100, not yet measured there (no device was lent when it
  was written). Known parts: generating the twin on the bare machine (133 CPU-s on the
  development VM), the CPU part (A and C on 2 bench glaciers: 428 s wall on 2 loaded cores,
  so ~1 glacier on 16 free cores should take well under that). Unknown: C's GPU compiles.
  The GPU part runs first and the JSON is written after each part: give the command a time
  limit of ~9 minutes and a stopped CPU part still leaves the GPU figures.
- ``ci``: tiny twin, model A only, 1 training glacier, 1 steady epoch, 2 inference glaciers,
  both runs on this machine's default device (tens of seconds on a CPU): it keeps the script
  working (``tests/test_benchmark.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PRESETS = {
    # twin, models, steady epochs, training glaciers (None: all), inference glaciers, then the CPU's
    # The CPU part is kept small: on 2 loaded cores A and C on 2 bench glaciers took 428 s (C's
    # compiles 214 s); the twin's generation on the bare machine is another ~2 min.
    "gpu": dict(twin="bench", models="ac", epochs=2, glaciers=None, infer=20,
                cpu_epochs=1, cpu_glaciers=1, cpu_infer=1),
    # A only: C's compiles alone take ~40 s per run on 2 cores; its code path is benchmark.py's.
    "ci": dict(twin="tiny", models="a", epochs=1, glaciers=1, infer=2,
               cpu_epochs=1, cpu_glaciers=1, cpu_infer=2),
}
# What each model's JSON row keeps (benchmark.py's result keys).
KEPT = ("model", "glaciers", "layout", "compile_s", "trace_lower_s", "first_epoch_s", "epoch_s", "epoch_cpu_s",
        "epochs_s", "sequential_day_steps", "glacier_day_steps", "compiled_shapes", "compiled_programs",
        "grid_cell_days", "cell_days_per_s", "computed_cell_days_per_s", "peak_device_mb", "peak_host_rss_mb",
        "bandwidth_bytes_per_s", "bandwidth_source", "batched_inference_glaciers", "batched_inference_batches",
        "batched_inference_first_s", "batched_inference_s", "batched_inference_cpu_s",
        "batched_inference_glacier_years", "device_kind", "devices")


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpu", choices=tuple(PRESETS), help="Size of the check (default gpu)")
    p.add_argument("--data_folder", default=None, help="Use this dataset instead of generating the twin")
    p.add_argument("--json", required=True, help="Write the figures here")
    p.add_argument("--no_cpu", action="store_true", help="Skip the CPU run (no ratios)")
    return p.parse_args(argv)


def _run(label: str, preset: dict, folder: Path, cpu: bool) -> dict:
    """benchmark.py over ``folder`` (in child processes); ``cpu`` forces the CPU platform."""
    from benchmarks import benchmark

    prefix = "cpu_" if cpu else ""
    argv = ["--data_folder", str(folder), "--models", preset["models"], "--epochs", str(preset[prefix + "epochs"]),
            "--infer_glaciers", str(preset[prefix + "infer"]), "--no_inference"]
    glaciers = preset[prefix + "glaciers"]
    if glaciers:
        argv += ["--glaciers", str(glaciers)]
    saved = os.environ.get("JAX_PLATFORMS")
    if cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"  # read by the child processes
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{label}.json"
        try:
            benchmark.main(argv + ["--json", str(out)])
        finally:
            if cpu:
                if saved is None:
                    os.environ.pop("JAX_PLATFORMS", None)
                else:
                    os.environ["JAX_PLATFORMS"] = saved
        report = json.loads(out.read_text())
    models = {}
    for r in report["results"]:
        row = {k: r[k] for k in KEPT if k in r}
        # The other kind of device's plan, for comparison (on a GPU: what the CPU would run).
        row["gpu_plan_sequential_day_steps"] = r["gpu_plan"]["sequential_day_steps"]
        row["gpu_plan_compiled_shapes"] = r["gpu_plan"]["compiled_shapes"]
        models[r["model"]] = row
    return {"wall_s": time.perf_counter() - t0, "machine": report["machine"],
            "load_average": [report["load_average_before"], report["load_average_after"]], "models": models}


def _ratios(device: dict, cpu: dict) -> dict:
    """Device over CPU, per model: steady-epoch grid cell-days per second and batched inference
    glacier-years per second (after compiling)."""
    out = {}
    for model, d in device["models"].items():
        c = cpu["models"].get(model)
        if not c:
            continue
        ratio = {"epoch_cell_days_per_s": d["cell_days_per_s"] / c["cell_days_per_s"]}
        if d.get("batched_inference_s") and c.get("batched_inference_s"):
            ratio["inference_glacier_years_per_s"] = (
                (d["batched_inference_glacier_years"] / d["batched_inference_s"])
                / (c["batched_inference_glacier_years"] / c["batched_inference_s"]))
        out[model] = ratio
    return out


def main(argv=None) -> dict:
    args = _parse(argv)
    preset = PRESETS[args.preset]
    from benchmarks import benchmark

    t0 = time.perf_counter()
    folder = Path(args.data_folder) if args.data_folder else benchmark._dataset_folder(
        benchmark._parse(["--preset", preset["twin"]]))
    generated_s = time.perf_counter() - t0
    report = {"preset": args.preset, "settings": preset, "dataset": str(folder), "twin_ready_s": generated_s}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)

    def write():  # after each part, so that a run stopped by a time limit keeps what it measured
        report["total_s"] = time.perf_counter() - t0
        Path(args.json).write_text(json.dumps(report, indent=1))

    report["device"] = _run("device", preset, folder, cpu=False)
    first = next(iter(report["device"]["models"].values()))
    report["device_kind"] = first.get("device_kind")
    report["on_accelerator"] = not str(first.get("device_kind", "cpu")).lower().startswith("cpu") and \
        "cpu" not in str(first.get("devices", ["cpu"])[0]).lower()
    write()
    if not args.no_cpu:
        report["cpu"] = _run("cpu", preset, folder, cpu=True)
        report["device_over_cpu"] = _ratios(report["device"], report["cpu"])
        write()
    print(f"device: {report['device_kind']} (accelerator: {report['on_accelerator']}); total {report['total_s']:.0f} s")
    for model, row in report["device"]["models"].items():
        print(f"  {model}: compile {row['compile_s']:.1f} s, first epoch {row['first_epoch_s']:.2f} s, "
              f"steady {row['epoch_s']:.2f} s, sequential day steps {row['sequential_day_steps']}, "
              f"peak device {row.get('peak_device_mb')} MB, inference of {row.get('batched_inference_glaciers')} "
              f"glaciers {row.get('batched_inference_s', float('nan')):.2f} s")
    for model, ratio in report.get("device_over_cpu", {}).items():
        print(f"  {model} device/CPU: " + ", ".join(f"{k} {v:.1f}x" for k, v in ratio.items()))
    return report


if __name__ == "__main__":
    main()
