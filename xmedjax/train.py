"""The training loop: `fit(run)` trains a `runs.Run` (or resumes it) to its end.

    run = runs.build_run(config, workdir)
    loop = fit(run)           # LoopState: epochs, best step, history, why it stopped

Each epoch: train steps (checkpoint every `checkpoint_every_steps`, and on SIGTERM or
Ctrl-C, which then stop the loop with Preempted), then the val metrics, the best checkpoint
(by `best_metric`), reduce-on-plateau and early stopping (`update_schedules`, Keras
semantics), and a `latest` checkpoint. The host-side `LoopState` is saved with each
`latest` checkpoint, so rerunning on a work directory resumes exactly (the Grain iterator
position is restored with the train state). A resumed run applies the settings
`runs.RESUMABLE` lets it change (`run.changes`; one line says which, and
WORKDIR/resumes.jsonl records them): a run that reached its step limit and is given more
epochs continues; a new learning rate replaces the current one. The modes that call this
are in `xmedjax.modes`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from xmedjax import checkpointing, input_pipeline, logging_utils, runs
from xmedjax import evaluate as evaluate_lib
from xmedjax import train_state as ts
from xmedjax.config_checks import ConfigError
from xmedjax.runs import Run, eval_data_kwargs


class NonFiniteError(RuntimeError):
    """A train step produced a non-finite loss or gradient."""


class Preempted(RuntimeError):
    """SIGTERM or SIGINT (Ctrl-C) arrived; the latest checkpoint was saved. `signum` is the
    signal (a command exits with 128 + signum: 143, 130)."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = int(signum)


class StopReason(enum.StrEnum):
    """Why training ended."""

    MAX_STEPS = "max_steps"  # max_epochs (or max_steps) reached; more epochs extend the run
    EARLY_STOPPING = "early_stopping"  # val loss stopped improving


@dataclasses.dataclass(frozen=True)
class LoopState:
    """The host-side loop state, saved as JSON (the checkpoint's `loop` item) at each `latest`."""

    learning_rate: float  # the current rate (after plateau reductions)
    base_learning_rate: float | None = None  # the config value it descends from (None: old)
    epoch: int = 0  # epochs completed
    stop: StopReason | None = None
    stop_step: int | None = None  # the step at which training stopped
    best_step: int | None = None
    best_value: float | None = None  # of config.training.best_metric
    es_best: float | None = None  # early stopping: best val loss, epochs without improvement
    es_wait: int = 0
    plateau_best: float | None = None  # reduce-on-plateau: the same, its own count
    plateau_wait: int = 0
    epoch_loss_sum: float = 0.0  # train loss of the current epoch so far
    epoch_steps: int = 0
    history: tuple[dict[str, Any], ...] = ()  # one record per epoch (metrics.jsonl "epoch")

    @property
    def stop_message(self) -> str | None:
        """Why training stopped, in words ("reached 8 steps"), or None while it runs."""
        if self.stop is StopReason.MAX_STEPS:
            return f"reached {self.stop_step} steps"
        if self.stop is StopReason.EARLY_STOPPING:
            return f"early stopping after epoch {self.epoch}"
        return None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (the checkpoint's `loop` item)."""
        out = dataclasses.asdict(self)
        out["stop"] = None if self.stop is None else self.stop.value
        out["history"] = [dict(r) for r in self.history]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoopState:
        """The inverse of `to_json`; also reads checkpoints whose loop has a "finished" string."""
        data = dict(data)
        if "finished" in data:  # written before LoopState: "reached N steps" / "early stopping ..."
            data.update(_legacy_stop(data.pop("finished")))
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in names}
        data["stop"] = None if data.get("stop") is None else StopReason(data["stop"])
        data["history"] = tuple(data.get("history") or ())
        return cls(**data)


def _legacy_stop(finished: str | None) -> dict[str, Any]:
    if not finished:
        return {"stop": None, "stop_step": None}
    if finished.startswith("reached"):
        return {"stop": StopReason.MAX_STEPS.value, "stop_step": int(finished.split()[1])}
    return {"stop": StopReason.EARLY_STOPPING.value, "stop_step": None}


