"""The four modes of `python -m xmedjax.main` (config.mode), each `mode(config, workdir)`.

    train_and_evaluate   # train: fit (resuming if possible), then evaluate + explain the best
    evaluate             # the best checkpoint -> metrics.json, figures, predictions, report
    explain              # the best checkpoint -> heatmaps/<split>_<method>.npz, quality
    predict              # the best checkpoint -> predictions (and heatmaps) of a folder

Work directory:
    WORKDIR/.lock                        held by the command running on it (workdir_lock)
    WORKDIR/config.json                  the config the run trained with (train mode writes it)
    WORKDIR/resumes.jsonl                one line per resumed train command: step, changed keys
    WORKDIR/data/                        the phantom dataset (config.data.dataset=phantoms)
    WORKDIR/checkpoints/{latest,best}/   Orbax (see checkpointing.py)
    WORKDIR/metrics.jsonl, tensorboard/  training logs
    WORKDIR/metrics.json, report.html, figures/, predictions/, heatmaps/
    WORKDIR/commands.jsonl               one line per finished or preempted command: wall seconds

Every mode holds the work directory's lock for its whole life (`xmedjax.workdir_lock`): a
second command on a busy work directory stops at once with one line. Run set-up and restore
are in `xmedjax.runs`, the loop in `xmedjax.train`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from xmedjax import checkpointing, input_pipeline, runs, train, workdir_lock
from xmedjax import evaluate as evaluate_lib
from xmedjax import report as report_lib
from xmedjax import train_state as ts
from xmedjax.runs import Run


# ----------------------------------------------------------------------------- building blocks
def split_predictions(run: Run, state: ts.TrainState, splits: Sequence[str]) -> dict[str, dict]:
    """Predictions (labels, logits, probabilities, ...) of each split, over the run's mesh."""
    eval_fn = ts.jit_eval_step(run.mdef, state, run.mesh)
    return {
        s: evaluate_lib.predict_split(
            eval_fn,
            state,
            run.mesh,
            split=s,
            batch_size=run.config.training.eval_batch_size,
            **runs.eval_data_kwargs(run),
        )
        for s in splits
    }


def explain_best(
    run: Run, state: ts.TrainState, split: str, *, predictions: np.ndarray | None = None
) -> dict:
    """Heatmaps of a split (WORKDIR/heatmaps/<split>_<method>.npz) and explain_quality.json.

    `predictions` (by example index, e.g. from the val-tuned threshold) are the classes
    explained, so the heatmaps explain the same decisions as metrics.json.
    """
    from xmedjax.explain import run as explain_run  # noqa: PLC0415

    c = run.config
    quality_methods = (
        {"methods": tuple(c.explain.quality_methods)} if c.explain.quality_methods else {}
    )
    quality = explain_run.QualitySettings(n_images=c.explain.quality_images, **quality_methods)
    return explain_run.explain_split(
        run.mdef.graphdef,
        runs.host_model_state(state),
        data_dir=run.data_dir,
        split=split,
        workdir=run.workdir,
        preprocess=input_pipeline.Preprocess.from_config(c),
        methods=tuple(c.explain.methods),
        batch_size=c.explain.batch_size,
        quality=quality if c.explain.quality else None,
        predictions=predictions,
        progress=c.runtime.progress_bar,
    )


def write_run_report(run: Run, results: dict, *, extra_info: dict | None = None) -> str:
    """WORKDIR/report.html from metrics (`results`), the figures and the heatmaps on disk."""
    c = run.config
    figdir = os.path.join(run.workdir, "figures")
    figures = {
        s: {k: os.path.join(figdir, f"{k}_{s}.png") for k in ("roc", "pr", "confusion")}
        for s in (c.data.val_split, c.data.test_split)
    }
    info = {
        "model": f"{c.model.arch} (width {c.model.width}, {c.model.dtype})",
        "data": run.data_dir,
        "classes": ", ".join(run.info.label_names),
        "image size": c.data.image_size,
    }
    info.update(extra_info or {})
    from xmedjax.explain.export import report_section_html  # noqa: PLC0415

    explain_html = report_section_html(run.workdir, methods=tuple(c.explain.methods))
    return report_lib.write_report(
        run.workdir, results, figures=figures, run_info=info, explain_html=explain_html
    )


