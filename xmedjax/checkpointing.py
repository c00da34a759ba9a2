"""Orbax checkpoints of a run: `latest` (resume) and `best` (by a val metric).

    WORKDIR/checkpoints/latest/<step>/{state, data_iter, loop}
    WORKDIR/checkpoints/best/<step>/{state, loop}

`state` is the TrainState (params, BatchNorm statistics, optimiser state with its learning
rate, step); `data_iter` the Grain iterator state (one JSON per process, Grain's own Orbax
handler); `loop` the host-side loop state (`train.LoopState`: epoch, early-stopping and
plateau counters, history, why training stopped) as JSON. `saved_step` and `restore_saved`
read a run without creating or writing anything (for `runs.load_trained`). Orbax writes each
step into a temporary folder and renames it when complete, so a run killed mid-save resumes
from the previous complete step.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

LATEST = "latest"
BEST = "best"


def checkpoint_dir(workdir: str, which: str = LATEST) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints", which)


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) to restore into `state`'s structure and placement."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def _manager(directory: str, max_to_keep: int, name: str = LATEST) -> ocp.CheckpointManager:
    # Each manager gets its own barrier names: latest and best may save the same step, and
    # with several processes identical names collide ("Barrier ... is already ongoing").
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=f"xmedjax_{name}"
        ),
    )
    return ocp.CheckpointManager(directory, options=options)


class RunCheckpoints:
    """The latest and best checkpoint managers of one work directory."""

    def __init__(self, workdir: str, *, keep_latest: int = 2):
        self.workdir = workdir
        self.latest = _manager(checkpoint_dir(workdir, LATEST), keep_latest, LATEST)
        self.best = _manager(checkpoint_dir(workdir, BEST), 1, BEST)

    # ------------------------------------------------------------------ save
    def save_latest(self, step: int, state: Any, iterator: Any, loop: dict) -> None:
        """Saves state, iterator position and loop state at `step` (no-op if already saved)."""
        if step in self.latest.all_steps():
            return
        args = {"state": ocp.args.StandardSave(state), "loop": ocp.args.JsonSave(loop)}
        if iterator is not None:
            args["data_iter"] = grain.checkpoint.CheckpointSave(iterator)
        self.latest.save(step, args=ocp.args.Composite(**args), force=True)

    def save_best(self, step: int, state: Any, loop: dict) -> None:
        """Keeps `state` as the best so far (replaces the previous best)."""
        if step in self.best.all_steps():
            return
        self.best.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop)
            ),
            force=True,
        )

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()

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
        """(state, loop) of the latest step; `iterator` is moved to the saved position."""
        step = self.latest.latest_step()
        args = {
            "state": ocp.args.StandardRestore(abstract_like(state_like)),
            "loop": ocp.args.JsonRestore(),
        }
        if iterator is not None:
            args["data_iter"] = grain.checkpoint.CheckpointRestore(iterator)
        restored = self.latest.restore(step, args=ocp.args.Composite(**args))
        return restored["state"], restored["loop"]

    def restore_state(self, state_like: Any, which: str = BEST) -> tuple[Any, dict, int]:
        """(state, loop, step) of the best (or latest) checkpoint, without the iterator."""
        manager = self.best if which == BEST else self.latest
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"no {which} checkpoint under {checkpoint_dir(self.workdir, which)}; "
                "train first (config.mode=train) with this --workdir"
            )
        return (*_restore_state_and_loop(manager, step, state_like), step)


def _restore_state_and_loop(
    manager: ocp.CheckpointManager, step: int, state_like: Any
) -> tuple[Any, dict]:
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_like(state_like)),
            loop=ocp.args.JsonRestore(),
        ),
    )
    return restored["state"], restored["loop"]


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
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            paths[step],
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_like(state_like)),
                loop=ocp.args.JsonRestore(),
            ),
        )
    return restored["state"], restored["loop"], step


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


def read_params(workdir: str, which: str = LATEST, step: int | None = None) -> dict:
    """The raw saved state tree (numpy, no target structure): for tests and inspection."""
    manager = _manager(checkpoint_dir(workdir, which), 2, which)
    step = manager.latest_step() if step is None else step
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return restored["state"]
