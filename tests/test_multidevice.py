"""Training on several devices and several processes gives bit-identical parameters to one device,
and the training layouts (padding to shared shapes, packed cells) do not change the golden numbers.

Device counts and ``jax.distributed`` must be configured before JAX starts, so those runs happen
in subprocesses (docs/performance.md)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest

from conftest import PUBLISHED, reference_path
from core.models import load_model, uses_facies
from core.train.loop import loss_and_grad
from glaunti.layouts import cell_bucket, make_arrays

REPO = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-4, 1e-5

TRAIN = """
import sys
from core.workflows import calibrate
import jax
calibrate(sys.argv[1], data_folder=sys.argv[2], epochs=2, learning_rate=0.05, params_path=sys.argv[3],
          log_path=sys.argv[4], show_progress=False)
print("devices", jax.device_count(), "processes", jax.process_count(), flush=True)
"""


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLAUNTI_", "SLURM_"))}
    env["GLAUNTI_COMPILATION_CACHE"] = str(tmp_path / "jax_cache")  # shared: later runs reuse compiles
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _train(tmp_path, model, twin, tag, env, check=True):
    out = tmp_path / tag
    args = [sys.executable, "-c", TRAIN, model, str(twin), str(out / f"{model}.eqx"), str(out / f"{model}.csv")]
    return out, subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_rows(path):
    import csv

    return [(r["epoch"], r["glacier"], r["subset"], r["loss"]) for r in csv.DictReader(open(path))]


@pytest.fixture(scope="module")
def single(tiny_twin, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    out, proc = _train(tmp, "a", tiny_twin, "one", _env(tmp, GLAUNTI_CPU_DEVICES="1"))
    assert "devices 1 processes 1" in _finish(proc)
    return tmp, out


def test_four_devices_bit_identical(single, tiny_twin):
    tmp, one = single
    env = _env(tmp, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out, proc = _train(tmp, "a", tiny_twin, "four", env)
    assert "devices 4 processes 1" in _finish(proc)
    assert (out / "a.eqx").read_bytes() == (one / "a.eqx").read_bytes()
    assert _log_rows(out / "a.csv") == _log_rows(one / "a.csv")


def test_two_processes_bit_identical(single, tiny_twin):
    tmp, one = single
    port = _free_port()
    procs = []
    for pid in range(2):
        env = _env(tmp, GLAUNTI_COORDINATOR=f"127.0.0.1:{port}", GLAUNTI_NUM_PROCESSES="2",
                   GLAUNTI_PROCESS_ID=str(pid), GLAUNTI_CPU_DEVICES="1")
        procs.append(_train(tmp, "a", tiny_twin, "two", env))
    outputs = [_finish(p) for _, p in procs]
    assert all("processes 2" in o for o in outputs)
    out = procs[0][0]
    assert (out / "a.eqx").read_bytes() == (one / "a.eqx").read_bytes()
    assert _log_rows(out / "a.csv") == _log_rows(one / "a.csv")
    assert not list(out.glob("*.tmp"))


# --- the training layouts reproduce the golden loss and gradient ------------------------------

def _expected():
    return json.loads(reference_path("tiny_expected", "loss.json").read_text())


@pytest.mark.parametrize("model_name,layout", [("a", "cells"), ("a", "padded"), ("b", "cells")])
def test_training_layouts_match_golden(model_name, layout, tiny_reference_dataset):
    model = load_model(model_name, PUBLISHED / f"{model_name}.eqx")
    trainable, static = eqx.partition(model, model.trainable_filter())
    value_and_grad = loss_and_grad
    for name in tiny_reference_dataset.names:
        tensors = tiny_reference_dataset.glacier(name)
        want = _expected()["glaciers"][name][model_name]
        exact = make_arrays(tensors, facies=uses_facies(model_name))
        arrays = make_arrays(tensors, facies=uses_facies(model_name), layout=layout)
        assert arrays.n_years % 8 == 0 and arrays.temperature_2m.shape[0] % 2048 == 0
        if layout == "cells":
            assert arrays.shape[0] == 1 and arrays.shape[1] == cell_bucket(arrays.shape[1])
        (loss, terms), grad = value_and_grad(trainable, static, arrays)
        (loss_x, _), grad_x = value_and_grad(trainable, static, exact)
        np.testing.assert_allclose(float(loss), want["loss"], rtol=RTOL, atol=ATOL, err_msg=name)
        for key, wanted in want["aux"].items():
            if wanted is not None:
                np.testing.assert_allclose(float(terms[key]), wanted, rtol=RTOL, atol=ATOL, err_msg=f"{name} {key}")
        for g, gx in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(grad_x)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(gx), rtol=RTOL, atol=ATOL, err_msg=name)
        if "grad_global_norm" in want:
            norm = float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2)
                                     for g in jax.tree_util.tree_leaves(grad))))
            np.testing.assert_allclose(norm, want["grad_global_norm"], rtol=RTOL)


def test_cell_buckets():
    assert cell_bucket(1) == 128 and cell_bucket(128) == 128
    assert [cell_bucket(n) for n in (129, 161, 257, 300, 1000)] == [160, 192, 320, 320, 1024]
    for n in range(1, 20000, 37):
        b = cell_bucket(n)
        assert b >= n and (b <= 128 or b <= 1.25 * n + 1)


@pytest.mark.parametrize("model_name", ["a", "b"])
def test_cell_chunking_is_exact(model_name, tiny_reference_dataset):
    """The memory guard (chunks of cells) gives the same loss and gradient as one piece."""
    from core.train.loss import glacier_loss
    from glaunti import glacier

    model = load_model(model_name, PUBLISHED / f"{model_name}.eqx")
    trainable, static = eqx.partition(model, model.trainable_filter())
    tensors = tiny_reference_dataset.glacier(tiny_reference_dataset.names[0])
    arrays = make_arrays(tensors, layout="cells")

    def loss(trainable, limit):
        old, glacier.MAX_CHUNK_CELLS = glacier.MAX_CHUNK_CELLS, limit
        try:
            return glacier_loss(eqx.combine(trainable, static), arrays)[0]
        finally:
            glacier.MAX_CHUNK_CELLS = old

    whole = eqx.filter_jit(eqx.filter_value_and_grad(lambda t: loss(t, None)))(trainable)
    chunked = eqx.filter_jit(eqx.filter_value_and_grad(lambda t: loss(t, 48)))(trainable)  # 3 chunks
    np.testing.assert_allclose(float(chunked[0]), float(whole[0]), rtol=1e-6)
    for g, w in zip(jax.tree_util.tree_leaves(chunked[1]), jax.tree_util.tree_leaves(whole[1])):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=RTOL, atol=ATOL)


INFER_MANY = """
import hashlib, json, sys
from pathlib import Path
import jax, netCDF4, numpy as np
import core.infer.runner
from core.workflows import infer_and_evaluate_many
core.infer.runner.inference_devices = lambda batches, n: [j % n for j in range(len(batches))]  # all busy
from dataloader import Dataset
out = Path(sys.argv[2])
names = Dataset(sys.argv[1]).names
results = infer_and_evaluate_many("a", names, [out / f"{n}.nc" for n in names], [out / f"{n}.json" for n in names],
                                  params_path=sys.argv[3], data_folder=sys.argv[1])