def evaluated_splits(run: Run) -> tuple[str, ...]:
    """val, test, then every further split of the dataset but train (e.g. `test_dedup`, the
    leak-free test split of `data_prep.build --dedup_test`), all at val's threshold."""
    c = run.config
    named = (c.data.val_split, c.data.test_split)
    others = [s for s in run.info.splits if s not in (*named, c.data.train_split)]
    return named + tuple(sorted(others))


def _thresholded(run: Run, results: dict, preds: dict[str, dict]) -> np.ndarray | None:
    """The explain split's predicted classes at the val-chosen threshold (None: not predicted)."""
    c = run.config
    threshold = results[c.data.val_split].get("threshold") or 0.5
    split_pred = preds.get(c.explain.split)
    if split_pred is None:
        return None
    return evaluate_lib.metrics.predict(split_pred["probabilities"], threshold)


def evaluate_run(
    run: Run,
    state: ts.TrainState,
    *,
    step: int | None = None,
    explain_too: bool = False,
    extra_info: dict | None = None,
) -> dict | None:
    """val/test metrics (threshold from val; also the dataset's further splits, see
    `evaluated_splits`) -> metrics.json, figures, optionally heatmaps, report.

    Every process predicts; process 0 writes and returns the metrics (the others None).
    """
    c = run.config
    preds = split_predictions(run, state, evaluated_splits(run))
    if not run.primary:
        return None
    results = evaluate_lib.evaluate_splits(
        preds,
        workdir=run.workdir,
        label_names=run.info.label_names,
        val_split=c.data.val_split,
        threshold_method=c.evaluate.threshold,
        bootstrap_samples=c.evaluate.bootstrap_samples,
        seed=c.training.seed,
        data_dir=run.data_dir,
        extra={
            "checkpoint_step": step,
            "checkpoint": checkpointing.checkpoint_dir(run.workdir, checkpointing.BEST),
        },
    )
    if explain_too:
        explain_best(run, state, c.explain.split, predictions=_thresholded(run, results, preds))
    write_run_report(run, results, extra_info=extra_info)
    return results


def print_outputs(run: Run, results: dict | None) -> None:
    """Where the metrics, report and heatmaps landed (process 0)."""
    if not run.primary or results is None:
        return
    test = results.get(run.config.data.test_split, {})
    print(f"test accuracy {test.get('accuracy')}, AUC-ROC {test.get('auc_roc')}", flush=True)
    print(f"metrics:  {os.path.join(run.workdir, 'metrics.json')}", flush=True)
    print(f"report:   {os.path.join(run.workdir, 'report.html')}", flush=True)
    heat = os.path.join(run.workdir, "heatmaps")
    if os.path.isdir(heat):
        print(f"heatmaps: {heat}/ ({', '.join(sorted(os.listdir(heat)))})", flush=True)


