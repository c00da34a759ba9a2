"""Interrupted runs resume exactly: SIGTERM saves, kill -9 loses only the steps since the last
checkpoint, and the final parameters equal an uninterrupted run's bit for bit (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_train import ROOT, TINY_COUNTS, phantom_dir, tiny_config  # noqa: F401 (fixture)

from xmedjax import checkpointing, runs, train

# The child runs the real CLI with each train batch delayed, so the test can interrupt it
# mid-epoch deterministically.
CHILD = """
import sys, time
import xmedjax.input_pipeline as ip
_make = ip.make_train_iterator
def _slow(*args, **kwargs):
    it = _make(*args, **kwargs)
    cls = type(it)
    if not getattr(cls, "_slowed", False):
        nxt = cls.__next__
        def __next__(self):
            time.sleep(%(delay)s)
            return nxt(self)
        cls.__next__, cls._slowed = __next__, True
    return it
ip.make_train_iterator = _slow
from xmedjax import main
sys.argv = ["xmedjax.main"] + %(argv)r
main.run()
"""

EPOCHS = 3
STEPS_PER_EPOCH = TINY_COUNTS["train"] // 8  # 4


def _overrides(data_dir: str) -> dict:
    return {"training.max_epochs": EPOCHS, "training.checkpoint_every_steps": 1}


def _argv(workdir: str, data_dir: str) -> list[str]:
    args = [f"--config={os.path.join(ROOT, 'configs', 'demo.py')}", f"--workdir={workdir}"]
    c = tiny_config(data_dir, **_overrides(data_dir))
    flat = {
        "data.phantom_counts.train": TINY_COUNTS["train"],
        "data.phantom_counts.val": TINY_COUNTS["val"],
        "data.phantom_counts.test": TINY_COUNTS["test"],
        "data.data_dir": data_dir,
        "data.image_size": 32,
        "model.width": c.model.width,
        "training.batch_size": 8,
        "training.eval_batch_size": 16,
        "training.max_epochs": EPOCHS,
        "training.checkpoint_every_steps": 1,
        "evaluate.bootstrap_samples": 20,
        "explain.quality": False,
        "runtime.progress_bar": False,
        "runtime.compilation_cache_dir": c.runtime.compilation_cache_dir,
    }
    return args + [f"--config.{k}={v}" for k, v in flat.items()]


def _start(workdir: str, data_dir: str, delay: float) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    script = CHILD % {"delay": delay, "argv": _argv(workdir, data_dir)}
    return subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _saved_steps(workdir: str) -> list[int]:
    d = checkpointing.checkpoint_dir(workdir)
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _wait_for(proc, workdir, predicate, timeout=120.0) -> list[int]:
    start = time.time()
    while time.time() - start < timeout:
        steps = _saved_steps(workdir)
        if steps and predicate(steps[-1]):
            return steps
        if proc.poll() is not None:
            raise AssertionError(
                f"child ended early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}"
            )
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no checkpoint appeared in time")


def _final_params(workdir: str) -> list[np.ndarray]:
    state = checkpointing.read_params(workdir, checkpointing.LATEST)
    return [np.asarray(x) for x in jax.tree.leaves(state)]


class _TermAt:
    """Wraps a train iterator and sends this process SIGTERM when batch `at` is taken."""

    def __init__(self, inner, at: int):
        self.inner, self.at, self.count = inner, at, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.count += 1
        if self.count == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.inner)

    def get_state(self):  # Grain's Orbax handler stores these bytes as the iterator's JSON state
        return json.dumps(self.inner.get_state()).encode()

    def set_state(self, state):
        self.inner.set_state(json.loads(state))

    def start_prefetch(self):
        pass


@pytest.mark.slow
def test_sigterm_then_kill9_then_resume_matches_uninterrupted_run(tmp_path, phantom_dir):  # noqa: F811
    from xmedjax import input_pipeline

    total = EPOCHS * STEPS_PER_EPOCH
    config = tiny_config(phantom_dir, **_overrides(phantom_dir))
    # Reference: one uninterrupted run.
    ref_dir = str(tmp_path / "ref")
    loop = train.fit(runs.build_run(config, ref_dir))
    assert loop.stop is train.StopReason.MAX_STEPS and loop.stop_step == total
    assert loop.stop_message == f"reached {total} steps"

    work = str(tmp_path / "interrupted")
    # 1. SIGTERM during step 3: the step finishes, is saved, and the loop raises Preempted.
    inner = input_pipeline.make_train_iterator(
        phantom_dir,
        "train",
        global_batch_size=8,
        preprocess=input_pipeline.Preprocess(32, 1, "imagenet"),
        augment=dict(config.augment),
        seed=0,
    )
    with pytest.raises(train.Preempted, match="SIGTERM: saved step 3"):
        train.fit(runs.build_run(config, work), train_iterator=_TermAt(inner, at=3))
    assert _saved_steps(work)[-1] == 3

    # 2. The real CLI resumes in a child; kill -9 it in the middle of epoch 2 (not an epoch end).
    proc = _start(work, phantom_dir, delay=0.25)
    steps = _wait_for(proc, work, lambda s: s > STEPS_PER_EPOCH and s % STEPS_PER_EPOCH != 0)
    os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    assert f"resumed from {checkpointing.checkpoint_dir(work)} at step 3" in out, out[-3000:]
    killed_at = _saved_steps(work)[-1]
    assert steps[-1] <= killed_at < total

    # 3. Rerun to the end: same parameters, bit for bit, and the same loop records.
    loop2 = train.fit(runs.build_run(config, work))
    assert loop2.stop is loop.stop and loop2.stop_message == loop.stop_message
    assert _saved_steps(work)[-1] == total
    for a, b in zip(_final_params(ref_dir), _final_params(work), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [h["val_loss"] for h in loop2.history] == [h["val_loss"] for h in loop.history]
    assert loop2.best_step == loop.best_step