hashes = []
for n in names:
    with netCDF4.Dataset(out / f"{n}.nc") as nc:
        hashes.append(hashlib.sha256(np.ascontiguousarray(nc["smb"][:].filled(np.nan)).tobytes()).hexdigest())
print("MANY", json.dumps([jax.local_device_count(), hashes, results]), flush=True)
"""


def test_batched_inference_on_several_devices_writes_what_one_device_writes(tiny_reference_copy, tmp_path):
    """infer_and_evaluate_many with its batches on 3 devices (three computing threads, the files
    written from one) writes the same files and evaluations as on one device."""
    outputs = []
    for tag, devices in (("one", "1"), ("three", "3")):
        env = _env(tmp_path, GLAUNTI_CPU_DEVICES=devices)
        proc = subprocess.run([sys.executable, "-c", INFER_MANY, str(tiny_reference_copy), str(tmp_path / tag),
                               str(PUBLISHED / "a.eqx")], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("MANY "))
        outputs.append(json.loads(line[len("MANY "):]))
    assert outputs[0][0] == 1 and outputs[1][0] == 3
    assert outputs[0][1:] == outputs[1][1:]


def test_a_failing_device_thread_leaves_no_unfinished_files(tiny_reference_copy, tmp_path, monkeypatch):
    """An error while one device computes reaches the caller, stops the other threads, and leaves
    neither the unfinished batches' files nor temporaries; batches already written stay whole."""
    import jax

    from core.execute.sets import GlacierSet
    from core.infer import runner as inference
    from core.infer.netcdf import BatchFiles
    from dataloader import Dataset
    from glaunti.layouts import inference_layout

    dataset = Dataset(tiny_reference_copy)
    model = load_model("a", PUBLISHED / "a.eqx")
    glaciers = GlacierSet(dataset, dataset.names, False, layout=inference_layout(model))
    assert len(glaciers.batches()) > 1  # two computing threads
    failing = glaciers.batches()[-1].indices[0]
    real = inference.batch_series

    def batch_series(model, batch, tensors, verbose=True, terms=False):
        for n, piece in enumerate(real(model, batch, tensors, verbose, terms)):
            if n == 1 and tensors[0].name == dataset.names[failing]:
                raise RuntimeError("device lost")
            yield piece

    monkeypatch.setattr(inference, "batch_series", batch_series)
    monkeypatch.setattr(inference, "inference_devices", lambda batches, n: [j % n for j in range(len(batches))])
    out = tmp_path / "smb"
    out.mkdir()
    paths = [out / f"{n}.nc" for n in dataset.names]
    written = []
    device = jax.local_devices()[0]
    with pytest.raises(RuntimeError, match="device lost"):
        inference.run_batches(model, glaciers,
                              lambda batch, tensors: BatchFiles(tensors, [paths[i] for i in batch.indices], "a",
                                                                model.TERMS),
                              done=lambda batch, tensors: written.extend(batch.indices),
                              devices=[device, device], verbose=False)
    assert not (out / f"{dataset.names[failing]}.nc").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{dataset.names[i]}.nc" for i in written)


