"""The workflows behind the top-level scripts: calibrate, infer and evaluate, fine-tune."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import constants
from core import models
from core.evaluate.metrics import evaluate
from core.execute import distributed
from core.execute.sets import GlacierList, GlacierSet, with_study_years
from core.infer.netcdf import SMB_VARIABLE, BatchFiles
from core.infer.runner import run_batches
from core.io import atomic_write_json, check_output_paths
from core.models import (
    DEFAULT_SEED,
    EPOCHS,
    FINETUNE_EPOCHS,
    FINETUNE_LEARNING_RATE,
    FINETUNE_TRAIN_YEARS,
    FINETUNE_VAL_YEARS,
    LEARNING_RATE,
    STARTS_FROM,
    finetuned_name,
    initial_model,
    load_model,
    params_provenance,
    published_params_path,
    uses_facies,
)
from core.train.loop import TrainConfig, train
from dataloader import DataError, Dataset, resolve_data_folder
from glaunti.layouts import inference_layout, layout_for, make_arrays
from glaunti.params import load_params


def calibrate(model_name: str, data_folder=None, epochs=None, learning_rate=LEARNING_RATE,
              params_path=None, log_path=None, seed=DEFAULT_SEED, resume=False, init_params_path=None,
              show_progress=True, test_fold=constants.test_fold, val_fold=constants.val_fold):
    """Train model ``model_name`` on the training folds (``epochs`` default: the published
    schedule, ``core.models.EPOCHS``); returns (best model, final state).

    ``val_fold`` picks the best epoch, ``test_fold`` is held out, every other fold trains
    (defaults: the published split; ``core.apps.crossvalidation`` rotates them).

    Everything that can be checked cheaply is checked before the first compilation: the output
    paths, the starting parameters and every training and validation glacier (read once, to plan
    the batches), so that bad input fails in seconds, not after hours of training.
    """
    epochs = EPOCHS[model_name] if epochs is None else epochs
    params_path = Path(params_path or models.params_path(model_name))
    log_path = Path(log_path or models.log_path(model_name))
    check_output_paths(params_path=params_path, log_path=log_path)
    distributed.setup()  # devices, processes, compilation cache (docs/performance.md)
    dataset = Dataset(resolve_data_folder(data_folder))
    if model_name in STARTS_FROM:  # initial_model loads it again, after the slow checks
        base = STARTS_FROM[model_name]
        start = Path(init_params_path or models.params_path(base))
        if not start.is_file():
            raise FileNotFoundError(f"{start}: model {model_name.upper()} starts from calibrated "
                                    f"model {base.upper()}; run train_{base}.py first (or pass its "
                                    "params file)")
        load_params(base, start)
    split = dataset.split(test_fold, val_fold)
    for label, names in (("validation", split.val), ("training", split.train)):
        if not names:
            raise DataError(dataset.index_path, "column 'fold'", f"gives no {label} glacier (test fold "
                            f"{test_fold}, validation fold {val_fold}), expected at least one")
    model = initial_model(model_name, seed=seed, start_path=init_params_path)
    facies = uses_facies(model_name)
    config = TrainConfig(
        epochs=epochs, learning_rate=learning_rate, params_path=params_path, log_path=log_path,
        resume=resume, show_progress=show_progress,
    )
    # Training layouts: glaciers share compiled functions (glaunti.layouts.LAYOUTS).
    layout = layout_for(model)
    train_set = GlacierSet(dataset, split.train, facies, layout=layout, passes=epochs)
    val_set = GlacierSet(dataset, split.val, facies, layout=layout, passes=epochs + 1)
    # Planning the batches reads every glacier once (filling the tensor cache): a bad file fails
    # now, with its message, before any compilation; the first epoch's batches reuse what it read.
    val_set.batches()
    train_set.batches()
    return train(model, train_set, val_set, config)


def infer_and_evaluate(model_name: str, glacier: str, smb_path, eval_path, params_path=None,
                       data_folder=None, years=None) -> dict:
    """Daily SMB NetCDF + evaluation JSON of one glacier (:func:`infer_and_evaluate_many` of
    one); returns the evaluation dict."""
    return infer_and_evaluate_many(model_name, [glacier], [smb_path], [eval_path], params_path,
                                   data_folder, years)[0]


def infer_and_evaluate_many(model_name: str, glaciers, smb_paths, eval_paths, params_path=None,
                            data_folder=None, years=None) -> list[dict]:
    """Daily SMB NetCDF files (``core.infer.netcdf.BatchFiles``) and evaluation JSONs of several
    glaciers (:func:`infer_many`). The files are those of the glacier run alone, up to float32
    rounding where a batch pads C/D's grid (the masked corrector; docs/performance.md).

    The SMB covers every study year; ``years`` = (first, last) scores only those balance years
    (``core.evaluate.metrics.evaluate``), None all of them. Each evaluation names the parameter
    file and its SHA-256 (``params``). Returns the evaluation dicts in order."""
    glaciers, smb_paths, eval_paths = list(glaciers), list(smb_paths), list(eval_paths)
    if not len(glaciers) == len(smb_paths) == len(eval_paths):
        raise ValueError(f"{len(glaciers)} glaciers need as many SMB and evaluation paths, got "
                         f"{len(smb_paths)} and {len(eval_paths)}")
    for smb_path, eval_path in zip(smb_paths, eval_paths):
        check_output_paths(smb_path=smb_path, eval_path=eval_path)
    results: list = [None] * len(glaciers)

    def files(model, batch, tensors):
        return BatchFiles(tensors, [smb_paths[i] for i in batch.indices], model_name, model.TERMS)

    def evaluate_batch(batch, tensors):
        params = params_provenance(resolve_params_path(model_name, params_path))  # read by now
        for i, glacier_tensors in zip(batch.indices, tensors):
            results[i] = {"params": params, **evaluate_smb_file(glacier_tensors, smb_paths[i], years)}
            atomic_write_json(eval_paths[i], results[i])

    infer_many(model_name, glaciers, files, evaluate_batch, params_path, data_folder)
    return results


def infer_many(model_name: str, glaciers, open_sink, done=None, params_path=None, data_folder=None) -> None:
    """The daily SMB of several glaciers, batched as training batches them
    (``core.execute.sets.GlacierSet``): on a GPU the glaciers of one grid bucket run as one
    vmapped computation, on a CPU one at a time in shape classes that share a compiled function;
    the batches are spread over the local devices (``core.infer.runner.run_batches``: one
    computing thread each, every sink fed from this thread). ``open_sink(model, batch,
    tensors)`` returns the consumer of a batch's years (``core.infer.netcdf.BatchFiles``, a
    region's summaries); ``done(batch, tensors)`` is called once it is committed."""
    distributed.setup()
    dataset = Dataset(resolve_data_folder(data_folder))
    for glacier in glaciers:
        dataset.info(glacier)  # an unknown name fails before anything is loaded
    model = load_model(model_name, resolve_params_path(model_name, params_path))
    glacier_set = GlacierSet(dataset, list(glaciers), uses_facies(model_name), layout=inference_layout(model))
    glacier_set.batches()  # reads every glacier: bad input fails now, before anything compiles
    run_batches(model, glacier_set, lambda batch, tensors: open_sink(model, batch, tensors), done)


