"""xmedjax/host_memory.py: freed host memory stays mapped, so XLA:CPU's buffers are reused.

Each case runs in a fresh interpreter: the allocator options act only before JAX's threads
start, and the test session itself runs with XMEDJAX_HOST_MALLOC=system (conftest.py).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from xmedjax import host_memory

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt options are glibc's",
)

# A program whose temporary buffer (two 64 MiB intermediates) XLA:CPU allocates and frees
# on every call; the median page faults of nine calls after six warm-up calls (the median:
# the heap still grows now and then while it settles, by up to 256 MiB in one call).
FAULTS = """
import resource, statistics
import xmedjax.host_memory as host_memory
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.sin(x) * jnp.cos(x).T))
x = jnp.full((4096, 4096), 0.5, jnp.float32)
for _ in range(6):
    f(x).block_until_ready()
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(host_memory.STATUS)
print(statistics.median(faults))
"""
PAGES_PER_CALL = 2 * 4096 * 4096 * 4 // 4096  # both intermediates, in 4 KiB pages


def _run(code: str, setting: str | None) -> list[str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XMEDJAX_HOST_MALLOC", None)
    if setting is not None:
        env["XMEDJAX_HOST_MALLOC"] = setting
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.split("\n")


def test_import_keeps_freed_memory_and_steps_stop_faulting():
    status, faults, _ = _run(FAULTS, None)
    assert status == "kept"
    # Glibc's defaults fault every page of the buffer in again on each call (32,768 here).
    assert float(faults) < 0.02 * PAGES_PER_CALL, faults


def test_system_setting_leaves_glibc_alone():
    code = "from xmedjax import host_memory\nprint(host_memory.STATUS)\n"
    assert _run(code, "system")[0] == "off (XMEDJAX_HOST_MALLOC=system)"


# Where XLA:CPU runs a single-device program: on the calling thread (whose heap keeps the
# buffers) unless the setting is `system`; the faults test above fails on worker threads.
DISPATCH = """
import xmedjax.host_memory as host_memory
import jax
jax.numpy.zeros(1).block_until_ready()
print(host_memory.DISPATCH)
print(jax.config.values["jax_cpu_enable_async_dispatch"])
"""


def test_import_runs_cpu_programs_on_the_calling_thread():
    assert _run(DISPATCH, None)[:2] == ["calling thread", "False"]
    assert _run(DISPATCH, "system")[:2] == ["not applied", "True"]


def test_late_call_says_so():
    code = (
        "import jax; jax.numpy.zeros(1).block_until_ready()\n"
        "from xmedjax import host_memory\n"
        "print(host_memory.STATUS)\n"
    )
    assert _run(code, None)[0].startswith("late: the JAX backend had started")


# The same program, then the heap's huge pages (its [heap] mapping in /proc/self/smaps).
HUGE = """
import xmedjax.host_memory as host_memory
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.sin(x) * jnp.cos(x).T))
x = jnp.full((4096, 4096), 0.5, jnp.float32)
for _ in range(3):
    f(x).block_until_ready()
huge_kib, in_heap = 0, False
for line in open("/proc/self/smaps"):
    if "-" in line.split()[0] and len(line.split()) >= 5:
        in_heap = line.rstrip().endswith("[heap]")
    elif in_heap and line.startswith("AnonHugePages:"):
        huge_kib += int(line.split()[1])
print(host_memory.HUGE_PAGES)
print(huge_kib)
"""


def test_huge_pages_setting_advises_the_heap():
    status, huge_kib, _ = _run(HUGE, "huge-pages")
    mode = host_memory._thp_mode()
    if mode != "madvise":  # nothing to advise: the status names the kernel's mode
        assert status in (f"kernel: {mode}", f"off (kernel: {mode})"), status
        return
    assert status.startswith("advised "), status
    # Both 64 MiB intermediates (and the input) sit in the advised heap; a fragmented host
    # may not find a free 2 MiB page for every fault, so ask for a few only (0 without).
    assert int(huge_kib) >= 8 * 1024, huge_kib


@pytest.mark.parametrize("setting", [None, "no-huge-pages"])
def test_default_keeps_small_pages(setting):
    """Huge pages cost each process's first train call 1.5-2.6 s and bought no steady speed
    on a 2-core VM (benchmarks/NOTES.md, "Phase 9" and "Phase 10"), so they are asked for."""
    status, huge_kib, _ = _run(HUGE, setting)
    assert status == "off (not asked: XMEDJAX_HOST_MALLOC=huge-pages asks)", status
    if host_memory._thp_mode() == "madvise":
        assert int(huge_kib) == 0, huge_kib


def test_unknown_setting_warns_and_keeps_the_default():
    code = "import warnings; warnings.simplefilter('error')\nimport xmedjax\n"
    env = dict(os.environ, XMEDJAX_HOST_MALLOC="huge")
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "XMEDJAX_HOST_MALLOC='huge' is not one of huge-pages, system" in done.stderr


def test_system_setting_skips_huge_pages_too():
    status, _, _ = _run(HUGE, "system")
    assert status == "off (the heap options: off (XMEDJAX_HOST_MALLOC=system))"
