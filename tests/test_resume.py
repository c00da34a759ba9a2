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

from test_train import ROOT, TINY_COUNTS, phantom_dir, tiny_config  # noqa: F401 (fixture)
from xmedjax import checkpointing, train

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
    flat = {"data.phantom_counts.train": TINY_COUNTS["train"], "data.phantom_counts.val": TINY_COUNTS["val"],
            "data.phantom_counts.test": TINY_COUNTS["test"], "data.data_dir": data_dir, "data.image_size": 32,
            "model.width": c.model.width, "training.batch_size": 8, "training.eval_batch_size": 16,
            "training.max_epochs": EPOCHS, "training.checkpoint_every_steps": 1, "evaluate.bootstrap_samples": 20,
            "explain.quality": False, "runtime.progress_bar": False,
            "runtime.compilation_cache_dir": c.runtime.compilation_cache_dir}
    return args + [f"--config.{k}={v}" for k, v in flat.items()]


def _start(workdir: str, data_dir: str, delay: float) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    script = CHILD % {"delay": delay, "argv": _argv(workdir, data_dir)}
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


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
            raise AssertionError(f"child ended early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no checkpoint appeared in time")


def _final_params(workdir: str) -> list[np.ndarray]:
    state = checkpointing.read_params(workdir, checkpointing.LATEST)
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_sigterm_then_kill9_then_resume_matches_uninterrupted_run(tmp_path, phantom_dir):  # noqa: F811
    total = EPOCHS * STEPS_PER_EPOCH
    # Reference: one uninterrupted run (in process).
    ref_dir = str(tmp_path / "ref")
    run = train.build_run(tiny_config(phantom_dir, **_overrides(phantom_dir)), ref_dir)
    loop = train.fit(run)
    assert loop["finished"] == f"reached {total} steps"

    work = str(tmp_path / "interrupted")
    # 1. SIGTERM mid-epoch 1: the child saves its current step and exits 143.
    proc = _start(work, phantom_dir, delay=0.4)
    _wait_for(proc, work, lambda s: s >= 2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out[-3000:]
    assert "SIGTERM: saved step" in out
    after_term = _saved_steps(work)[-1]
    assert 2 <= after_term < total

    # 2. Resume in a child, kill -9 it in the middle of epoch 2 (a step that is not an epoch end).
    proc = _start(work, phantom_dir, delay=0.3)
    steps = _wait_for(proc, work, lambda s: s > after_term + 1 and s % STEPS_PER_EPOCH != 0 and s > STEPS_PER_EPOCH)
    os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    assert f"resumed from {checkpointing.checkpoint_dir(work)} at step {after_term}" in out, out[-3000:]
    killed_at = _saved_steps(work)[-1]
    assert killed_at >= steps[-1] and killed_at < total

    # 3. Rerun (in process) to the end.
    run = train.build_run(tiny_config(phantom_dir, **_overrides(phantom_dir)), work)
    loop2 = train.fit(run)
    assert loop2["finished"] == loop["finished"]
    assert _saved_steps(work)[-1] == total
    for a, b in zip(_final_params(ref_dir), _final_params(work), strict=True):
        np.testing.assert_array_equal(a, b)
    # The loop's records (per-epoch val metrics, best checkpoint) match too.
    assert [h["val_loss"] for h in loop2["history"]] == [h["val_loss"] for h in loop["history"]]
    assert loop2["best_step"] == loop["best_step"]
    assert json.loads(json.dumps(loop2["history"])) == loop2["history"]
