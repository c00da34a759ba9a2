"""Orbax checkpoints of a run: `latest` (resume) and `best` (by a val metric).

    WORKDIR/checkpoints/latest/<step>/{state, data_iter, loop}
    WORKDIR/checkpoints/best/<step>/{state, loop}
    WORKDIR/checkpoints/{latest,best}/<step>.damaged   set aside by a restore (see below)

`state` is the TrainState (params, BatchNorm statistics, optimiser state with its learning
rate, step); `data_iter` the Grain iterator state (one JSON per process, Grain's own Orbax
handler); `loop` the host-side loop state (`train.LoopState`: epoch, early-stopping and
plateau counters, history, why training stopped) as JSON. `saved_step` and `restore_saved`
read a run without creating or writing anything (for `runs.load_trained`). Orbax writes
each step into a temporary folder and renames it when complete, so a run killed mid-save
resumes from the previous complete step; the next command that takes the work directory's
lock deletes such folders (`remove_interrupted_saves`).

Failures are one line (`CheckpointError`), never Orbax's cascade of tracebacks:

- A save waits until the step is on disk; a failed one (disk full, read-only folder) raises
  CheckpointError naming the folder there, so training stops at the failed save.
- A restore reads the newest step; if it is damaged (a truncated or missing file), it falls
  back to the newest intact one with one warning line, and moves the damaged step aside to
  `<step>.damaged` (kept for inspection; delete it when you like). A damaged best step is
  read from `latest/<step>` when that still holds the same step. No intact step: one
  CheckpointError naming the folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from xmedjax import optimizer_layout
from xmedjax.cli_errors import describe, verbose

LATEST = "latest"
BEST = "best"
DAMAGED_SUFFIX = ".damaged"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or no intact one could be read; one line naming
    the folder."""


def checkpoint_dir(workdir: str, which: str = LATEST) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints", which)


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) to restore into `state`'s structure and placement,
    in the layout checkpoints hold (one optimiser array per parameter: optimizer_layout)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, optimizer_layout.disk_like(state))


def _manager(directory: str, max_to_keep: int, name: str = LATEST) -> ocp.CheckpointManager:
    # Each manager gets its own barrier names: latest and best may save the same step, and
    # with several processes identical names collide ("Barrier ... is already ongoing").
    # Saves are synchronous: one every checkpoint_every_steps costs little, and a failed save
    # raises in the step that made it instead of a few steps later.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        enable_async_checkpointing=False,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=f"xmedjax_{name}"
        ),
    )
    return ocp.CheckpointManager(directory, options=options)


# ----------------------------------------------------------------------------- Orbax's noise
class _HeldBack(logging.Filter):
    """Holds back Orbax's ERROR records (with their tracebacks) while a save or restore runs;
    the caller raises or reports the failure itself, in one line."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
            self.records.append(record)
            return False
        return True


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[_HeldBack]:
    """Orbax's ERROR logs held back (shown as usual under --verbosity=1)."""
    held = _HeldBack()
    if verbose():
        yield held
        return
    logger = logging.getLogger("absl")
    logger.addFilter(held)
    try:
        yield held
    finally:
        logger.removeFilter(held)


_after_failure: _HeldBack | None = None


def _hold_back_for_good() -> None:
    """After a failed save, Orbax's other threads of that save keep failing (until the
    process exits: "cannot schedule new futures after interpreter shutdown"); their errors
    repeat the one raised, so they are held back from then on (not under --verbosity=1)."""
    global _after_failure
    if _after_failure is None and not verbose():
        _after_failure = _HeldBack()
        logging.getLogger("absl").addFilter(_after_failure)


def _report_held(held: _HeldBack) -> None:
    """One warning line per distinct error Orbax logged but did not raise."""
    for message in dict.fromkeys(_first_line(r.getMessage()) for r in held.records):
        print(f"warning: Orbax: {message}", file=sys.stderr, flush=True)


_previous_unraisable_hook = None


def _drop_closed_loop_noise(unraisable) -> None:
    """A failed Orbax save leaves TensorStore futures that, when they finish after Orbax
    closed its event loop, print "RuntimeError: Event loop is closed" (hundreds of them, at
    exit). Those say nothing: the failure itself was raised. Everything else passes on."""
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and not verbose():
        return
    _previous_unraisable_hook(unraisable)


def _install_noise_filter() -> None:
    global _previous_unraisable_hook
    if _previous_unraisable_hook is None:
        _previous_unraisable_hook = sys.unraisablehook
        sys.unraisablehook = _drop_closed_loop_noise


