"""xmedjax/heap_warming.py: a first call's buffers are faulted in while XLA compiles.

The warming itself runs in fresh interpreters with xmedjax's default heap (the test session
runs with XMEDJAX_HOST_MALLOC=system, conftest.py), with 4 KiB pages so faults count pages.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmedjax import first_call, heap_warming

N = 1000  # float32 elements: 4,000 bytes a value


def test_live_bytes_counts_the_peak_of_intermediates_alive_together():
    # (x*2) and (x*2)+1 are alive together at the add; the sum is 4 bytes; x is an input.
    jaxpr = jax.make_jaxpr(lambda x: jnp.sum(x * 2 + 1))(jnp.ones(N))
    assert heap_warming.live_bytes(jaxpr) == 2 * 4 * N
    # a kept intermediate stays alive until its last use: a, b and a + b at the end
    jaxpr = jax.make_jaxpr(lambda x: (a := jnp.sin(x)) + jnp.cos(x) + a)(jnp.ones(N))
    assert heap_warming.live_bytes(jaxpr) == 3 * 4 * N


def test_live_bytes_adds_an_inner_programs_peak_to_what_is_alive_around_it():
    inner = jax.jit(lambda x: jnp.sum(x * 2 + 1))  # peak 2 values inside
    # while the inner call runs: sin(x) (kept for the product), its peak and its 4-byte sum
    jaxpr = jax.make_jaxpr(lambda x: jnp.sin(x) * inner(x))(jnp.ones(N))
    assert heap_warming.live_bytes(jaxpr) == 3 * 4 * N + 4


def test_applies_to_one_cpu_device_whose_heap_has_huge_pages(monkeypatch):
    monkeypatch.setattr(heap_warming, "_huge_pages", lambda: True)
    assert heap_warming.applies("cpu", 1)
    assert not heap_warming.applies("gpu", 1)
    assert not heap_warming.applies("cpu", 8)  # worker threads' arenas, not the main heap
    monkeypatch.setattr(heap_warming, "_huge_pages", lambda: False)  # 4 KiB pages
    assert not heap_warming.applies("cpu", 1)


def test_first_call_goes_on_where_the_heap_is_not_kept():
    # The test session's heap is glibc's default (conftest.py): nothing to warm.
    jitted = jax.jit(lambda x: jnp.cos(x) * 2)
    wrapped = first_call.wrap(jitted, warm_heap=True)
    x = jnp.arange(5.0)
    np.testing.assert_array_equal(wrapped(x), jitted(x))
    assert heap_warming.LAST.startswith("off (host_memory: off"), heap_warming.LAST


# Two 64 MiB intermediates XLA:CPU keeps in its temporary buffer (as test_host_memory's).
FIRST_EXECUTION = """
import resource, sys
import xmedjax
from xmedjax import first_call, heap_warming
import jax, jax.numpy as jnp
x = jnp.full((4096, 4096), 0.5, jnp.float32)
x.block_until_ready()
program = jax.jit(lambda x: jnp.sum(jnp.sin(x) * jnp.cos(x).T))
if sys.argv[1] == "warm":  # malloc's next 256 MiB faulted in, as while a long compile runs
    done, why = heap_warming.fault_in(*heap_warming.next_block(256 << 20))
    print(f"warmed {done} {why}".strip())
program.trace(x).lower().compile()
if sys.argv[1] == "cold":
    print("compiled")
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
program(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""
PAGES = 2 * 4096 * 4096 * 4 // 4096  # both intermediates, in 4 KiB pages

WRAPPED = """
import xmedjax
from xmedjax import first_call, heap_warming, host_memory
import jax, jax.numpy as jnp
from jax._src import monitoring
compiles = []
monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **_: compiles.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None)
x = jnp.full((2048, 2048), 0.5, jnp.float32)
y = x + 1
expected = float(jax.jit(lambda x: jnp.sum(jnp.tanh(x) * x.T))(x))
before = len(compiles)
jitted = jax.jit(lambda x: jnp.sum(jnp.tanh(x) * x.T))
wrapped = first_call.wrap(jitted, warm_heap=heap_warming.applies("cpu", 1))
print(float(wrapped(x)) == expected, float(wrapped(y)) != expected)
print(heap_warming.LAST)
print(len(compiles) - before, host_memory.HUGE_PAGES)
"""

needs_glibc_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="the kept heap and madvise are glibc's and Linux's",
)


def _run(code: str, setting: str, *argv: str) -> list[str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XMEDJAX_HOST_MALLOC=setting)
    env.pop("XMEDJAX_TEST_JAX_CACHE", None)
    out = subprocess.run(
        [sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip().split("\n")


@needs_glibc_linux
def test_fault_in_says_why_it_stopped():
    # the first page of the address space is never mapped: ENOMEM (EINVAL before Linux 5.14)
    done, why = heap_warming.fault_in(0, 4096)
    assert done == 0 and why in ("madvise errno 12", "madvise errno 22"), why


@needs_glibc_linux
def test_first_execution_finds_its_buffers_faulted_in():
    # 4 KiB pages, so that page faults count pages
    did, faults = _run(FIRST_EXECUTION, "no-huge-pages", "warm")
    if "madvise errno 22" in did:  # a kernel before 5.14: no MADV_POPULATE_WRITE
        pytest.skip(did)
    # all of it but the first, shared page (malloc's block starts inside it)
    assert did.startswith("warmed ") and int(did.split()[1]) >= (256 << 20) - 4096, did
    cold_did, cold_faults = _run(FIRST_EXECUTION, "no-huge-pages", "cold")
    assert cold_did == "compiled"
    # Cold, the first execution faults both intermediates in (~32,768 pages); warmed, it
    # finds them faulted in: its buffer was carved from malloc's next block.
    assert int(cold_faults) > 0.8 * PAGES, cold_faults
    assert int(faults) < 0.2 * PAGES, (faults, cold_faults)


@needs_glibc_linux
def test_first_call_warms_where_huge_pages_are_on_and_compiles_once():
    values, did, compiles = _run(WRAPPED, "huge-pages")
    # the plain jit's value on the first call, and later calls are the jitted function's
    assert values == "True True", values
    if heap_warming.host_memory._thp_mode() in ("madvise", "always"):
        assert did.startswith("warmed "), did
    else:  # the kernel gives no huge pages: nothing to warm
        assert did == "not called", did
    # one compile, not two: the warmed compile is the one the jitted function uses
    assert compiles.split()[0] == "1", compiles


@needs_glibc_linux
def test_small_pages_are_not_warmed():
    values, did, compiles = _run(WRAPPED, "")
    assert values == "True True", values
    if heap_warming.host_memory._thp_mode() != "always":
        assert did == "not called", did
    assert compiles.split()[0] == "1", compiles
