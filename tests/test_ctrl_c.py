"""Ctrl-C (SIGINT) during training saves the step in progress, as SIGTERM does, and the
command ends with one line and exit status 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from test_resume import CHILD, STEPS_PER_EPOCH, _argv
from test_train import ROOT, phantom_dir  # noqa: F401 (fixture)

from xmedjax import checkpointing


def test_ctrl_c_saves_the_step_and_exits_130(tmp_path, phantom_dir):  # noqa: F811
    work = str(tmp_path / "run")
    # Checkpoints only at epoch ends: a step saved mid-epoch was saved by the interrupt.
    argv = [
        a.replace("checkpoint_every_steps=1", "checkpoint_every_steps=100")
        for a in _argv(work, phantom_dir)
    ]
    script = CHILD % {"delay": 0.5, "argv": argv}
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in proc.stdout:  # wait until the loop runs
        lines.append(line)
        if line.startswith("training resnet50"):
            break
    else:
        raise AssertionError(f"training never started:\n{''.join(lines)}{proc.stderr.read()}")
    time.sleep(0.8)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, (out, err[-3000:])
    saved = checkpointing.saved_step(work, checkpointing.LATEST)
    assert saved is not None and 0 < saved < STEPS_PER_EPOCH, saved
    assert out.strip().splitlines()[-1] == (
        f"SIGINT: saved step {saved} to {checkpointing.checkpoint_dir(work)}; "
        "rerun the same command to resume"
    )
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "Ctrl-C: saving a checkpoint after this step" in err
