"""Devices: multi-process start-up, the data-parallel mesh and its shardings, the compile cache.

Data parallelism is `jax.jit` over a one-axis `Mesh` of every device of every process
(the modern form of `pmap`): the batch is sharded along "data", parameters and optimiser
state are replicated, and BatchNorm's batch statistics are computed over the global
batch by XLA (sync BN) with no axis name.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xmedjax.errors import ConfigError

DATA_AXIS = "data"

# Environment variables that mark a multi-process launch jax.distributed understands
# (Cloud TPU pods are detected by JAX itself; these are the explicit forms).
_LAUNCH_ENV = (
    "JAX_COORDINATOR_ADDRESS",
    "COORDINATOR_ADDRESS",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "XMEDJAX_NUM_PROCESSES",
)


def setup_compilation_cache(directory: str) -> str | None:
    """Turns on JAX's persistent compilation cache at `directory` ('' = leave it off)."""
    if not directory:
        return None
    path = os.path.expanduser(directory)
    if not jax.config.jax_compilation_cache_dir:  # tests set their own
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return jax.config.jax_compilation_cache_dir


def _launched_as_several_processes() -> bool:
    for name in _LAUNCH_ENV:
        value = os.environ.get(name, "")
        if value and not (name.endswith(("NTASKS", "SIZE", "PROCESSES")) and value == "1"):
            return True
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))


def initialize_distributed(
    mode: str = "auto", coordinator_address: str = "", num_processes: int = 0, process_id: int = -1
) -> bool:
    """Calls `jax.distributed.initialize()` for a multi-process launch; True if it did.

    mode "auto": when the environment shows a multi-process launch (coordinator address,
    SLURM/Open MPI sizes, a TPU pod's worker list); "on": always (with the explicit
    address/count/id when given, else JAX's own detection); "off": never.
    Must run before anything touches a device.
    """
    if mode == "off" or (
        mode == "auto" and not coordinator_address and not _launched_as_several_processes()
    ):
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {}
    address = coordinator_address or os.environ.get("XMEDJAX_COORDINATOR_ADDRESS", "")
    if address:
        kwargs["coordinator_address"] = address
    count = num_processes or int(os.environ.get("XMEDJAX_NUM_PROCESSES", "0") or 0)
    if count:
        kwargs["num_processes"] = count
    pid = process_id if process_id >= 0 else int(os.environ.get("XMEDJAX_PROCESS_ID", "-1") or -1)
    if pid >= 0:
        kwargs["process_id"] = pid
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):  # CPU collectives across processes
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True


def make_mesh(devices=None) -> Mesh:
    """A one-axis mesh ("data") over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Same value on every device (parameters, optimiser state, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def is_primary() -> bool:
    """Process 0: the one that writes reports, metrics and heatmaps."""
    return jax.process_index() == 0


def check_batch_size(
    global_batch_size: int, mesh: Mesh, key: str = "config.training.batch_size"
) -> None:
    """The global batch must split evenly over devices and processes."""
    devices = mesh.devices.size
    if global_batch_size % devices or global_batch_size % jax.process_count():
        raise ConfigError(
            f"{key} must be a multiple of the device count ({devices}) and process count "
            f"({jax.process_count()}), got {global_batch_size}"
        )