def _improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def update_schedules(loop: LoopState, val_loss: float, t: Any) -> LoopState:
    """Epoch-end bookkeeping on the val loss (Keras semantics); returns the new LoopState.

    Reduce-on-plateau: after `reduce_on_plateau_patience` epochs without a lower val loss
    the learning rate is multiplied by `reduce_on_plateau_factor` (not below
    `min_learning_rate`) and the count restarts. Early stopping: after
    `early_stopping_patience` epochs without an improvement larger than
    `early_stopping_min_delta`, `stop` becomes EARLY_STOPPING. A patience of 0 turns either
    off. `t` is config.training; `loop` is not modified.
    """
    es_best, es_wait = loop.es_best, loop.es_wait + 1
    if _improved(val_loss, loop.es_best, "min", t.early_stopping_min_delta):
        es_best, es_wait = val_loss, 0
    plateau_best, plateau_wait = loop.plateau_best, loop.plateau_wait + 1
    if _improved(val_loss, loop.plateau_best, "min"):
        plateau_best, plateau_wait = val_loss, 0
    learning_rate = loop.learning_rate
    if t.reduce_on_plateau_patience and plateau_wait >= t.reduce_on_plateau_patience:
        learning_rate = max(learning_rate * t.reduce_on_plateau_factor, t.min_learning_rate)
        plateau_wait = 0
    stop = loop.stop
    if t.early_stopping_patience and es_wait >= t.early_stopping_patience:
        stop = StopReason.EARLY_STOPPING
    return dataclasses.replace(
        loop,
        es_best=es_best,
        es_wait=es_wait,
        plateau_best=plateau_best,
        plateau_wait=plateau_wait,
        learning_rate=learning_rate,
        stop=stop,
    )


class _StopSignals:
    """SIGTERM and SIGINT (Ctrl-C) set a flag the loop checks after each step, so the step in
    progress is saved before the loop stops; a second Ctrl-C stops at once, unsaved. The old
    handlers are restored after."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def raised(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> _StopSignals:
        for signum in self.SIGNALS:
            try:
                self._old[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread
                break
        return self

    def _handle(self, signum, frame) -> None:
        del frame
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        if self.signum is None:
            self.signum = signum
        if signum == signal.SIGINT:
            print(
                "Ctrl-C: saving a checkpoint after this step (Ctrl-C again stops now, unsaved)",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, *exc: object) -> None:
        for signum, old in self._old.items():
            signal.signal(signum, old)


@dataclasses.dataclass
class _Session:
    """What one `fit` call trains with (none of it is checkpointed)."""

    run: Run
    steps_per_epoch: int
    total: int
    iterator: Any
    ckpt: checkpointing.RunCheckpoints
    writer: logging_utils.MetricWriter
    train_fn: Callable | None = None  # these three are set once the loop is known to run
    eval_fn: Callable | None = None
    signals: _StopSignals | None = None

    @property
    def t(self) -> Any:
        return self.run.config.training

    def log(self, message: str) -> None:
        logging_utils.log(message, primary=self.run.primary)


# ----------------------------------------------------------------------------- fit
def fit(run: Run, *, train_iterator: Any = None) -> LoopState:
    """Trains (or resumes) to the end; returns the LoopState and leaves run.state final.

    Raises NonFiniteError on a non-finite loss or gradient (nothing after the last good
    checkpoint is saved) and Preempted after SIGTERM or SIGINT (the step is saved first).
    Checkpoint managers, the metric writer, progress bars and the signal handlers are
    released on every way out.
    """
    steps_per_epoch, total = _schedule(run)
    if train_iterator is None:
        train_iterator = _train_iterator(run)
    t_start = None  # set when this call trains
    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(checkpointing.RunCheckpoints(run.workdir))
        writer = stack.enter_context(
            contextlib.closing(logging_utils.MetricWriter(run.workdir, enabled=run.primary))
        )
        s = _Session(run, steps_per_epoch, total, train_iterator, ckpt, writer)
        state, loop = _resume(s)
        if loop.stop is not None:
            s.log(f"training already finished ({loop.stop_message}) at step {int(state.step)}")
        else:
            t_start = time.time()
            s.train_fn, s.eval_fn = _compile_steps(s, state)
            s.signals = stack.enter_context(_StopSignals())
            state, loop = _train(s, state, loop)
            if ckpt.best_step() is None:  # no epoch end reached (max_steps < steps per epoch)
                step = int(state.step)
                note = {"step": step, "note": "final state (no epoch end reached)"}
                ckpt.save_best(step, state, note)
    if t_start is not None:  # after the last checkpoint is written
        s.log(f"training done: {loop.stop_message} ({time.time() - t_start:.1f} s this session)")
    run.state = state
    return loop


def _schedule(run: Run) -> tuple[int, int]:
    """(steps per epoch, total steps) of the run's config."""
    c, t = run.config, run.config.training
    spe = input_pipeline.steps_per_epoch(run.data_dir, c.data.train_split, t.batch_size)
    if spe == 0:
        raise ConfigError(
            f"config.training.batch_size={t.batch_size} exceeds the {c.data.train_split} split"
        )
    total = spe * t.max_epochs
    if t.max_steps:
        total = min(total, t.max_steps)
    return spe, total


