"""Cross-validation over the folds of a dataset, with a locally calibrated baseline
(docs/crossvalidation.md).

Rotation ``k`` tests fold ``k``, validates on the next fold (cyclically, in the dataset's
ascending fold order) and trains on all others, with the published schedule A → B → C → D.
For each test glacier, model A is also fine-tuned on the glacier's own early years (the
published fine-tuning, ``core.workflows.finetune``) and scored, side by side with every transferred
model, on the glacier's later years only (:func:`local_split`).

Everything goes under one output folder::

    crossvalidation.json           the run's settings; a resumed run must ask for the same
    fold_<k>/params/<m>.eqx        transferred models (checkpoints beside them)
    fold_<k>/logs/<m>.csv
    fold_<k>/eval/<m>/<glacier>.json          all study years of each test glacier
    fold_<k>/local/windows.json               each test glacier's training/validation/evaluation years
    fold_<k>/local/params/<glacier>.eqx       A fine-tuned on the glacier (logs in local/logs/)
    fold_<k>/local/eval/<m>/<glacier>.json    the evaluation years only; m = a_local, a, b, c, d
    fold_<k>/done/<stage>.json     written last: the stage (a model, or a_local) is complete
    summary.txt, summary.json      pooled, per-fold and local-baseline tables
    per_fold_rmse.png              per-fold RMSE of every model
    timings.json                   wall time of each completed stage (for the estimate only)

A stage whose marker exists is skipped; an interrupted one continues: training from its
checkpoint (bit-identical to an uninterrupted run), evaluation from the glaciers not yet
written. The tables depend only on the evaluation files, so a resumed run ends with the same
tables, byte for byte, as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from core.evaluate.summary import SummaryError, format_spread_table, format_table, pool_folders, spread
from core.execute import distributed
from core.execute.compiles import release_compiled
from core.io import atomic_path, atomic_write_json, atomic_write_text
from core.models import (
    DEFAULT_SEED,
    DESCRIPTIONS,
    EPOCHS,
    FINETUNE_EPOCHS,
    FINETUNE_TRAIN_YEARS,
    FINETUNE_VAL_YEARS,
    MODELS,
    STARTS_FROM,
)
from core.workflows import (
    calibrate,
    evaluate_smb_file,
    finetune,
    infer_and_evaluate,
    infer_and_evaluate_many,
)
from dataloader.dataset import Dataset, resolve_data_folder

SETTINGS = "crossvalidation.json"
LOCAL = "a_local"  # the stage and the evaluation folder of the locally calibrated A
LOCAL_LABEL = "A local (fine-tuned on the glacier's own early years)"


# --- which folds, which years ------------------------------------------------------------------


@dataclass(frozen=True)
class Rotation:
    """One split of the folds: ``test`` held out, ``val`` picks the best epoch, ``train`` calibrates."""

    test: int
    val: int
    train: tuple[int, ...]

    @property
    def folder(self) -> str:
        return f"fold_{self.test}"


def rotations(fold_ids: Sequence[int], test_folds: Sequence[int] | None = None) -> list[Rotation]:
    """The rotation of each test fold (default: every fold): validation is the next fold in
    ascending order, the last one wrapping round to the first."""
    folds = sorted(set(int(f) for f in fold_ids))
    if len(folds) < 3:
        raise ValueError(f"cross-validation needs at least 3 folds (test, validation, training); "
                         f"the dataset has {folds}")
    wanted = folds if test_folds is None else list(dict.fromkeys(int(f) for f in test_folds))
    unknown = [f for f in wanted if f not in folds]
    if unknown:
        raise ValueError(f"--folds {unknown}: not folds of the dataset, expected some of {folds}")
    out = []
    for k in wanted:
        i = folds.index(k)
        val = folds[(i + 1) % len(folds)]
        out.append(Rotation(k, val, tuple(f for f in folds if f not in (k, val))))
    return out


@dataclass(frozen=True)
class LocalSplit:
    """A glacier's own years for the local baseline, each (first, last) inclusive."""

    train: tuple[int, int]
    val: tuple[int, int]
    evaluation: tuple[int, int]
    rule: str  # "published" or "quarters"