def _first_line(text: str, limit: int = 300) -> str:
    return (text.strip().splitlines() or [""])[0][:limit]


def _root_cause(err: BaseException) -> str:
    """The innermost cause of `err` in one line (Orbax wraps TensorStore's precise error)."""
    seen: set[int] = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = err.__cause__ or err.__context__
        if inner is None:
            break
        err = inner
    if isinstance(err, OSError):
        return describe(err)
    return f"{type(err).__name__}: {_first_line(str(err))}"


class RunCheckpoints:
    """The latest and best checkpoint managers of one work directory."""

    def __init__(self, workdir: str, *, keep_latest: int = 2):
        self.workdir = workdir
        _install_noise_filter()
        self.latest = _manager(checkpoint_dir(workdir, LATEST), keep_latest, LATEST)
        self.best = _manager(checkpoint_dir(workdir, BEST), 1, BEST)

    def _which(self, manager: ocp.CheckpointManager) -> str:
        return LATEST if manager is self.latest else BEST

    # ------------------------------------------------------------------ save
    def save_latest(self, step: int, state: Any, iterator: Any, loop: dict) -> None:
        """Saves state, iterator position and loop state at `step` (no-op if already saved)."""
        if step in self.latest.all_steps():
            return
        state = optimizer_layout.to_disk(state)
        args = {"state": ocp.args.StandardSave(state), "loop": ocp.args.JsonSave(loop)}
        if iterator is not None:
            args["data_iter"] = grain.checkpoint.CheckpointSave(iterator)
        self._save(self.latest, step, ocp.args.Composite(**args))

    def save_best(self, step: int, state: Any, loop: dict) -> None:
        """Keeps `state` as the best so far (replaces the previous best)."""
        if step in self.best.all_steps():
            return
        state = optimizer_layout.to_disk(state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop))
        self._save(self.best, step, args)

    def _save(self, manager: ocp.CheckpointManager, step: int, args: Any) -> None:
        """Saves the step (synchronously): a failure stops the caller right here."""
        directory = checkpoint_dir(self.workdir, self._which(manager))
        with _quiet_orbax() as held:
            try:
                manager.save(step, args=args, force=True)
            except Exception as err:  # noqa: BLE001 - re-raised as one line naming the folder
                _hold_back_for_good()
                last = [s for s in manager.all_steps() if s != step]
                resume = f"step {max(last)}" if last else "the start"
                raise CheckpointError(
                    f"could not save step {step} to {directory}: {_root_cause(err)}; "
                    f"stopped there (rerunning the same command resumes from {resume})"
                ) from err
        _report_held(held)

    def wait(self) -> None:
        self._finish("wait_until_finished")

    def close(self) -> None:
        self._finish("close")

    def _finish(self, method: str) -> None:
        for manager in (self.latest, self.best):
            with _quiet_orbax() as held:
                try:
                    getattr(manager, method)()
                except Exception as err:  # noqa: BLE001 - re-raised as one line
                    directory = checkpoint_dir(self.workdir, self._which(manager))
                    raise CheckpointError(
                        f"checkpoints in {directory}: {_root_cause(err)}"
                    ) from err
            _report_held(held)

    def __enter__(self) -> RunCheckpoints:
        return self

    def __exit__(self, *exc: object) -> None:
        """Waits for pending saves, then closes both managers (on success and on errors)."""
        self.wait()
        self.close()

    # ------------------------------------------------------------------ restore
    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def best_step(self) -> int | None:
        return self.best.latest_step()

    def restore_latest(self, state_like: Any, iterator: Any) -> tuple[Any, dict]:
        """(state, loop) of the newest intact latest step; `iterator` is moved to its position.

        Damaged newer steps are moved aside (one warning line); none intact: CheckpointError.
        """
        args = {
            "state": ocp.args.StandardRestore(abstract_like(state_like)),
            "loop": ocp.args.JsonRestore(),
        }
        if iterator is not None:
            args["data_iter"] = grain.checkpoint.CheckpointRestore(iterator)
        composite = ocp.args.Composite(**args)
        steps = sorted(self.latest.all_steps(), reverse=True)
        candidates = [(step, [self.latest]) for step in steps]
        restored, _ = self._restore_first_intact(LATEST, candidates, composite)
        return optimizer_layout.from_disk(restored["state"], state_like), restored["loop"]

    def restore_state(self, state_like: Any, which: str = BEST) -> tuple[Any, dict, int]:
        """(state, loop, step) of the newest intact best (or latest) step, without the iterator.

        A damaged best step is read from `latest/<step>` when latest still holds it.
        """
        manager = self.best if which == BEST else self.latest
        steps = set(manager.all_steps())
        latest_steps = set(self.latest.all_steps()) if which == BEST else set()
        if which == BEST:  # steps set aside earlier whose twin in latest may still be intact
            steps |= _damaged_steps(checkpoint_dir(self.workdir, BEST)) & latest_steps
        if not steps:
            raise FileNotFoundError(
                f"no {which} checkpoint under {checkpoint_dir(self.workdir, which)}; "
                "train first (config.mode=train) with this --workdir"
            )
        candidates = []
        for step in sorted(steps, reverse=True):
            sources = [manager] if step in manager.all_steps() else []
            candidates.append((step, sources + ([self.latest] if step in latest_steps else [])))

        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_like(state_like)), loop=ocp.args.JsonRestore()
        )
        restored, step = self._restore_first_intact(which, candidates, args)
        return optimizer_layout.from_disk(restored["state"], state_like), restored["loop"], step

    def _restore_first_intact(
        self,
        which: str,
        candidates: list[tuple[int, list[ocp.CheckpointManager]]],
        args: Any,
    ) -> tuple[Any, int]:
        """The first (step, source) that restores on every process; damaged ones set aside."""
        damaged: list[tuple[ocp.CheckpointManager, int, str]] = []
        for step, sources in candidates:
            for source in sources:
                restored, cause = self._try_restore(source, step, args)
                if cause is None:
                    self._set_aside(damaged, (which, step, source))
                    return restored, step
                damaged.append((source, step, cause))
        directory = checkpoint_dir(self.workdir, which)
        what = "; ".join(
            f"{os.path.join(checkpoint_dir(self.workdir, self._which(m)), str(s))}: {c}"
            for m, s, c in damaged
        )
        fix = (
            f"move {directory} away to train from the start"
            if which == LATEST
            else "train again (config.mode=train) to save a new one"
        )
        raise CheckpointError(
            f"no intact {which} checkpoint in {directory} ({what}); {fix}, or restore the "
            "folder from a copy"
        )

    def _try_restore(
        self, manager: ocp.CheckpointManager, step: int, args: Any
    ) -> tuple[Any, str | None]:
        """(restored, None), or (None, why) when this step cannot be read on some process."""
        path = os.path.join(checkpoint_dir(self.workdir, self._which(manager)), str(step))
        restored, cause = None, _missing_parts(path, args)
        if not _everywhere(cause is None):  # every process tries the restore, or none does
            return None, cause or "incomplete on another process"
        with _quiet_orbax():
            try:
                restored = manager.restore(step, args=args)
            except Exception as err:  # noqa: BLE001 - a damaged step: the caller falls back
                cause = _root_cause(err)
        if not _everywhere(cause is None):
            cause = cause or "damaged on another process"
        return (restored, None) if cause is None else (None, cause)

    def _set_aside(self, damaged: list, used: tuple[str, int, ocp.CheckpointManager]) -> None:
        """Moves each damaged step to `<step>.damaged` and says so in one warning line."""
        if not damaged:
            return
        which, step, source = used
        moved = []
        for manager, bad_step, cause in damaged:
            directory = checkpoint_dir(self.workdir, self._which(manager))
            target = _move_aside(directory, bad_step) if jax.process_index() == 0 else None
            moved.append(f"{os.path.join(directory, str(bad_step))} ({cause}; moved to {target})")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices("xmedjax_checkpoint_set_aside")
        for manager in {id(m): m for m, _, _ in damaged}.values():
            manager.reload()
        if jax.process_index() == 0:
            src = os.path.join(checkpoint_dir(self.workdir, self._which(source)), str(step))
            print(
                f"warning: damaged checkpoint {'; '.join(moved)}; using {which} step {step} "
                f"from {src}",
                file=sys.stderr,
                flush=True,
            )