SHARED_COMPILE = """
import json, sys
from core.execute import distributed
distributed.setup(cpu_devices=2)
import equinox as eqx, jax, numpy as np
from core.models import load_model
from core.execute.sets import GlacierList
from core.train.loop import evaluate_glaciers, loss_and_grad
from dataloader import Dataset
from glaunti.layouts import make_arrays
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
dataset = Dataset(sys.argv[1], cache_dir=sys.argv[2])
name = dataset.names[0]
model = load_model("a", sys.argv[3])
trainable, static = eqx.partition(model, model.trainable_filter())
arrays = make_arrays(dataset.glacier(name))
evaluation = evaluate_glaciers(loss_and_grad, trainable, static, GlacierList([(name, arrays), (name, arrays)]),
                               True, verbose=False)
print("RESULT", json.dumps({"shared": distributed.executables_shared(), "hits": len(hits),
                            "losses": [r.loss for r in evaluation.results],
                            "grads_equal": bool(np.array_equal(evaluation.grads[0][2], evaluation.grads[1][2]))}))
"""


@pytest.mark.parametrize("cache", ["on", "off"])
def test_cpu_devices_share_one_compile(tiny_reference_dataset, tmp_path, cache):
    """The same glacier on two CPU devices: with the persistent cache, the second device loads
    the executable the first one compiled (one cache hit) and computes the same loss and
    gradient bit for bit; without it, each device compiles its own."""
    env = _env(tmp_path, GLAUNTI_COMPILATION_CACHE=str(tmp_path / "jax_cache") if cache == "on" else "0")
    proc = subprocess.run([sys.executable, "-c", SHARED_COMPILE, str(tiny_reference_dataset.folder),
                           str(tmp_path / "tensors"), str(PUBLISHED / "a.eqx")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    assert result["shared"] is (cache == "on")
    assert result["hits"] == (1 if cache == "on" else 0)
    assert result["losses"][0] == result["losses"][1] and result["grads_equal"]
