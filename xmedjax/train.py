"""The training loop and the four modes of `python -m xmedjax.main`.

    train_and_evaluate(config, workdir)  # mode train: fit, then evaluate + explain the best
    evaluate(config, workdir)            # best checkpoint -> metrics.json, figures, report
    explain(config, workdir)             # best checkpoint -> heatmaps/<split>_<method>.npz
    predict(config, workdir)             # best checkpoint -> predictions of a folder of images

Work directory:
    WORKDIR/config.json                  the resolved config of the last command
    WORKDIR/data/                        the phantom dataset (config.data.dataset=phantoms)
    WORKDIR/checkpoints/{latest,best}/   Orbax (see checkpointing.py)
    WORKDIR/metrics.jsonl, tensorboard/  training logs
    WORKDIR/metrics.json, report.html, figures/, predictions/, heatmaps/

Rerunning `train` on a work directory resumes from checkpoints/latest (exactly: the Grain
iterator position is restored with the state); a finished run goes straight to evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from xmedjax import checkpointing, input_pipeline, logging_utils
from xmedjax import evaluate as evaluate_lib
from xmedjax import mesh as mesh_lib
from xmedjax import report as report_lib
from xmedjax import train_state as ts
from xmedjax.config_checks import ConfigError


class NonFiniteError(RuntimeError):
    """A train step produced a non-finite loss or gradient."""


class Preempted(RuntimeError):
    """SIGTERM arrived; the latest checkpoint was saved."""


@dataclasses.dataclass
class Run:
    """What every mode builds from a config."""

    config: Any
    workdir: str
    data_dir: str
    info: input_pipeline.DatasetInfo
    mesh: Any
    mdef: ts.ModelDef
    state: ts.TrainState
    primary: bool


# ----------------------------------------------------------------------------- set-up
def setup_runtime(config) -> None:
    """Distributed start-up (before any device use) and the persistent compile cache."""
    mesh_lib.initialize_distributed(
        config.runtime.distributed,
        config.runtime.coordinator_address,
        config.runtime.num_processes,
        config.runtime.process_id,
    )
    mesh_lib.setup_compilation_cache(config.runtime.compilation_cache_dir)


def phantom_dir(config, workdir: str) -> str:
    d = config.data
    counts = "_".join(f"{k}{v}" for k, v in sorted(dict(d.phantom_counts).items()))
    return os.path.join(
        workdir, "data", f"phantoms_{d.phantom_kind}_{d.image_size}px_{counts}_seed{d.phantom_seed}"
    )


def prepare_data(config, workdir: str) -> str:
    """The prepared dataset's folder; phantoms are built on first use (process 0)."""
    if config.data.dataset == "prepared":
        data_dir = os.path.expanduser(config.data.data_dir)
        input_pipeline.read_dataset_info(data_dir)  # missing -> names the data_prep.build command
        return data_dir
    data_dir = config.data.data_dir or phantom_dir(config, workdir)
    info_file = os.path.join(data_dir, input_pipeline.INFO_FILE)
    if not os.path.isfile(info_file) and mesh_lib.is_primary():
        from data_prep.phantoms import build_phantom_dataset  # noqa: PLC0415

        logging_utils.log(f"building {config.data.phantom_kind} phantoms into {data_dir}")
        build_phantom_dataset(
            data_dir,
            kind=config.data.phantom_kind,
            counts=dict(config.data.phantom_counts),
            size=config.data.image_size,
            seed=config.data.phantom_seed,
        )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices("xmedjax_phantoms_built")
    return data_dir


# Initialisation runs once: compile it fast rather than well (ResNet50 1/8 on 2 CPU cores,
# cold cache: 4 s, against 11 s at the default level and 9 s eagerly).
_INIT_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def build_model(config, num_classes: int) -> nnx.Module:
    """The config's model, initialised by one quickly compiled XLA program."""
    from xmedjax.models import create_model  # noqa: PLC0415

    dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}[config.model.dtype]

    def make():
        return create_model(
            config.model.arch,
            num_classes,
            in_channels=config.data.channels,
            dtype=dtype,
            seed=config.training.seed,
            width=config.model.width,
        )

    graphdef, _ = nnx.split(nnx.eval_shape(make))
    init = jax.jit(lambda: nnx.split(make())[1])
    try:
        compiled = init.lower().compile(compiler_options=_INIT_COMPILER_OPTIONS)
    except Exception:  # noqa: BLE001 - an unknown option on another backend: default compile
        compiled = init.lower().compile()
    model = nnx.merge(graphdef, compiled())
    if config.init.checkpoint:
        from xmedjax.models.weights_io import load_weights  # noqa: PLC0415

        load_weights(model, os.path.expanduser(config.init.checkpoint), head=config.init.head)
    return model