def saved_step(workdir: str, which: str = BEST) -> int | None:
    """The newest complete step saved under WORKDIR/checkpoints/<which>, or None.

    Creates nothing (unlike `RunCheckpoints`, whose managers create their folders).
    """
    paths = _saved_step_paths(workdir, which)
    return max(paths) if paths else None


def _saved_step_paths(workdir: str, which: str) -> dict[int, Any]:
    directory = checkpoint_dir(workdir, which)
    if not os.path.isdir(directory):
        return {}
    return {  # finalised steps only
        ocp.utils.step_from_checkpoint_name(p.name): p
        for p in ocp.utils.checkpoint_steps_paths(directory)
    }


def restore_saved(workdir: str, state_like: Any, which: str = BEST) -> tuple[Any, dict, int]:
    """(state, loop, step) of the newest `which` checkpoint, read-only: nothing is written.

    `state_like` is a TrainState or its ShapeDtypeStructs (with shardings).
    """
    paths = _saved_step_paths(workdir, which)
    if not paths:
        raise FileNotFoundError(
            f"no {which} checkpoint under {checkpoint_dir(workdir, which)}; "
            "train first (config.mode=train) with this --workdir"
        )
    step = max(paths)
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_like(state_like)), loop=ocp.args.JsonRestore()
    )
    with _quiet_orbax() as held, ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as reader:
        try:
            restored = reader.restore(paths[step], args=args)
        except Exception as err:  # noqa: BLE001 - re-raised as one line naming the step
            raise CheckpointError(
                f"{paths[step]} cannot be read ({_root_cause(err)}); "
                "rerun with config.mode=evaluate to fall back to an intact step"
            ) from err
    _report_held(held)
    return optimizer_layout.from_disk(restored["state"], state_like), restored["loop"], step


