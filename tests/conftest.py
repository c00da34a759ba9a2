"""Shared test set-up: a persistent JAX compilation cache and parsed absl flags."""

from __future__ import annotations

import os

# Before xmedjax is imported: the suite's programs are tiny and compile-bound, and the page
# faults xmedjax/host_memory.py saves only pay at full size (it once cost a compile-heavy
# subset 16%, with every thread on one malloc arena; not re-timed since that went).
# tests/test_host_memory.py runs the default in subprocesses.
os.environ.setdefault("XMEDJAX_HOST_MALLOC", "system")

import jax  # noqa: E402
from absl import flags

_CACHE = os.environ.get(
    "XMEDJAX_TEST_JAX_CACHE",
    os.path.join(os.path.expanduser("~"), ".cache", "xmedjax", "jax-tests"),
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Grain worker processes and absl-based code expect parsed flags.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
