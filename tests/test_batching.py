"""Glaciers of one shape bucket run as one vmapped computation (core.execute.sets batches,
core.train.loss.batch_loss): per-glacier losses, terms and the summed gradient equal the per-glacier
engine's, the grid padding of "padded_grid" is inert, and batches depend only on the glaciers
and the memory budget (docs/performance.md)."""

from __future__ import annotations

import json

import equinox as eqx
import jax
import numpy as np
import pytest

from conftest import PUBLISHED, reference_path
from core.execute.sets import GlacierSet, GlacierShape, assign_devices, plan_batches
from core.models import load_model
from core.train.loop import evaluate_glaciers, loss_and_grad, sum_gradients
from core.train.loss import batch_loss, glacier_loss
from dataloader import Dataset
from glaunti.layouts import (
    GlacierBatch,
    grid_bucket,
    layout_host_arrays,
    make_arrays,
    pad_host_grid,
    pad_host_stakes,
    side_bucket,
    stack_host_arrays,
    to_device,
)

# Golden tolerance (tests/test_golden.py); the batch differs from the per-glacier engine only in
# float32 summation order.
RTOL, ATOL = 1e-4, 1e-5


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(g, np.float32)) for g in jax.tree_util.tree_leaves(tree)])


def test_grid_buckets():
    assert [side_bucket(n) for n in (1, 16, 24, 32, 33, 41, 64, 65, 396, 514)] == \
        [32, 32, 32, 32, 40, 48, 64, 80, 448, 640]
    # The demo twin's four grid shapes share one bucket (on a GPU).
    assert {grid_bucket(*s) for s in ((16, 24), (24, 16), (24, 24), (24, 32))} == {(32, 32)}
    for n in range(33, 2000):
        assert n <= side_bucket(n) <= 1.25 * n and side_bucket(n) % 8 == 0


def test_padded_grid_is_inert_padding(tiny_reference_dataset):
    tensors = tiny_reference_dataset.glacier(tiny_reference_dataset.names[0])
    exact = layout_host_arrays(tensors, layout="padded")
    alone = layout_host_arrays(tensors, layout="padded_grid")  # a glacier is padded by its batch
    height, width = exact["climate_cell"].shape
    assert alone["climate_cell"].shape == (height, width) and not alone.get("grid_padded", False)
    padded = pad_host_grid(alone, *grid_bucket(height, width))
    assert padded["climate_cell"].shape == (32, 32)
    assert list(padded["grid_size"]) == [height, width]
    for name in ("climate_cell", "lapse_offset", "outlines", "fields"):
        np.testing.assert_array_equal(padded[name][..., :height, :width], exact[name])
        assert not np.any(padded[name][..., height:, :]) and not np.any(padded[name][..., :, width:])
    # The same cells (row, column), re-indexed into the padded grid; padding = H'·W'.
    h2, w2 = padded["climate_cell"].shape
    real = exact["loss_cells"] < height * width
    np.testing.assert_array_equal(padded["loss_cells"] < h2 * w2, real)
    np.testing.assert_array_equal(np.divmod(padded["loss_cells"][real], w2),
                                  np.divmod(exact["loss_cells"][real], width))
    assert np.all(padded["loss_cells"][~real] == h2 * w2)
    for name in ("stake_row", "stake_col", "stake_year", "stake_balance"):
        np.testing.assert_array_equal(padded[name], exact[name])


def _shape(index, key, dims, footprint, years=(True, True, False)):
    return GlacierShape(index, key, dims, 64, 128, footprint, np.array(years))


def test_batches_follow_buckets_and_budget():
    """On a GPU (no compile cost): coarse grid buckets; "cells" rows pad to the batch's largest."""
    p, q = ("grid", (3, 8), (2048, 16), 1), ("grid", (4, 8), (2048, 16), 1)
    # Footprints as if on the 32×32 bucket: 0 → 32, 2 → 26.7, 3 → 40, 4 → 32; order 3, 0, 2, 4.
    shapes = [_shape(0, p, (24, 16), 12), _shape(1, q, (40, 32), 40), _shape(2, p, (16, 24), 10),
              _shape(3, p, (32, 32), 40), _shape(4, p, (8, 8), 2)]
    plan = plan_batches(shapes, budget=100)
    # Per bucket, largest cells first (ties by index), as many as fit when each costs the
    # batch's largest footprint; batches in the order of their first glacier.
    assert [b.indices for b in plan] == [(3, 0), (1,), (2, 4)]
    assert plan[2].walked_years == 2 and plan[2].glacier_years == 4 and plan[2].block_length == 8
    assert plan[2].grid == (32, 32) and plan[2].describe() == "32×32, 2 glaciers"
    cells = plan_batches([_shape(0, ("cells",) + p[1:], (1, 128), 1), _shape(1, ("cells",) + p[1:], (1, 320), 1)], 100)
    assert [(b.indices, b.grid) for b in cells] == [((1, 0), (1, 320))]  # rows padded to the largest
    assert [b.indices for b in plan_batches(shapes, budget=1)] == [(0,), (1,), (2,), (3,), (4,)]
    big = plan_batches(shapes, budget=10**9)
    assert [b.indices for b in big] == [(3, 0, 2, 4), (1,)] and big[0].glacier_years == 8
    assert plan_batches(shapes, budget=100) == plan  # depends on nothing else