def _saved_metrics(run: Run) -> dict | None:
    """WORKDIR/metrics.json of an earlier train/evaluate command, if any."""
    path = os.path.join(run.workdir, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def _restored_run(config: Any, workdir: str) -> Iterator[tuple[Run, ts.TrainState, int]]:
    """The run with its best checkpoint restored (every process joins the restore), for the
    block, with the work directory locked (`workdir_lock`).

    A work directory without a best checkpoint stops here, before anything is created.
    WORKDIR/config.json stays the config the run trained with (it is not rewritten).
    """
    runs.require_best_checkpoint(workdir)
    runs.setup_runtime(config)
    with workdir_lock.hold(workdir):
        run = runs.build_run(config, workdir, training=False)
        state, step = runs.restore_best(run)
        yield run, state, step


@contextlib.contextmanager
def timed_command(mode: str, workdir: str, *, argv: Sequence[str] = ()) -> Iterator[None]:
    """Appends {mode, status, seconds, finished, argv} to WORKDIR/commands.jsonl when the
    command ends (process 0 only): status "ok", or "Preempted" when SIGTERM or Ctrl-C
    stopped training (the step was saved): the wall time each result cost. A command that
    fails writes nothing (a busy or missing work directory must stay untouched)."""
    started = time.time()
    try:
        yield
    except train.Preempted:
        _record_command(workdir, mode, "Preempted", time.time() - started, argv)
        raise
    _record_command(workdir, mode, "ok", time.time() - started, argv)


def _record_command(workdir: str, mode: str, status: str, seconds: float, argv) -> None:
    import jax  # noqa: PLC0415

    if jax.process_index() != 0 or not os.path.isdir(workdir):
        return
    line = {
        "mode": mode,
        "status": status,
        "seconds": round(seconds, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": list(argv),
    }
    with open(os.path.join(workdir, "commands.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")


# ----------------------------------------------------------------------------- the modes
def train_and_evaluate(config: Any, workdir: str) -> dict | None:
    """Mode train: fit (resuming if possible), then evaluate the best checkpoint and explain."""
    runs.setup_runtime(config)
    t0 = time.time()
    with workdir_lock.hold(workdir):
        run = runs.build_run(config, workdir)
        loop = train.fit(run)
        state, step = runs.restore_best(run)
        results = evaluate_run(
            run,
            state,
            step=step,
            explain_too=True,
            extra_info={
                "stopped": loop.stop_message,
                "best checkpoint step": step,
                f"best {config.training.best_metric}": loop.best_value,
                "epochs": loop.epoch,
                "set-up and training time of this command (s)": round(time.time() - t0, 1),
            },
        )
        print_outputs(run, results)
    return results


def evaluate(config: Any, workdir: str) -> dict | None:
    """Mode evaluate: the best checkpoint on val and test -> metrics.json, figures, report."""
    with _restored_run(config, workdir) as (run, state, step):
        results = evaluate_run(run, state, step=step)
        print_outputs(run, results)
    return results


def explain(config: Any, workdir: str) -> dict | None:
    """Mode explain: heatmaps of config.explain.split from the best checkpoint (of the
    images under config.predict.folder when it is set, as predict mode)."""
    if config.predict.folder:
        return predict(config, workdir)
    with _restored_run(config, workdir) as (run, state, _):
        if not run.primary:
            return None
        result = explain_best(run, state, config.explain.split)
        metrics = _saved_metrics(run)
        if metrics is not None:
            write_run_report(run, metrics)
    print(f"heatmaps: {os.path.join(run.workdir, 'heatmaps')}", flush=True)
    return result


def predict(config: Any, workdir: str) -> dict | None:
    """Mode predict: classify (and explain) every image under config.predict.folder."""
    with _restored_run(config, workdir) as (run, state, _):
        if not run.primary:
            return None
        return _predict_folder(run, state)


def _predict_folder(run: Run, state: ts.TrainState) -> dict:
    c = run.config
    metrics = _saved_metrics(run) or {}
    threshold = (metrics.get(c.data.val_split) or {}).get("threshold") or 0.5
    from xmedjax.explain.annotated import FolderAnnotations  # noqa: PLC0415
    from xmedjax.explain.run import predict_folder  # noqa: PLC0415

    return predict_folder(
        run.mdef.graphdef,
        runs.host_model_state(state),
        folder=c.predict.folder,
        workdir=run.workdir,
        preprocess=input_pipeline.Preprocess.from_config(c),
        methods=tuple(c.explain.methods),
        batch_size=c.explain.batch_size,
        threshold=threshold,
        label_names=run.info.label_names,
        progress=c.runtime.progress_bar,
        annotations=FolderAnnotations.from_config(c),
    )


MODES: dict[str, Callable[[Any, str], dict | None]] = {
    "train": train_and_evaluate,
    "evaluate": evaluate,
    "explain": explain,
    "predict": predict,
}

__all__ = [
    "MODES",
    "evaluate",
    "evaluate_run",
    "explain",
    "explain_best",
    "predict",
    "print_outputs",
    "split_predictions",
    "train_and_evaluate",
    "write_run_report",
]