def _train_iterator(run: Run) -> Any:
    c = run.config
    return input_pipeline.make_train_iterator(
        run.data_dir,
        c.data.train_split,
        global_batch_size=c.training.batch_size,
        preprocess=input_pipeline.Preprocess.from_config(c),
        augment=dict(c.augment),
        seed=c.training.seed,
        worker_count=c.data.worker_count,
    )


def _resume(s: _Session) -> tuple[ts.TrainState, LoopState]:
    """The latest checkpoint (state, loop; the iterator is moved) with the run's changed
    settings applied (one line, and a record in resumes.jsonl), or a fresh start."""
    run = s.run
    rate = run.config.optimizer.learning_rate
    state, loop = run.state, LoopState(learning_rate=rate, base_learning_rate=rate)
    if s.ckpt.latest_step() is not None:
        state, saved = s.ckpt.restore_latest(state, s.iterator)
        state, loop, changes, note = _apply_learning_rate(s, state, LoopState.from_json(saved))
        step = int(state.step)
        said = ", ".join(
            f"{k} {old!r} -> {new!r}" + (note if k == "optimizer.learning_rate" else "")
            for k, (old, new) in changes.items()
        )
        where = f"resumed from {checkpointing.checkpoint_dir(run.workdir)} at step {step}"
        s.log(where + (f" with changed settings: {said}" if said else ""))
        runs.record_resume(run, step, changes)
    step = int(state.step)
    if loop.stop is StopReason.MAX_STEPS and step < s.total:
        s.log(f"extending a finished run from step {step} to {s.total} steps")
        loop = dataclasses.replace(loop, stop=None, stop_step=None)
    elif loop.stop is None and step >= s.total:  # resumed with a lower step limit
        s.log(f"step {step} reaches the new limit of {s.total} steps: training ends here")
        loop = dataclasses.replace(loop, stop=StopReason.MAX_STEPS, stop_step=step)
    return state, loop


def _apply_learning_rate(
    s: _Session, state: ts.TrainState, loop: LoopState
) -> tuple[ts.TrainState, LoopState, dict[str, tuple[Any, Any]], str]:
    """A changed config.optimizer.learning_rate becomes the current rate (plateau reductions
    so far dropped). The checkpoint's `base_learning_rate` says whether it changed (also
    after a resumed command was killed before its first save), else config.json.

    Returns (state, loop, the run's changes with the rate's, a note on what was done).
    """
    changes = dict(s.run.changes)
    new = s.run.config.optimizer.learning_rate
    base = loop.base_learning_rate
    if base is None:  # a checkpoint written before base_learning_rate existed
        base = changes.get("optimizer.learning_rate", (new, new))[0]
        loop = dataclasses.replace(loop, base_learning_rate=base)
    if base == new:
        changes.pop("optimizer.learning_rate", None)  # config.json was stale: nothing to do
        return state, loop, changes, ""
    note = f" (applied: the learning rate is now {new:g}, was {loop.learning_rate:g})"
    state = ts.set_learning_rate(state, new)
    loop = dataclasses.replace(loop, learning_rate=new, base_learning_rate=new)
    changes["optimizer.learning_rate"] = (base, new)
    return state, loop, dict(sorted(changes.items())), note