def test_cpu_batches_weigh_compiles_against_padding():
    """On a CPU a glacier is padded to another's grid only when the compile saved costs more
    than the padded cell-days over the planned passes."""
    key = ("grid", (3, 8), (2048, 16), 1)  # 2 years with days × 8 days per glacier
    shapes = [_shape(0, key, (24, 16), 1), _shape(1, key, (16, 24), 1), _shape(2, key, (24, 24), 1),
              _shape(3, key, (24, 24), 1)]
    # Padding 24×16 and 16×24 to 24×24 adds 2 × 192 cells × 16 days per pass.
    extra = 2 * 192 * 16
    # One glacier per batch (a vmapped batch costs more than its glaciers in turn on a CPU); a
    # class's batches share one signature, hence one compiled function.
    one = plan_batches(shapes, 10**9, passes=10, compile_cell_days=2 * 10 * extra + 1)
    assert [(b.indices, b.grid) for b in one] == [((i,), (24, 24)) for i in range(4)]
    assert len({b.signature for b in one}) == 1
    # The class mixes padded glaciers and two that fill its grid: all four run the padded path.
    assert all(b.padded for b in one)
    own = plan_batches(shapes, 10**9, passes=10, compile_cell_days=10 * 192 * 16 - 1)
    assert [b.grid for b in own] == [(24, 16), (16, 24), (24, 24), (24, 24)]
    assert len({b.signature for b in own}) == 3
    assert not any(b.padded for b in own)
    assert not any(b.grid == (32, 32) for b in plan_batches(shapes, 10**9, 1, 1e12))  # own sides only
    rows = [_shape(i, ("cells",) + key[1:], (1, n), 1) for i, n in enumerate((128, 160, 160, 1024))]
    plan = plan_batches(rows, 10**9, passes=50, compile_cell_days=50 * 32 * 16 * 1.5)
    assert [b.grid for b in plan] == [(1, 160), (1, 160), (1, 160), (1, 1024)]


def test_a_padded_class_runs_every_glacier_padded(tiny_reference_dataset):
    """A batch of a class that holds padded glaciers carries ``grid_padded`` (C/D's padded
    corrector) even where its glacier fills the class's grid, so that the class compiles one
    function; without padding in the class it runs the exact path. A/B never see the flag."""
    dataset = tiny_reference_dataset
    height, width = make_arrays(dataset.glacier(dataset.names[0])).shape
    for padded in (True, False):
        glaciers = GlacierSet(dataset, dataset.names, False, layout="padded_grid")
        exact = glaciers.batches()[0]._replace(indices=(0,), grid=(height, width))
        glaciers._plan = [exact._replace(padded=padded)]
        ((_, _, arrays),) = glaciers.iter_batches([(0, None)])
        assert arrays.arrays.grid_padded is padded
        assert arrays.arrays.climate_cell.shape[-2:] == (height, width)
    cells = GlacierSet(dataset, dataset.names, False, layout="cells")
    cells._plan = [cells.batches()[0]._replace(padded=True)]
    ((_, _, arrays),) = cells.iter_batches([(0, None)])
    assert not arrays.arrays.grid_padded


def test_device_assignment_weighs_compiles_against_balance():
    """A shape class stays on one device unless splitting it over the devices saves more time
    than its extra compile; several small classes go to different devices."""
    key = ("grid", (3, 8), (2048, 16), 1)
    shapes = [_shape(0, key, (24, 16), 1), _shape(1, key, (24, 16), 1), _shape(2, key, (24, 24), 1),
              _shape(3, key, (24, 24), 1)]
    plan = plan_batches(shapes, 10**9, passes=1, compile_cell_days=1.0)  # one batch per glacier, own grids
    assert [b.grid for b in plan] == [(24, 16), (24, 16), (24, 24), (24, 24)]
    per_pass = [b.grid[0] * b.grid[1] * 16 for b in plan]  # 16 days each
    # Compiles dear: each class whole on one device, the larger first.
    assert assign_devices(plan, 2, passes=1, compile_cell_days=10 * sum(per_pass)) == [1, 1, 0, 0]
    # Compiles cheap against many passes: every class split over both devices.
    assert assign_devices(plan, 2, passes=100, compile_cell_days=1.0) == [0, 1, 0, 1]
    assert assign_devices(plan, 1, passes=100) == [0, 0, 0, 0]
    # Idle devices compile in parallel: each glacier on its own.
    assert sorted(assign_devices(plan, 4, passes=1, compile_cell_days=10 * sum(per_pass))) == [0, 1, 2, 3]


