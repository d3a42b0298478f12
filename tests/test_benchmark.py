"""The benchmark script keeps working (a reduced run: tiny twin, one model, one epoch).

It measures nothing here: timings belong to benchmarks/benchmark.py runs (docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_runs_and_writes_json(tiny_twin, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "benchmark.py"), "--data_folder", str(tiny_twin),
         "--models", "a", "--epochs", "1", "--glaciers", "1", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cell_days_per_s" in proc.stdout  # the table
    report = json.loads(out.read_text())
    assert report["machine"]["cpus"] >= 1
    (result,) = report["results"]
    assert result["model"] == "a" and result["glaciers"] == 1
    for key in ("compile_s", "epoch_s", "cell_days_per_s", "inference_s_per_glacier_year",
                "peak_host_rss_mb", "floor_s", "epoch_over_floor", "bandwidth_bytes_per_s"):
        assert result[key] > 0, key
    assert len(result["epochs_s"]) == 2
    # Batching: one glacier here, so the sequential day steps are the glacier's (training and
    # validation: one batch each, one compiled shape bucket each at most).
    assert result["glacier_day_steps"] >= result["sequential_day_steps"] > 0
    assert 1 <= result["compiled_shapes"] <= result["compiled_programs"] <= 2
    assert [len(b) for b in result["batches"]["train"]] == [1]
    gpu = result["gpu_plan"]  # planned, not run
    assert gpu["glacier_day_steps"] == result["glacier_day_steps"] >= gpu["sequential_day_steps"] > 0


def test_gpu_check_runs_on_cpu_and_writes_one_json(tiny_twin, tmp_path):
    """The GPU check's CI preset (benchmarks/gpu_check.py --preset ci): both of its runs (the
    default device, then the CPU forced) and the ratios land in one JSON."""
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--preset", "ci", "--data_folder",
         str(tiny_twin), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device_kind"] and report["on_accelerator"] is False  # CI has no accelerator
    for run in ("device", "cpu"):
        (row,) = report[run]["models"].values()
        assert row["model"] == "a" and row["devices"] and row["device_kind"]
        for key in ("compile_s", "first_epoch_s", "epoch_s", "sequential_day_steps", "cell_days_per_s",
                    "batched_inference_s", "gpu_plan_sequential_day_steps"):
            assert row[key] > 0, (run, key)
        assert row["batched_inference_glaciers"] == 2 and "peak_device_mb" in row
    assert report["cpu"]["models"]["a"]["device_kind"].lower() == "cpu"
    assert set(report["device_over_cpu"]["a"]) == {"epoch_cell_days_per_s", "inference_glacier_years_per_s"}