def train_label_counts(data_dir: str, split: str, num_classes: int) -> np.ndarray:
    """Examples per class of a prepared split (for class weighting)."""
    source = input_pipeline.PreparedSource(data_dir, split)
    labels = np.array([int(source[i]["label"]) for i in range(len(source))], np.int64)
    return np.bincount(labels, minlength=num_classes)


def _compile_steps(s: _Session, state: ts.TrainState) -> tuple[Callable, Callable]:
    """The jitted train and eval steps (class weights from the train split when asked)."""
    run, c, t = s.run, s.run.config, s.t
    weights = None
    if t.class_weighting != "none":
        weights = ts.class_weights_from_counts(
            train_label_counts(run.data_dir, c.data.train_split, run.info.num_classes),
            t.class_weighting,
        )
        s.log(f"class weights {np.round(weights, 4).tolist()}")
    train_fn = ts.jit_train_step(run.mdef, state, run.mesh, weights)
    eval_fn = ts.jit_eval_step(run.mdef, state, run.mesh)
    s.log(
        f"training {c.model.arch} (width {c.model.width}, {c.model.dtype}) on {run.data_dir}: "
        f"{s.steps_per_epoch} steps/epoch, up to {s.total} steps, {run.mesh.devices.size} "
        f"device(s), {jax.process_count()} process(es)"
    )
    return train_fn, eval_fn


def _train(s: _Session, state: ts.TrainState, loop: LoopState) -> tuple[ts.TrainState, LoopState]:
    """Epoch after epoch until the step limit or early stopping."""
    while int(state.step) < s.total and loop.stop is None:
        state, loop = _train_epoch(s, state, loop)
    return state, loop


def _train_epoch(
    s: _Session, state: ts.TrainState, loop: LoopState
) -> tuple[ts.TrainState, LoopState]:
    """The rest of the current epoch (to its end or the step limit), then its bookkeeping."""
    step = int(state.step)
    spe = s.steps_per_epoch
    epoch = step // spe
    end = min((epoch + 1) * spe, s.total)
    bar = logging_utils.progress(
        end - epoch * spe,
        initial=step - epoch * spe,
        desc=f"epoch {epoch + 1}/{s.t.max_epochs}",
        enabled=s.run.primary and s.run.config.runtime.progress_bar,
    )
    with contextlib.closing(bar):
        while True:
            state, loop = _train_step(s, state, loop, step, bar)
            step += 1
            if step == end:
                break
            _save_latest(s, state, loop, step, every_steps=True)
    if step % spe == 0:
        state, loop = _end_epoch(s, state, loop, step)
    if step >= s.total and loop.stop is None:
        loop = dataclasses.replace(loop, stop=StopReason.MAX_STEPS)
    if loop.stop is not None:
        loop = dataclasses.replace(loop, stop_step=step)
    _save_latest(s, state, loop, step, every_steps=False)
    return state, loop


def _train_step(
    s: _Session, state: ts.TrainState, loop: LoopState, step: int, bar: Any
) -> tuple[ts.TrainState, LoopState]:
    """One optimiser step (step -> step + 1); a non-finite loss or gradient stops training."""
    batch = next(s.iterator)
    batch = input_pipeline.to_global_array(
        {"image": batch["image"], "label": batch["label"]}, s.run.mesh
    )
    state, m = s.train_fn(state, batch)
    m = jax.device_get(m)
    if not bool(m["finite"]):
        _raise_nonfinite(s, m, step)
    step += 1
    loop = dataclasses.replace(
        loop,
        epoch_loss_sum=loop.epoch_loss_sum + float(m["loss"]),
        epoch_steps=loop.epoch_steps + 1,
    )
    bar.update(1)
    bar.set_postfix(loss=f"{float(m['loss']):.4f}", lr=f"{loop.learning_rate:.2g}")
    if step % s.t.log_every_steps == 0:
        scalars = {k: m[k] for k in ("loss", "accuracy", "grad_norm")}
        s.writer.write(step, scalars | {"learning_rate": loop.learning_rate})
    return state, loop