def local_split(study_years: Sequence[int]) -> LocalSplit | None:
    """Training, validation and evaluation years of the locally calibrated A on one glacier.

    The published fine-tuning windows (train 1995–2012, validate 2013–2018) when the glacier has
    study years in both and after 2018, which are then the evaluation years. Otherwise (the
    synthetic twins end before 2013) the same shape from the glacier's own study years: the last
    quarter evaluates, the quarter before it validates, the rest trains, each at least one year.
    None for fewer than three study years."""
    years = sorted(int(y) for y in study_years)
    (train_first, train_last), (val_first, val_last) = FINETUNE_TRAIN_YEARS, FINETUNE_VAL_YEARS
    if (any(y <= train_last for y in years) and any(val_first <= y <= val_last for y in years)
            and years[-1] > val_last):
        return LocalSplit((train_first, train_last), (val_first, val_last), (val_last + 1, years[-1]),
                          "published")
    if len(years) < 3:
        return None
    q = max(1, len(years) // 4)
    return LocalSplit((years[0], years[-2 * q - 1]), (years[-2 * q], years[-q - 1]), (years[-q], years[-1]),
                      "quarters")


def label(model: str) -> str:
    """A model's row label in the tables."""
    return LOCAL_LABEL if model == LOCAL else f"{model.upper()} ({DESCRIPTIONS[model]})"


# --- the run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What one cross-validation computes (everything but the folds must match on resume)."""

    models: str                # in calibration order, e.g. "abcd"
    epochs: dict[str, int]     # per stage: models and a_local
    seed: int
    local_baseline: bool

    @property
    def stages(self) -> list[str]:
        """Stages in order: each model, the local baseline right after A (it starts from it)."""
        out = []
        for m in self.models:
            out.append(m)
            if m == "a" and self.local_baseline:
                out.append(LOCAL)
        return out

    def settings(self, dataset: Dataset) -> dict:
        return {"models": self.models, "epochs": self.epochs, "seed": self.seed,
                "local_baseline": self.local_baseline, "folds": dataset.folds}


def make_plan(models: str = "abcd", epochs_scale: float = 1.0, seed: int = DEFAULT_SEED,
              local_baseline: bool = True) -> Plan:
    """The models in calibration order with their epochs (published × ``epochs_scale``, at least 1)."""
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise ValueError(f"--models {models!r}: expected letters of {''.join(MODELS)}")
    if not (epochs_scale > 0 and math.isfinite(epochs_scale)):
        raise ValueError(f"--epochs_scale {epochs_scale}: expected a finite number > 0")
    ordered = "".join(m for m in MODELS if m in models)
    for m in ordered:
        if m in STARTS_FROM and STARTS_FROM[m] not in ordered:
            raise ValueError(f"--models {models!r}: model {m.upper()} starts from model "
                             f"{STARTS_FROM[m].upper()}, which must be calibrated in the same fold")

    def scaled(n):
        return max(1, round(n * epochs_scale))

    epochs = {m: scaled(EPOCHS[m]) for m in ordered}
    local = local_baseline and "a" in ordered
    if local:
        epochs[LOCAL] = scaled(FINETUNE_EPOCHS)
    return Plan(ordered, epochs, int(seed), local)


def check_settings(path: Path, settings: dict) -> None:
    """Write the settings of a new run; refuse to continue a run made with other settings."""
    if path.exists():
        previous = json.loads(path.read_text())
        for key, value in settings.items():
            if previous.get(key) != json.loads(json.dumps(value)):
                raise ValueError(f"{path}: this folder holds a cross-validation with {key} = "
                                 f"{previous.get(key)!r}, this run asks for {value!r}; use another "
                                 "--out_dir or the same settings")
    elif distributed.is_main_process():
        atomic_write_json(path, settings)
    distributed.sync("glaunti-cv-settings")


class Timings:
    """Wall time of every completed stage, kept in ``timings.json`` so that a resumed run can
    estimate what is left; never part of the tables."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def record(self, rotation: Rotation, stage: str, seconds: float) -> None:
        self.seconds[f"{rotation.folder}/{stage}"] = round(seconds, 1)
        if distributed.is_main_process():
            atomic_write_json(self.path, self.seconds)

    def estimate(self, remaining: list[tuple[Rotation, str]]) -> tuple[float, list[str]]:
        """Seconds left (mean time of each stage over the folds done so far) and the stages
        not measured yet."""
        total, unknown = 0.0, []
        for _, stage in remaining:
            done = [s for key, s in self.seconds.items() if key.endswith(f"/{stage}")]
            if done:
                total += sum(done) / len(done)
            elif stage not in unknown:
                unknown.append(stage)
        return total, unknown


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


@dataclass
class FoldRun:
    """One rotation's stages, its folder and its test glaciers' local windows."""

    dataset: Dataset
    rotation: Rotation
    folder: Path
    plan: Plan
    keep_smb: bool
    show_progress: bool

    def __post_init__(self):
        self.test = self.dataset.split(self.rotation.test, self.rotation.val).test
        self.windows = {}
        for name in self.test:
            tensors = self.dataset.glacier(name)
            self.windows[name] = local_split([int(y) for y, s in zip(tensors.years, tensors.study) if s])
            del tensors
        placement = distributed.Placement()
        self.owned = [name for i, name in enumerate(self.test) if placement.is_local(i)]

    def marker(self, stage: str) -> Path:
        return self.folder / "done" / f"{stage}.json"

    def run(self, stage: str) -> None:
        """Compute ``stage`` (a model, or the local baseline) and mark it done."""
        if stage == LOCAL:
            self._local_baseline()
        else:
            self._transferred(stage)
        distributed.sync(f"glaunti-cv-{self.rotation.folder}-{stage}")
        if distributed.is_main_process():
            atomic_write_json(self.marker(stage), {"stage": stage, "epochs": self.plan.epochs[stage],
                                                   "test": self.test})
        distributed.sync(f"glaunti-cv-{self.rotation.folder}-{stage}-marked")

    def _transferred(self, model: str) -> None:
        """Calibrate ``model`` on the training folds, then evaluate it on every test glacier:
        all study years, and the local baseline's evaluation years."""
        params = self.folder / "params" / f"{model}.eqx"
        start = self.folder / "params" / f"{STARTS_FROM[model]}.eqx" if model in STARTS_FROM else None
        calibrate(model, data_folder=self.dataset.folder, epochs=self.plan.epochs[model], params_path=params,
                  log_path=self.folder / "logs" / f"{model}.csv", seed=self.plan.seed, resume=True,
                  init_params_path=start, show_progress=self.show_progress,
                  test_fold=self.rotation.test, val_fold=self.rotation.val)
        def full(name):
            return self.folder / "eval" / model / f"{name}.json"

        def local(name):
            return self.folder / "local" / "eval" / model / f"{name}.json"

        def smb(name):
            return self.folder / "smb" / model / f"{name}.nc"

        todo = [name for name in self.owned
                if not (full(name).exists() and (self.windows[name] is None or local(name).exists()))]
        if not todo:
            return
        # One batched inference of the test glaciers (a shared scan on a GPU, shared compiles on
        # a CPU); the evaluation over the local baseline's years then re-reads each SMB file.
        infer_and_evaluate_many(model, todo, [smb(n) for n in todo], [full(n) for n in todo],
                                params_path=params, data_folder=self.dataset.folder)
        for name in todo:
            window = self.windows[name]
            if window is not None:
                atomic_write_json(local(name), evaluate_smb_file(self.dataset.glacier(name), smb(name),
                                                                 window.evaluation))
            self._drop(smb(name))

    def _local_baseline(self) -> None:
        """Fine-tune this fold's A on each test glacier's own early years, evaluate it on the
        later ones."""
        if distributed.is_main_process():
            atomic_write_json(self.folder / "local" / "windows.json",
                              {name: None if w is None else asdict(w) for name, w in self.windows.items()})
        # Decided once, before anything is written: every process then runs the same fine-tunings.
        todo = [name for name in self.test if self.windows[name] is not None
                and not (self.folder / "local" / "eval" / LOCAL / f"{name}.json").exists()]
        distributed.sync(f"glaunti-cv-{self.rotation.folder}-local-todo")
        for name in todo:
            window = self.windows[name]
            params = self.folder / "local" / "params" / f"{name}.eqx"
            finetune(name, data_folder=self.dataset.folder, init_params_path=self.folder / "params" / "a.eqx",
                     final_params_path=params, log_path=self.folder / "local" / "logs" / f"{name}.csv",
                     epochs=self.plan.epochs[LOCAL], train_years=window.train, val_years=window.val,
                     resume=True, show_progress=self.show_progress)
            if name in self.owned:
                smb = self.folder / "smb" / LOCAL / f"{name}.nc"
                infer_and_evaluate("a", name, smb, self.folder / "local" / "eval" / LOCAL / f"{name}.json",
                                   params_path=params, data_folder=self.dataset.folder, years=window.evaluation)
                self._drop(smb)

    def _drop(self, smb: Path) -> None:
        if not self.keep_smb:
            smb.unlink(missing_ok=True)


def crossvalidate(data_folder=None, out_dir="outputs/crossvalidation", folds: Sequence[int] | None = None,
                  models: str = "abcd", epochs_scale: float = 1.0, seed: int = DEFAULT_SEED,
                  local_baseline: bool = True, keep_smb: bool = False, show_progress: bool = True) -> dict:
    """Run (or continue) the cross-validation of the test folds ``folds`` (default: all) into
    ``out_dir``; writes and returns the summary (:func:`summarise_crossvalidation`)."""
    out = Path(out_dir)
    distributed.setup()  # devices, processes, compilation cache, as the training scripts do
    dataset = Dataset(resolve_data_folder(data_folder))
    plan = make_plan(models, epochs_scale, seed, local_baseline)
    todo_rotations = rotations(dataset.fold_ids, folds)
    main = distributed.is_main_process()
    say = print if main else (lambda *a, **k: None)
    check_settings(out / SETTINGS, plan.settings(dataset))
    timings = Timings(out / "timings.json")

    say(f"cross-validation of {dataset.folder}: test folds {[r.test for r in todo_rotations]} of "
        f"{dataset.fold_ids}, stages {', '.join(plan.stages)} "
        f"(epochs {', '.join(f'{s} {n}' for s, n in plan.epochs.items())}) into {out}/", flush=True)
    runs = [FoldRun(dataset, r, out / r.folder, plan, keep_smb, show_progress) for r in todo_rotations]
    remaining = [(run, stage) for run in runs for stage in plan.stages if not run.marker(stage).exists()]
    distributed.sync("glaunti-cv-plan")  # every process has decided what is left
    for i, (run, stage) in enumerate(remaining):
        if i and run is not remaining[i - 1][0]:
            release_compiled()  # a new rotation: free the last one's executables (memory maps)
        split = dataset.split(run.rotation.test, run.rotation.val)
        say(f"\n{run.rotation.folder} (test {len(split.test)}, validation {len(split.val)} [fold "
            f"{run.rotation.val}], training {len(split.train)} glaciers): {label(stage)}", flush=True)
        t0 = time.perf_counter()
        run.run(stage)
        seconds = time.perf_counter() - t0
        timings.record(run.rotation, stage, seconds)
        left, unknown = timings.estimate([(r.rotation, s) for r, s in remaining[i + 1:]])
        note = f" plus {', '.join(unknown)} (not timed yet)" if unknown else ""
        say(f"{run.rotation.folder} {stage}: {_duration(seconds)}; about {_duration(left)}{note} left",
            flush=True)

    summary = summarise_crossvalidation(out, [r.test for r in todo_rotations])
    report = format_report(summary)
    if main:
        atomic_write_text(out / "summary.txt", report + "\n")
        atomic_write_json(out / "summary.json", summary)
        plot_per_fold_rmse(summary, out / "per_fold_rmse.png")
        say("\n" + report + f"\n\nfigure: {out / 'per_fold_rmse.png'}", flush=True)
    distributed.sync("glaunti-cv-end")
    return summary


# --- tables and figure -------------------------------------------------------------------------


def completed_folds(out_dir) -> list[int]:
    """Test folds of ``out_dir`` whose every stage is marked done."""
    out = Path(out_dir)
    settings = _read_settings(out)
    stages = Plan(settings["models"], settings["epochs"], settings["seed"], settings["local_baseline"]).stages
    done = []
    for folder in out.glob("fold_*"):
        suffix = folder.name.removeprefix("fold_")
        if suffix.isdigit() and all((folder / "done" / f"{s}.json").exists() for s in stages):
            done.append(int(suffix))
    return sorted(done)


def export_results(out_dir, dest) -> list[int]:
    """Copy what the tables of ``out_dir`` are made of to ``dest``, without weights or daily
    series: the settings, the timings, and of every completed fold its evaluation files, local
    windows and done markers (~1 MB per fold on ``science``). ``dest`` is then a
    cross-validation folder of its own: ``summarise.py --crossvalidation dest`` prints the same
    tables, and ``crossvalidate.py --out_dir dest`` skips the exported folds and runs the rest.
    Files already in ``dest`` are replaced; returns the folds exported."""
    out, dest = Path(out_dir), Path(dest)
    folds = completed_folds(out)
    files = [out / SETTINGS] + ([out / "timings.json"] if (out / "timings.json").is_file() else [])
    for k in folds:
        fold = out / f"fold_{k}"
        files += sorted(fold.glob("eval/*/*.json")) + sorted(fold.glob("local/eval/*/*.json"))
        files += sorted(fold.glob("local/windows.json"))
    # The markers last: an interrupted export leaves no fold marked done without its files.
    files += [m for k in folds for m in sorted((out / f"fold_{k}").glob("done/*.json"))]
    for path in files:
        target = dest / path.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            tmp.write_bytes(path.read_bytes())
    return folds


def _read_settings(out: Path) -> dict:
    path = out / SETTINGS
    if not path.is_file():
        raise SummaryError(f"{path}: missing; expected the output folder of crossvalidate.py")
    return json.loads(path.read_text())


def summarise_crossvalidation(out_dir, folds: Sequence[int] | None = None) -> dict:
    """The tables of a cross-validation folder, from its evaluation JSONs alone.

    ``folds`` (default: every completed fold) are the test folds pooled. Returns
    ``{"folds", "transferred": part, "local": part or None}`` with ``part = {"pooled": {label:
    summary}, "per_fold": {label: {"fold_k": summary}}, "spread": {label: spread}}`` (summaries as
    ``core.evaluate.summary.pool_folders``)."""
    out = Path(out_dir)
    settings = _read_settings(out)
    folds = completed_folds(out) if folds is None else [int(f) for f in folds]
    if not folds:
        raise SummaryError(f"{out}: no completed fold yet")
    models = list(settings["models"])

    def part(models, where, optional):
        """``optional``: a fold may have no file (no test glacier with a local window)."""
        result = {"pooled": {}, "per_fold": {}, "spread": {}}
        for m in models:
            folders = {f"fold_{k}": out / f"fold_{k}" / where / m for k in folds}
            if optional:
                folders = {k: f for k, f in folders.items() if any(f.glob("*.json"))}
            if not folders:
                continue
            by_fold = {k: pool_folders([f]) for k, f in folders.items()}
            result["pooled"][label(m)] = pool_folders(folders.values())
            result["per_fold"][label(m)] = by_fold
            result["spread"][label(m)] = spread(list(by_fold.values()))
        return result

    local = part([LOCAL, *models], "local/eval", optional=True) if settings["local_baseline"] else None
    return {"folds": folds, "transferred": part(models, "eval", optional=False), "local": local}


def format_fold_rmse(per_fold: dict) -> str:
    """Point / glacier-wide annual RMSE of every model in every fold."""
    folds = sorted({k for by_fold in per_fold.values() for k in by_fold}, key=lambda k: int(k.split("_")[1]))
    width = max([len(name) for name in per_fold] + [10])
    head = f"{'model':<{width}}  " + "  ".join(f"{k:>15}" for k in folds)
    lines = [head, "-" * len(head)]
    for name, by_fold in per_fold.items():
        cells = []
        for k in folds:
            s = by_fold.get(k)
            values = [None if s is None else s[scale]["annual"].get("rmse") for scale in ("point", "glacier-wide")]
            cells.append(" / ".join("–" if v is None else f"{v:.3f}" for v in values))
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c:>15}" for c in cells))
    lines.append("annual RMSE (m w.e.), point / glacier-wide, of each fold's test glaciers pooled")
    return "\n".join(lines)