def evaluate_smb_file(tensors, smb_path, years=None) -> dict:
    """The evaluation dict of a daily SMB NetCDF written by :func:`infer_and_evaluate`, scoring
    the balance years ``years`` = (first, last) or, with None, every study year. The file is
    read window by window, never whole."""
    import netCDF4

    with netCDF4.Dataset(smb_path) as nc:
        nc.set_auto_mask(False)
        first_day = int(nc.variables["time"][0])
        return evaluate(tensors, _Lazy(nc.variables[SMB_VARIABLE]), first_day, years)


def resolve_params_path(model_name: str, params_path=None) -> Path:
    """``params_path`` if given; else ``params/<model>.eqx`` once trained here; else the
    published weights that ship with the project."""
    if params_path is not None:
        return Path(params_path)
    trained = models.params_path(model_name)
    return trained if trained.is_file() else published_params_path(model_name)


class _Lazy:
    """Slices of a NetCDF variable as float32 numpy arrays (evaluation reads windows only)."""

    def __init__(self, var):
        self.var, self.shape = var, var.shape

    def __getitem__(self, key):
        return np.asarray(self.var[key], dtype=np.float32)


def finetune(glacier: str, data_folder=None, init_params_path=None,
             final_params_path=None, log_path=None, epochs=FINETUNE_EPOCHS,
             learning_rate=FINETUNE_LEARNING_RATE, train_years=FINETUNE_TRAIN_YEARS,
             val_years=FINETUNE_VAL_YEARS, resume=False, show_progress=True, validation="carried"):
    """Per-glacier transfer learning of model A (docs/model.md §7): train on ``train_years``, keep the
    epoch that is best on ``val_years``.

    ``validation="carried"`` is the published rule (an epoch's validation loss continues its
    training pass, no epoch-0 candidate); ``"rerun"`` validates the parameters after each step
    and the starting ones, so that the kept parameters are exactly those validated
    (``core.train.loop``)."""
    init_params_path = init_params_path or models.params_path("a")
    final_params_path = Path(final_params_path or models.params_path(finetuned_name(glacier)))
    log_path = Path(log_path or models.log_path(finetuned_name(glacier)))
    check_output_paths(final_params_path=final_params_path, log_path=log_path)
    distributed.setup()
    dataset = Dataset(resolve_data_folder(data_folder))
    dataset.info(glacier)
    model = load_model("a", init_params_path)
    tensors = dataset.glacier(glacier)
    years = np.asarray(tensors.years)
    for label, (first, last) in (("training", train_years), ("validation", val_years)):
        if not np.any(tensors.study & (years >= first) & (years <= last)):
            raise ValueError(f"{glacier}: no study years in the {label} window {first}–{last} "
                             f"(study years {int(years[tensors.study].min())}–{int(years.max())})")
    arrays = make_arrays(tensors, layout=layout_for(model))  # shares compiled functions
    train_arrays = with_study_years(arrays, years, *train_years)
    val_arrays = with_study_years(arrays, years, *val_years)
    config = TrainConfig(
        epochs=epochs, learning_rate=learning_rate, params_path=final_params_path, log_path=log_path,
        resume=resume, show_progress=show_progress, validation=validation,
    )
    return train(model, GlacierList([(glacier, train_arrays)]), GlacierList([(glacier, val_arrays)]), config)
