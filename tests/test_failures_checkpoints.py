"""Checkpoint failures: one line each, never Orbax's cascade, and nothing lost.

A damaged newest step (a truncated data file, a deleted _METADATA) is set aside and the run
resumes from the newest intact one, ending bit for bit where an uninterrupted run ends; a
damaged best step is read from its twin in latest; with no intact step, one error line. A
save that fails (disk full, no permission) stops training at that step with one line naming
the folder, and rerunning resumes exactly.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler
from test_train import ROOT, phantom_dir, tiny_config  # noqa: F401 (fixture)

from xmedjax import checkpointing, input_pipeline, modes, runs, train

# Reading a damaged step leaves Orbax coroutines that are never awaited: expected here (the
# command line filters the same noise), so their "Exception ignored" warnings are not shown.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

OVERRIDES = {"training.max_epochs": 1, "training.checkpoint_every_steps": 1}  # 4 steps


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantom_dir) -> str:  # noqa: F811
    """An uninterrupted 4-step run: latest holds steps 3 and 4, best step 4."""
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    train.fit(runs.build_run(tiny_config(phantom_dir, **OVERRIDES), workdir))
    return workdir


def _copy(trained: str, tmp_path) -> str:
    return shutil.copytree(trained, str(tmp_path / "run"))


def _step_dir(workdir: str, which: str, step: int) -> str:
    return os.path.join(checkpointing.checkpoint_dir(workdir, which), str(step))


def _truncate_largest_data_file(step_dir: str) -> str:
    files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*"))
    path = max(files, key=os.path.getsize)
    os.truncate(path, os.path.getsize(path) // 2)
    return path


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _one_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def test_truncated_newest_step_is_set_aside_and_resume_is_exact(
    trained,
    tmp_path,
    phantom_dir,  # noqa: F811
    capfd,
):
    work = _copy(trained, tmp_path)
    _truncate_largest_data_file(_step_dir(work, "latest", 4))
    capfd.readouterr()
    loop = train.fit(runs.build_run(tiny_config(phantom_dir, **OVERRIDES), work))
    out = capfd.readouterr()
    line = _one_line(out.err)
    assert line.startswith(f"warning: damaged checkpoint {_step_dir(work, 'latest', 4)} (")
    assert f"moved to {_step_dir(work, 'latest', 4)}.damaged" in line and "step 3" in line
    assert "at step 3" in out.out  # resumed from the newest intact step
    assert os.path.isdir(_step_dir(work, "latest", 4) + ".damaged")
    want = checkpointing.read_params(trained, checkpointing.LATEST, 4)
    got = checkpointing.read_params(work, checkpointing.LATEST, 4)
    for a, b in zip(_leaves(want), _leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loop.stop_message == "reached 4 steps"


def test_deleted_metadata_falls_back_and_none_intact_is_one_error(
    trained,
    tmp_path,
    phantom_dir,  # noqa: F811
    capfd,
):
    work = _copy(trained, tmp_path)
    os.remove(os.path.join(_step_dir(work, "latest", 4), "state", "_METADATA"))
    run = runs.build_run(tiny_config(phantom_dir, **OVERRIDES), work)
    capfd.readouterr()
    ckpt = checkpointing.RunCheckpoints(work)
    state, loop = ckpt.restore_latest(run.state, None)
    assert int(state.step) == 3 and loop["epoch_steps"] == 3
    line = _one_line(capfd.readouterr().err)
    assert "missing state/_METADATA" in line and _step_dir(work, "latest", 4) in line
    assert ckpt.latest_step() == 3
    ckpt.close()
    # The last intact step damaged as well: one error naming the folder, nothing moved.
    _truncate_largest_data_file(_step_dir(work, "latest", 3))
    ckpt = checkpointing.RunCheckpoints(work)
    with pytest.raises(checkpointing.CheckpointError) as err:
        ckpt.restore_latest(run.state, None)
    ckpt.close()
    msg = str(err.value)
    assert "\n" not in msg and "no intact latest checkpoint in" in msg, msg
    assert checkpointing.checkpoint_dir(work) in msg and "Traceback" not in capfd.readouterr().err
    assert os.path.isdir(_step_dir(work, "latest", 3))


def test_damaged_best_is_read_from_latest_then_refused_in_one_line(
    trained,
    tmp_path,
    phantom_dir,  # noqa: F811
    capfd,
):
    work = _copy(trained, tmp_path)
    _truncate_largest_data_file(_step_dir(work, "best", 4))
    config = tiny_config(phantom_dir, mode="evaluate", **OVERRIDES)
    capfd.readouterr()
    results = modes.evaluate(config, work)  # the evaluate mode, end to end
    line = _one_line(capfd.readouterr().err)
    assert _step_dir(work, "best", 4) in line and _step_dir(work, "latest", 4) in line, line
    assert results["test"]["n"] > 0
    with open(os.path.join(work, "metrics.json")) as f:
        assert json.load(f)["checkpoint_step"] == 4
    run = runs.build_run(config, work)
    reference = checkpointing.RunCheckpoints(trained)
    want, _, _ = reference.restore_state(run.state)
    reference.close()
    ckpt = checkpointing.RunCheckpoints(work)
    state, _, step = ckpt.restore_state(run.state)  # again: from latest, silently
    assert step == 4
    for a, b in zip(_leaves(want), _leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    _truncate_largest_data_file(_step_dir(work, "latest", 4))
    with pytest.raises(checkpointing.CheckpointError, match="no intact best checkpoint in") as err:
        ckpt.restore_state(run.state)
    ckpt.close()
    assert "\n" not in str(err.value) and "config.mode=train" in str(err.value)


class _Counting:
    """A train iterator that counts the batches taken."""

    def __init__(self, inner):
        self.inner, self.count = inner, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.count += 1
        return next(self.inner)

    def get_state(self):
        return json.dumps(self.inner.get_state()).encode()

    def set_state(self, state):
        self.inner.set_state(json.loads(state))

    def start_prefetch(self):
        pass


def _fail_loop_save_at(monkeypatch, step: int, code: int) -> None:
    """The JSON write of `loop` at `step` fails as a full disk or a read-only folder would."""
    save = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def failing(self, x, directory):
        if x.get("epoch_steps") == step:
            raise OSError(code, os.strerror(code), os.fspath(directory / "metadata"))
        return await save(self, x, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", failing)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_failed_save_stops_training_there_and_resume_is_exact(
    trained,
    tmp_path,
    phantom_dir,  # noqa: F811
    monkeypatch,
    capfd,
    code,
):
    work = str(tmp_path / "run")
    config = tiny_config(phantom_dir, **OVERRIDES)
    iterator = _Counting(
        input_pipeline.make_train_iterator(
            phantom_dir,
            "train",
            global_batch_size=8,
            preprocess=input_pipeline.Preprocess(32, 1, "imagenet"),
            augment=dict(config.augment),
            seed=0,
        )
    )
    _fail_loop_save_at(monkeypatch, 2, code)
    capfd.readouterr()
    with pytest.raises(checkpointing.CheckpointError) as err:
        train.fit(runs.build_run(config, work), train_iterator=iterator)
    assert iterator.count == 2  # not one step past the failed save
    msg = str(err.value)
    assert "\n" not in msg and "could not save step 2 to " in msg, msg
    assert os.strerror(code) in msg and checkpointing.checkpoint_dir(work) in msg, msg
    assert "resumes from step 1" in msg
    assert "Traceback" not in capfd.readouterr().err
    if code != errno.ENOSPC:
        return
    monkeypatch.undo()
    train.fit(runs.build_run(config, work))  # space freed: resume to the end
    want = checkpointing.read_params(trained, checkpointing.LATEST, 4)
    got = checkpointing.read_params(work, checkpointing.LATEST, 4)
    for a, b in zip(_leaves(want), _leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)


CHILD = """
import errno, os, sys
sys.path.insert(0, {tests!r})
from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh
save = jh.JsonCheckpointHandler._save_fn
async def failing(self, x, directory):
    if x.get("epoch_steps") == 2:
        raise OSError(errno.ENOSPC, "No space left on device", os.fspath(directory / "metadata"))
    return await save(self, x, directory)
jh.JsonCheckpointHandler._save_fn = failing
from test_train import tiny_config
from xmedjax import cli_errors, runs, train
config = tiny_config({data!r}, **{overrides!r})
with cli_errors.one_line_errors("xmedjax.main"):
    train.fit(runs.build_run(config, {work!r}))
"""


def test_a_failed_save_in_a_command_is_one_line_to_the_end(tmp_path, phantom_dir):  # noqa: F811
    """In a real process, up to its exit: no Orbax log, no 'Event loop is closed' noise."""
    script = CHILD.format(
        tests=os.path.join(ROOT, "tests"),
        data=phantom_dir,
        overrides=OVERRIDES,
        work=str(tmp_path / "run"),
    )
    res = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 1, res.stderr[-3000:]
    line = _one_line(res.stderr)
    assert line.startswith("xmedjax.main: error: could not save step 2 to "), line
    assert "No space left on device" in line