def _raise_nonfinite(s: _Session, m: dict, step: int) -> None:
    s.ckpt.wait()
    last = s.ckpt.latest_step()
    s.writer.write(step + 1, {"loss": float(m["loss"]), "finite": False})
    where = (
        f"the last good checkpoint is step {last} in {checkpointing.checkpoint_dir(s.run.workdir)}"
        if last is not None
        else "no checkpoint was written yet"
    )
    raise NonFiniteError(
        f"step {step + 1}: loss or gradients are not finite (loss={float(m['loss'])}, grad_norm="
        f"{float(m['grad_norm'])}); training stopped and {where}; lower "
        "config.optimizer.learning_rate, try model.dtype=float32, or check the data"
    )


def _save_latest(
    s: _Session, state: ts.TrainState, loop: LoopState, step: int, *, every_steps: bool
) -> None:
    """Saves `latest` (always, or only every `checkpoint_every_steps`); SIGTERM or SIGINT
    saves and raises Preempted."""
    due = not every_steps or step % s.t.checkpoint_every_steps == 0
    if due or s.signals.raised:
        s.ckpt.save_latest(step, state, s.iterator, loop.to_json())
    if s.signals.raised:
        name = signal.Signals(s.signals.signum).name
        raise Preempted(
            f"{name}: saved step {step} to {checkpointing.checkpoint_dir(s.run.workdir)}; "
            "rerun the same command to resume",
            s.signals.signum,
        )


def _end_epoch(
    s: _Session, state: ts.TrainState, loop: LoopState, step: int
) -> tuple[ts.TrainState, LoopState]:
    """Val metrics, the epoch record, the best checkpoint, plateau and early stopping."""
    c, t = s.run.config, s.t
    epoch = step // s.steps_per_epoch
    val = evaluate_lib.quick_metrics(
        evaluate_lib.predict_split(
            s.eval_fn,
            state,
            s.run.mesh,
            split=c.data.val_split,
            batch_size=t.eval_batch_size,
            **eval_data_kwargs(s.run),
        )
    )
    record = {
        "epoch": epoch,
        "step": step,
        "train_loss": loop.epoch_loss_sum / max(1, loop.epoch_steps),
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "val_auc_roc": val["auc_roc"],
        "learning_rate": loop.learning_rate,
    }
    loop = dataclasses.replace(
        loop, epoch=epoch, history=(*loop.history, record), epoch_loss_sum=0.0, epoch_steps=0
    )
    s.writer.write(step, record, kind="epoch")
    s.log(
        f"epoch {epoch}: train loss {record['train_loss']:.4f}, val loss {val['loss']:.4f}, "
        f"val acc {val['accuracy']:.4f}, val AUC {val['auc_roc']:.4f}"
    )
    loop = _keep_best(s, state, loop, record)
    new = update_schedules(loop, val["loss"], t)
    if new.learning_rate < loop.learning_rate:
        s.log(
            f"val loss plateaued: learning rate {loop.learning_rate:.3g} -> {new.learning_rate:.3g}"
        )
        state = ts.set_learning_rate(state, new.learning_rate)
    return state, new


def _keep_best(
    s: _Session, state: ts.TrainState, loop: LoopState, record: dict[str, Any]
) -> LoopState:
    """Saves `state` as the best checkpoint when the epoch improved config.training.best_metric."""
    metric = s.t.best_metric
    value = record[metric]
    mode = "min" if metric == "val_loss" else "max"
    if value is None or not math.isfinite(value) or not _improved(value, loop.best_value, mode):
        return loop
    step = record["step"]
    s.ckpt.save_best(step, state, {"epoch": loop.epoch, "step": step, metric: value})
    return dataclasses.replace(loop, best_value=value, best_step=step)


__all__ = [
    "LoopState",
    "NonFiniteError",
    "Preempted",
    "StopReason",
    "fit",
    "train_label_counts",
    "update_schedules",
]