def build_run(config, workdir: str) -> Run:
    """Data, mesh, model and a fresh (replicated) TrainState; nothing restored yet."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    data_dir = prepare_data(config, workdir)
    info = input_pipeline.read_dataset_info(data_dir)
    for key in ("train_split", "val_split", "test_split"):
        split = config.data[key]
        if split not in info.splits:
            raise ConfigError(
                f"config.data.{key}={split!r} is not a split of {data_dir} (has {sorted(info.splits)})"
            )
    if info.splits[config.data.train_split] < config.training.batch_size:
        raise ConfigError(
            f"config.training.batch_size={config.training.batch_size} exceeds the "
            f"{info.splits[config.data.train_split]} examples of split {config.data.train_split!r}"
        )
    mesh = mesh_lib.make_mesh()
    mesh_lib.check_batch_size(config.training.batch_size, mesh)
    model = build_model(config, info.num_classes)
    tx = ts.make_optimizer(
        config.optimizer.name,
        config.optimizer.learning_rate,
        weight_decay=config.optimizer.weight_decay,
        momentum=config.optimizer.momentum,
    )
    mdef, state = ts.create_train_state(model, tx)
    state = ts.place_state(state, mesh)
    primary = mesh_lib.is_primary()
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    return Run(config, workdir, data_dir, info, mesh, mdef, state, primary)


def train_label_counts(data_dir: str, split: str, num_classes: int) -> np.ndarray:
    source = input_pipeline.PreparedSource(data_dir, split)
    labels = np.array([int(source[i]["label"]) for i in range(len(source))], np.int64)
    return np.bincount(labels, minlength=num_classes)


def _eval_kwargs(run: Run) -> dict:
    return {
        "data_dir": run.data_dir,
        "preprocess": input_pipeline.Preprocess.from_config(run.config),
    }


# ----------------------------------------------------------------------------- the loop
def _new_loop_state(lr: float) -> dict:
    return {
        "epoch": 0,
        "finished": None,
        "best_step": None,
        "best_value": None,
        "es_best": None,
        "es_wait": 0,
        "plateau_best": None,
        "plateau_wait": 0,
        "learning_rate": lr,
        "epoch_loss_sum": 0.0,
        "epoch_steps": 0,
        "history": [],
    }


def _improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def update_schedules(loop: dict, val_loss: float, t) -> dict:
    """Epoch-end bookkeeping on the val loss (Keras semantics), in place on `loop`.

    Reduce-on-plateau: after `reduce_on_plateau_patience` epochs without a lower val loss
    the learning rate is multiplied by `reduce_on_plateau_factor` (not below
    `min_learning_rate`) and the count restarts. Early stopping: after
    `early_stopping_patience` epochs without an improvement larger than
    `early_stopping_min_delta`, `loop["finished"]` is set. A patience of 0 turns either off.
    """
    if _improved(val_loss, loop["es_best"], "min", t.early_stopping_min_delta):
        loop["es_best"], loop["es_wait"] = val_loss, 0
    else:
        loop["es_wait"] += 1
    if _improved(val_loss, loop["plateau_best"], "min"):
        loop["plateau_best"], loop["plateau_wait"] = val_loss, 0
    else:
        loop["plateau_wait"] += 1
    if t.reduce_on_plateau_patience and loop["plateau_wait"] >= t.reduce_on_plateau_patience:
        loop["learning_rate"] = max(
            loop["learning_rate"] * t.reduce_on_plateau_factor, t.min_learning_rate
        )
        loop["plateau_wait"] = 0
    if t.early_stopping_patience and loop["es_wait"] >= t.early_stopping_patience:
        loop["finished"] = f"early stopping after epoch {loop['epoch']}"
    return loop


class _SigtermFlag:
    """SIGTERM sets a flag the loop checks after each step (the default handler is restored after)."""

    def __init__(self):
        self.raised = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.raised = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def fit(run: Run, *, train_iterator=None) -> dict:
    """Trains (or resumes) to the end; returns the loop state. Leaves run.state as the final state."""
    c = run.config
    t = c.training
    spe = input_pipeline.steps_per_epoch(run.data_dir, c.data.train_split, t.batch_size)
    if spe == 0:
        raise ConfigError(
            f"config.training.batch_size={t.batch_size} exceeds the {c.data.train_split} split"
        )
    total = spe * t.max_epochs
    if t.max_steps:
        total = min(total, t.max_steps)
    if train_iterator is None:
        train_iterator = input_pipeline.make_train_iterator(
            run.data_dir,
            c.data.train_split,
            global_batch_size=t.batch_size,
            preprocess=input_pipeline.Preprocess.from_config(c),
            augment=dict(c.augment),
            seed=t.seed,
            worker_count=c.data.worker_count,
        )
    ckpt = checkpointing.RunCheckpoints(run.workdir)
    writer = logging_utils.MetricWriter(run.workdir, enabled=run.primary)
    state = run.state
    loop = _new_loop_state(c.optimizer.learning_rate)
    if ckpt.latest_step() is not None:
        state, loop = ckpt.restore_latest(state, train_iterator)
        logging_utils.log(
            f"resumed from {checkpointing.checkpoint_dir(run.workdir)} at step {int(state.step)}",
            primary=run.primary,
        )
    step = int(state.step)
    if loop.get("finished", "") and loop["finished"].startswith("reached") and step < total:
        logging_utils.log(
            f"extending a finished run from step {step} to {total} steps", primary=run.primary
        )
        loop["finished"] = None
    if loop.get("finished"):
        logging_utils.log(
            f"training already finished ({loop['finished']}) at step {step}", primary=run.primary
        )
        run.state = state
        ckpt.close()
        writer.close()
        return loop

    weights = None
    if t.class_weighting != "none":
        weights = ts.class_weights_from_counts(
            train_label_counts(run.data_dir, c.data.train_split, run.info.num_classes),
            t.class_weighting,
        )
        logging_utils.log(f"class weights {np.round(weights, 4).tolist()}", primary=run.primary)
    train_fn = ts.jit_train_step(run.mdef, state, run.mesh, weights)
    eval_fn = ts.jit_eval_step(run.mdef, state, run.mesh)
    best_mode = "min" if t.best_metric == "val_loss" else "max"

    logging_utils.log(
        f"training {c.model.arch} (width {c.model.width}, {c.model.dtype}) on {run.data_dir}: "
        f"{spe} steps/epoch, up to {total} steps, {run.mesh.devices.size} device(s), "
        f"{jax.process_count()} process(es)",
        primary=run.primary,
    )
    bar = None
    t_start = time.time()
    with _SigtermFlag() as sigterm:
        while step < total:
            if bar is None:
                epoch = step // spe
                bar = logging_utils.progress(
                    min(spe, total - epoch * spe),
                    initial=step - epoch * spe,
                    desc=f"epoch {epoch + 1}/{t.max_epochs}",
                    enabled=run.primary and c.runtime.progress_bar,
                )
            batch = next(train_iterator)
            batch = input_pipeline.to_global_array(
                {"image": batch["image"], "label": batch["label"]}, run.mesh
            )
            state, m = train_fn(state, batch)
            m = jax.device_get(m)
            if not bool(m["finite"]):
                bar.close()
                ckpt.wait()
                last = ckpt.latest_step()
                writer.write(step + 1, {"loss": float(m["loss"]), "finite": False})
                writer.close()
                ckpt.close()
                where = (
                    f"the last good checkpoint is step {last} in {checkpointing.checkpoint_dir(run.workdir)}"
                    if last is not None
                    else "no checkpoint was written yet"
                )
                raise NonFiniteError(
                    f"step {step + 1}: loss or gradients are not finite (loss={float(m['loss'])}, grad_norm="
                    f"{float(m['grad_norm'])}); training stopped and {where}; lower "
                    "config.optimizer.learning_rate, try model.dtype=float32, or check the data"
                )
            step += 1
            loop["epoch_loss_sum"] += float(m["loss"])
            loop["epoch_steps"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(m['loss']):.4f}", lr=f"{loop['learning_rate']:.2g}")
            if step % t.log_every_steps == 0:
                writer.write(
                    step,
                    {
                        "loss": m["loss"],
                        "accuracy": m["accuracy"],
                        "grad_norm": m["grad_norm"],
                        "learning_rate": loop["learning_rate"],
                    },
                )
            epoch_end = step % spe == 0
            if epoch_end or step == total:
                bar.close()
                bar = None
            if epoch_end:
                loop["epoch"] = step // spe
                val = evaluate_lib.quick_metrics(
                    evaluate_lib.predict_split(
                        eval_fn,
                        state,
                        run.mesh,
                        split=c.data.val_split,
                        batch_size=t.eval_batch_size,
                        **_eval_kwargs(run),
                    )
                )
                record = {
                    "epoch": loop["epoch"],
                    "step": step,
                    "train_loss": loop["epoch_loss_sum"] / max(1, loop["epoch_steps"]),
                    "val_loss": val["loss"],
                    "val_accuracy": val["accuracy"],
                    "val_auc_roc": val["auc_roc"],
                    "learning_rate": loop["learning_rate"],
                }
                loop["history"].append(record)
                loop["epoch_loss_sum"], loop["epoch_steps"] = 0.0, 0
                writer.write(step, record, kind="epoch")
                logging_utils.log(
                    f"epoch {loop['epoch']}: train loss {record['train_loss']:.4f}, val loss {val['loss']:.4f}, "
                    f"val acc {val['accuracy']:.4f}, val AUC {val['auc_roc']:.4f}",
                    primary=run.primary,
                )
                value = record[t.best_metric]
                if (
                    value is not None
                    and math.isfinite(value)
                    and _improved(value, loop["best_value"], best_mode)
                ):
                    loop["best_value"], loop["best_step"] = value, step
                    ckpt.save_best(
                        step, state, {"epoch": loop["epoch"], "step": step, t.best_metric: value}
                    )
                old_lr = loop["learning_rate"]
                update_schedules(loop, val["loss"], t)
                if loop["learning_rate"] < old_lr:
                    logging_utils.log(
                        f"val loss plateaued: learning rate {old_lr:.3g} -> "
                        f"{loop['learning_rate']:.3g}",
                        primary=run.primary,
                    )
                    state = ts.set_learning_rate(state, loop["learning_rate"])
            if step >= total and not loop["finished"]:
                loop["finished"] = f"reached {step} steps"
            if (
                epoch_end
                or loop["finished"]
                or step % t.checkpoint_every_steps == 0
                or sigterm.raised
            ):
                ckpt.save_latest(step, state, train_iterator, loop)
            if sigterm.raised:
                ckpt.wait()
                ckpt.close()
                writer.close()
                raise Preempted(
                    f"SIGTERM: saved step {step} to {checkpointing.checkpoint_dir(run.workdir)}; "
                    "rerun the same command to resume"
                )
            if loop["finished"]:
                break
    if bar is not None:
        bar.close()
    if ckpt.best_step() is None:  # no epoch end reached (max_steps < steps per epoch)
        ckpt.save_best(step, state, {"step": step, "note": "final state (no epoch end reached)"})
    ckpt.wait()
    ckpt.close()
    writer.close()
    logging_utils.log(
        f"training done: {loop['finished']} ({time.time() - t_start:.1f} s this session)",
        primary=run.primary,
    )
    run.state = state
    return loop


# ----------------------------------------------------------------------------- evaluation
def restore_best(run: Run) -> tuple[ts.TrainState, int]:
    ckpt = checkpointing.RunCheckpoints(run.workdir)
    try:
        state, _, step = ckpt.restore_state(run.state, checkpointing.BEST)
    finally:
        ckpt.close()
    return state, step


def _split_preds(run: Run, state: ts.TrainState, splits) -> dict[str, dict]:
    eval_fn = ts.jit_eval_step(run.mdef, state, run.mesh)
    return {
        s: evaluate_lib.predict_split(
            eval_fn,
            state,
            run.mesh,
            split=s,
            batch_size=run.config.training.eval_batch_size,
            **_eval_kwargs(run),
        )
        for s in splits
    }


def host_model_state(state: ts.TrainState) -> nnx.State:
    """The model's state as host numpy arrays (for single-device functions such as Grad-CAM)."""
    return jax.device_get(ts.model_state(state))


