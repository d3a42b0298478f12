"""Benchmark of run_region.py on the bundled Oetztal region (20 outlines, ERA5-Land monthly,
balance years 1990–2018, published D by default).

    python benchmarks/region.py [--models d] [--cold_workers 2] [--workers 0 1 2] [--json region_bench.json]

Each configuration runs in a fresh subprocess into a fresh OUT_DIR (so preparation, compile
times and peak memory are its own): first with ``--cold_workers`` workers (0: this process) and
an empty persistent compilation cache ("cold"), then every ``--workers`` value with the cache
that run filled ("warm"). Reported per run: glaciers done, glacier-years and cell-days of the study
period (grid cells × days, every model), wall seconds of selecting, preparing, inferring and
assembling, glacier-years per second of the whole run, and the peak resident memory of the
main process and of its largest worker (``ru_maxrss``). Compiling is not timed apart: the cold
run's inference minus the warm one's estimates it. Not a test; docs/performance.md has numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere


def one(out_dir: str, models: str, workers: int) -> dict:
    """Run the region in this process; its timings and peak memory."""
    sys.path.insert(0, str(REPO))
    from core.apps.region import run_oetztal

    run_oetztal(out_dir, models=models, workers=workers, verbose=False)  # workers=0: this process
    result = json.loads((Path(out_dir) / "timings.json").read_text())
    result["peak_rss_mb_main"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Workers are reaped when the cluster closes: the largest of them.
    result["peak_rss_mb_worker"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result["glacier_years_per_s"] = result["glacier_years"] / result["seconds"]["total"]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="d", help="Published models (default d)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                   help="Worker counts of the warm runs (0: in this process)")
    p.add_argument("--cold_workers", type=int, default=0,
                   help="Dask workers of the cold run (default 0: in one process; make demo uses 2)")
    p.add_argument("--json", type=Path, help="Write the results here")
    p.add_argument("--one", nargs=3, metavar=("OUT_DIR", "MODELS", "WORKERS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], int(args.one[2]))))
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="glaunti-region-bench-") as tmp:
        env = dict(os.environ, GLAUNTI_COMPILATION_CACHE=str(Path(tmp) / "jax_cache"))
        for label, workers in [("cold", args.cold_workers)] + [("warm", w) for w in args.workers]:
            out = Path(tmp) / f"{label}-{workers}"
            proc = subprocess.run([sys.executable, __file__, "--one", str(out), args.models, str(workers)],
                                  cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result["cache"] = label
            results.append(result)
            s = result["seconds"]
            print(f"{label:>4} workers={workers}: {result['glaciers']} glaciers, {result['glacier_years']} "
                  f"glacier-years, {result['cell_days']:.3g} cell-days; prepare {s['prepare']:.0f} s, infer "
                  f"{s['infer']:.0f} s, assemble {s['assemble']:.0f} s, total {s['total']:.0f} s "
                  f"({result['glacier_years_per_s']:.1f} glacier-years/s); peak RSS main "
                  f"{result['peak_rss_mb_main']:.0f} MB, worker {result['peak_rss_mb_worker']:.0f} MB", flush=True)
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "results": results}
    if args.json:
        from core.io import atomic_write_json

        atomic_write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