def format_report(summary: dict) -> str:
    """summary.txt: the pooled, per-fold and local-baseline tables."""
    folds = summary["folds"]
    transferred = summary["transferred"]
    n = max((s["glaciers"] for s in transferred["pooled"].values()), default=0)
    parts = [
        f"Cross-validation, test folds {', '.join(map(str, folds))} ({n} test glaciers), all study years.",
        "",
        "Pooled over the test glaciers of every fold:",
        format_table(transferred["pooled"]),
        "",
        f"Across the {len(folds)} folds:",
        format_spread_table(transferred["spread"]),
        "",
        format_fold_rmse(transferred["per_fold"]),
    ]
    local = summary["local"]
    if local is not None:
        n_local = max((s["glaciers"] for s in local["pooled"].values()), default=0)
        parts += [
            "",
            f"Locally calibrated baseline: the later years of each test glacier ({n_local} glaciers; "
            "local/windows.json), every model on exactly these years.",
            "",
            format_table(local["pooled"]),
            "",
            format_spread_table(local["spread"]),
            "",
            format_fold_rmse(local["per_fold"]),
        ]
    return "\n".join(parts)


def plot_per_fold_rmse(summary: dict, path: Path) -> None:
    """Annual RMSE per model, one dot per fold and the mean ± standard deviation across folds;
    point and glacier-wide, for all study years and (when computed) the local baseline's years."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("all study years", summary["transferred"])]
    if summary["local"] is not None:
        rows.append(("later years (local baseline)", summary["local"]))
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.8 * len(rows)), squeeze=False)
    colours = plt.get_cmap("tab10")
    folds = [f"fold_{k}" for k in summary["folds"]]
    for (title, part), row in zip(rows, axes):
        names = list(part["per_fold"])
        short = ["A local" if name == LOCAL_LABEL else name.split(" ")[0] for name in names]
        for ax, scale in zip(row, ("point", "glacier-wide")):
            for x, name in enumerate(names):
                for j, fold in enumerate(folds):
                    s = part["per_fold"][name].get(fold)
                    value = None if s is None else s[scale]["annual"].get("rmse")
                    if value is not None:
                        ax.scatter(x + 0.08 * (j - (len(folds) - 1) / 2), value, color=colours(j % 10), s=22,
                                   label=fold if x == 0 else None, zorder=3)
                stat = part["spread"][name][scale]["annual"]["rmse"]
                if stat["mean"] is not None:
                    ax.errorbar(x + 0.35, stat["mean"], yerr=stat["std"] or 0.0, fmt="_", color="k",
                                markersize=14, capsize=3)
            ax.set_xticks(range(len(names)), short)
            ax.set_ylabel("annual RMSE (m w.e.)")
            ax.set_title(f"{scale}, {title}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
        row[0].legend(fontsize=7, loc="best")
    fig.suptitle("Cross-validation: per-fold RMSE (dots) and mean ± sd across folds (bars)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