def _expected():
    return json.loads(reference_path("tiny_expected", "loss.json").read_text())["glaciers"]


@pytest.mark.parametrize("model_name,layout", [("a", "cells"), ("a", "padded_grid"), ("b", "cells")])
def test_batched_equals_per_glacier(model_name, layout, tiny_reference_dataset, capsys):
    """All three tiny glaciers (grids 12×17, 16×11, 9×13) in one batch: each glacier's loss and
    terms and the summed gradient equal the per-glacier engine on the exact grid (and the
    golden numbers); the first call of the batch's shape says that it compiles."""
    dataset = tiny_reference_dataset
    model = load_model(model_name, PUBLISHED / f"{model_name}.eqx")
    trainable, static = eqx.partition(model, model.trainable_filter())
    value_and_grad = loss_and_grad
    glaciers = GlacierSet(dataset, dataset.names, False, layout=layout, target="gpu")  # vmapped
    (batch,) = glaciers.batches()
    assert sorted(batch.indices) == [0, 1, 2]

    evaluation = evaluate_glaciers(value_and_grad, trainable, static, glaciers, True)
    assert "compiling model A gradient" in capsys.readouterr().err or model_name != "a"
    total = flat(sum_gradients(evaluation.grads, evaluation.treedef, trainable))
    want_grad = 0.0
    for i, name in enumerate(dataset.names):
        (loss, terms), grad = value_and_grad(trainable, static, make_arrays(dataset.glacier(name)))
        want_grad = want_grad + flat(grad)
        got = evaluation.results[i]
        assert got.name == name
        np.testing.assert_allclose(got.loss, float(loss), rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(got.loss, _expected()[name][model_name]["loss"], rtol=RTOL, atol=ATOL)
        for key, value in terms.items():
            if got.terms[key] is not None:
                np.testing.assert_allclose(got.terms[key], float(value), rtol=2e-5, atol=1e-9, err_msg=key)
    np.testing.assert_allclose(total, want_grad, rtol=RTOL, atol=ATOL)

    evaluate_glaciers(value_and_grad, trainable, static, glaciers, True)
    assert "compiling" not in capsys.readouterr().out  # compiled once


def _shorter(h: dict) -> dict:
    """The glacier with its last real year removed (as a glacier with one year less: no valid
    day, not scored) and other weather and stakes, so that a batch mixes years run and skipped."""
    h = dict(h)
    last = int(np.flatnonzero(np.any(h["day_valid"], axis=1))[-1])
    h["day_valid"] = h["day_valid"].copy()
    h["day_valid"][last] = False
    h["study"] = h["study"].copy()
    h["study"][last] = False
    h["temperature_2m"] = h["temperature_2m"] + np.float32(0.7)
    h["precipitation"] = h["precipitation"] * np.float32(0.9)
    h["stake_balance"] = h["stake_balance"] - np.float32(0.2)
    return h


C_GRADIENT_NOISE = 1e-3  # measured: 8e-5


def test_batched_c_equals_per_glacier(tiny_reference_dataset):
    """Model C: a batch of the tiny glaciers on their shape bucket, one of them a year shorter,
    equals each glacier run alone on the same arrays (loss, terms, summed gradient). C's
    corrector sees the padded grid in both (its masking of the padding is tested with it)."""
    dataset = tiny_reference_dataset
    model = load_model("c", PUBLISHED / "c.eqx")
    trainable, static = eqx.partition(model, model.trainable_filter())
    hosts = [pad_host_grid(layout_host_arrays(dataset.glacier(name), layout="padded_grid"), 32, 32)
             for name in dataset.names]
    hosts[1] = _shorter(hosts[1])
    batch = GlacierBatch(to_device(stack_host_arrays(hosts, grid_padded=True)))
    # Alone, each with the batch's (inert) stake padding: one compile of C's gradient, not one
    # per stake count.
    stakes = max(len(h["stake_year"]) for h in hosts)
    hosts = [{**pad_host_stakes(h, stakes), "grid_padded": True} for h in hosts]

    def batched(t):
        return batch_loss(eqx.combine(t, static), batch, custom_vjp=True)

    def alone(t, arrays):
        return glacier_loss(eqx.combine(t, static), arrays, custom_vjp=True)

    (_, (losses, terms)), grad = eqx.filter_jit(eqx.filter_value_and_grad(batched, has_aux=True))(trainable)
    one = eqx.filter_jit(eqx.filter_value_and_grad(alone, has_aux=True))
    want_grad = 0.0
    for i, h in enumerate(hosts):
        (loss, want_terms), g = one(trainable, to_device(h))
        want_grad = want_grad + flat(g)
        np.testing.assert_allclose(float(losses[i]), float(loss), rtol=1e-5)
        for key, value in want_terms.items():
            np.testing.assert_allclose(float(terms[key][i]), float(value), rtol=2e-5, atol=1e-9, err_msg=key)
    # On these tiny grids the corrector's innermost norms see one or two cells, and the gradient
    # of every layer upstream of them is float32 rounding noise of ~5e-3 relative (a float64 run
    # of the same code differs by that much; tests/test_training_reproduction.py): another
    # summation order (vmapped or not) moves single elements by as much. Compared as a whole.
    difference = np.linalg.norm(flat(grad) - want_grad) / np.linalg.norm(want_grad)
    assert difference < C_GRADIENT_NOISE, difference


@pytest.mark.parametrize("model_name", ["a", "c"])
def test_batched_inference_equals_per_glacier(model_name, tiny_reference_dataset, tmp_path):
    """The daily SMB files of a vmapped inference batch (grids padded to the 32×32 bucket) hold
    each glacier's own grid and days, equal to its run alone on the exact grid within the golden
    tolerance (vmapped, XLA fuses A's day step otherwise: 0.1 % of values 1 ulp off, carried in
    the snowpack to 7e-6 m w.e. on a few days; C's masked corrector also sums in another order)."""
    import xarray as xr

    from core.infer.runner import iter_daily_smb, write_daily_smb_batch
    from core.models import uses_facies
    from glaunti.layouts import inference_layout

    dataset = tiny_reference_dataset
    model = load_model(model_name, PUBLISHED / f"{model_name}.eqx")
    glaciers = GlacierSet(dataset, dataset.names, uses_facies(model_name), layout=inference_layout(model),
                          target="gpu")
    (batch,) = glaciers.batches()
    assert len(batch.indices) == 3 and batch.grid == (32, 32)
    [(_, _, arrays)] = list(glaciers.iter_batches([(0, None)]))
    tensors = [dataset.glacier(dataset.names[i]) for i in batch.indices]
    paths = [tmp_path / f"{t.name}.nc" for t in tensors]
    spans = write_daily_smb_batch(model, arrays, tensors, paths, model_name)
    for t, path, (first_day, n_days) in zip(tensors, paths, spans):
        chunks = list(iter_daily_smb(model, make_arrays(t, facies=uses_facies(model_name)), t))
        want = np.concatenate([c for _, c in chunks])
        assert (first_day, n_days) == (chunks[0][0], len(want))
        with xr.open_dataset(path) as ds:
            got = ds["smb"].values
            np.testing.assert_array_equal(ds["x"].values, t.x)
        assert got.shape == want.shape == (n_days, len(t.y), len(t.x))
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_infer_and_evaluate_many_writes_what_one_by_one_writes(tiny_reference_copy, tmp_path):
    """The batched entry point (as the demo uses it) gives each glacier the evaluation that
    infer_and_evaluate gives it alone."""
    from core.workflows import infer_and_evaluate, infer_and_evaluate_many

    names = Dataset(tiny_reference_copy).names
    many = infer_and_evaluate_many("a", names, [tmp_path / "many" / f"{n}.nc" for n in names],
                                   [tmp_path / "many" / f"{n}.json" for n in names],
                                   params_path=PUBLISHED / "a.eqx", data_folder=tiny_reference_copy)
    for name, result in zip(names, many):
        alone = infer_and_evaluate("a", name, tmp_path / "one" / f"{name}.nc", tmp_path / "one" / f"{name}.json",
                                   params_path=PUBLISHED / "a.eqx", data_folder=tiny_reference_copy)
        assert result == alone
        assert json.loads((tmp_path / "many" / f"{name}.json").read_text()) == json.loads(
            (tmp_path / "one" / f"{name}.json").read_text())


def test_shared_shapes_compile_beside_each_other():
    """With executables shared between devices, a shape only one device runs compiles there and
    a shared one on the device with the fewest shapes to compile, not after another shape."""
    from core.execute.sets import WorkItem
    from core.train.loop import _compiling_devices

    work = [WorkItem((j,), s, "") for j, s in enumerate(("big", "big", "small", "big"))]
    compiler = _compiling_devices(work, object(), None, {"d0": [0, 3], "d1": [1, 2]})
    assert compiler == {0: "d0", 3: "d0", 1: "d0", 2: "d1"}
    compiler = _compiling_devices(work, object(), None, {"d0": [0, 1, 2, 3]})
    assert set(compiler.values()) == {"d0"}