def saved_state_metadata(workdir: str, which: str = BEST) -> dict | None:
    """Shapes and dtypes of the newest `which` checkpoint's TrainState (Orbax ArrayMetadata
    leaves, no arrays read), or None without one. Read-only."""
    paths = _saved_step_paths(workdir, which)
    if not paths:
        return None
    handler = ocp.CompositeCheckpointHandler(  # every item named, or Orbax warns about it
        state=ocp.StandardCheckpointHandler(),
        loop=ocp.JsonCheckpointHandler(),
        data_iter=grain.checkpoint.CheckpointHandler(),
    )
    with ocp.Checkpointer(handler) as checkpointer:
        return checkpointer.metadata(paths[max(paths)]).item_metadata["state"].tree


def _missing_parts(path: str, args: Any) -> str | None:
    """Why a step folder cannot be whole, from its files alone (None: it looks whole)."""
    required = ["_CHECKPOINT_METADATA", os.path.join("state", "_METADATA")]
    if "loop" in args:
        required.append(os.path.join("loop", "metadata"))
    if "data_iter" in args:
        required.append("data_iter")
    missing = [r for r in required if not os.path.exists(os.path.join(path, r))]
    return f"missing {', '.join(missing)}" if missing else None


def _everywhere(ok: bool) -> bool:
    """Whether `ok` holds on every process (one process: itself)."""
    if jax.process_count() == 1:
        return ok
    import numpy as np  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _move_aside(directory: str, step: int) -> str:
    """Renames `directory/<step>` to `<step>.damaged` (or `.damaged.2`, ...); the new path."""
    source = os.path.join(directory, str(step))
    target, n = source + DAMAGED_SUFFIX, 1
    while os.path.exists(target):
        n += 1
        target = f"{source}{DAMAGED_SUFFIX}.{n}"
    os.rename(source, target)
    return target


def _damaged_steps(directory: str) -> set[int]:
    """Steps whose folders were set aside as `<step>.damaged*` in `directory`."""
    if not os.path.isdir(directory):
        return set()
    out = set()
    for name in os.listdir(directory):
        step, sep, _ = name.partition(DAMAGED_SUFFIX)
        if sep and step.isdigit():
            out.add(int(step))
    return out


def remove_interrupted_saves(workdir: str) -> list[str]:
    """Deletes the `<step>.orbax-checkpoint-tmp*` folders under latest/ and best/ (saves a
    killed or failed command left unfinished); the paths removed.

    Only for the holder of the work directory's lock (`workdir_lock.hold` calls it): another
    command's save in progress looks the same. Orbax's `cleanup_tmp_directories` option does
    this too, but asynchronously in every manager created, including read-only ones.
    """
    removed = []
    for which in (LATEST, BEST):
        directory = checkpoint_dir(workdir, which)
        if not os.path.isdir(directory):
            continue
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if ocp.utils.TMP_DIR_SUFFIX in name and os.path.isdir(path):
                shutil.rmtree(path)
                removed.append(path)
    return removed


def read_params(workdir: str, which: str = LATEST, step: int | None = None) -> dict:
    """The raw saved state tree (numpy, no target structure): for tests and inspection."""
    manager = _manager(checkpoint_dir(workdir, which), 2, which)
    step = manager.latest_step() if step is None else step
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return restored["state"]