def explain_split(
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
        host_model_state(state),
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


def evaluate_run(
    run: Run,
    state: ts.TrainState,
    *,
    step: int | None = None,
    explain_too: bool = False,
    extra_info: dict | None = None,
) -> dict:
    """val/test metrics (threshold from val) -> metrics.json, figures, optionally heatmaps, report."""
    c = run.config
    preds = _split_preds(run, state, (c.data.val_split, c.data.test_split))
    results = None
    if run.primary:
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
            threshold = results[c.data.val_split].get("threshold") or 0.5
            split_pred = preds.get(c.explain.split)
            predictions = (
                evaluate_lib.metrics.predict(split_pred["probabilities"], threshold)
                if split_pred is not None
                else None
            )
            explain_split(run, state, c.explain.split, predictions=predictions)
        write_run_report(run, results, extra_info=extra_info)
    return results


def _print_outputs(run: Run, results: dict | None) -> None:
    if not run.primary or results is None:
        return
    test = results.get(run.config.data.test_split, {})
    print(f"test accuracy {test.get('accuracy')}, AUC-ROC {test.get('auc_roc')}", flush=True)
    print(f"metrics:  {os.path.join(run.workdir, 'metrics.json')}", flush=True)
    print(f"report:   {os.path.join(run.workdir, 'report.html')}", flush=True)
    heat = os.path.join(run.workdir, "heatmaps")
    if os.path.isdir(heat):
        print(f"heatmaps: {heat}/ ({', '.join(sorted(os.listdir(heat)))})", flush=True)


# ----------------------------------------------------------------------------- modes
def train_and_evaluate(config, workdir: str) -> dict | None:
    """Mode train: fit (resuming if possible), then evaluate the best checkpoint and explain."""
    setup_runtime(config)
    t0 = time.time()
    run = build_run(config, workdir)
    loop = fit(run)
    state, step = restore_best(run)
    results = evaluate_run(
        run,
        state,
        step=step,
        explain_too=True,
        extra_info={
            "stopped": loop.get("finished"),
            "best checkpoint step": step,
            f"best {config.training.best_metric}": loop.get("best_value"),
            "epochs": loop.get("epoch"),
            "set-up and training time of this command (s)": round(time.time() - t0, 1),
        },
    )
    _print_outputs(run, results)
    return results


def evaluate(config, workdir: str) -> dict | None:
    """Mode evaluate: the best checkpoint on val and test -> metrics.json, figures, report."""
    setup_runtime(config)
    run = build_run(config, workdir)
    state, step = restore_best(run)
    results = evaluate_run(run, state, step=step)
    _print_outputs(run, results)
    return results


def _saved_metrics(run: Run) -> dict | None:
    """WORKDIR/metrics.json of an earlier train/evaluate command, if any."""
    path = os.path.join(run.workdir, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _best_on_primary(config, workdir: str) -> tuple[Run, ts.TrainState]:
    """The run with its best checkpoint restored (every process joins the restore)."""
    setup_runtime(config)
    run = build_run(config, workdir)
    state, _ = restore_best(run)
    return run, state


def explain(config, workdir: str) -> dict | None:
    """Mode explain: heatmaps of config.explain.split from the best checkpoint (of the
    images under config.predict.folder when it is set, as predict mode)."""
    if config.predict.folder:
        return predict(config, workdir)
    run, state = _best_on_primary(config, workdir)
    if not run.primary:
        return None
    result = explain_split(run, state, config.explain.split)
    metrics = _saved_metrics(run)
    if metrics is not None:
        write_run_report(run, metrics)
    print(f"heatmaps: {os.path.join(run.workdir, 'heatmaps')}", flush=True)
    return result


def predict(config, workdir: str) -> dict | None:
    """Mode predict: classify (and explain) every image under config.predict.folder."""
    run, state = _best_on_primary(config, workdir)
    if not run.primary:
        return None
    c = config
    metrics = _saved_metrics(run) or {}
    threshold = (metrics.get(c.data.val_split) or {}).get("threshold") or 0.5
    from xmedjax.explain.annotated import FolderAnnotations  # noqa: PLC0415
    from xmedjax.explain.run import predict_folder  # noqa: PLC0415

    return predict_folder(
        run.mdef.graphdef,
        host_model_state(state),
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


MODES = {"train": train_and_evaluate, "evaluate": evaluate, "explain": explain, "predict": predict}
