"""One process of a (possibly multi-process) CPU launch, for tests/test_multihost.py.

python multihost_worker.py main LOG -- FLAGS...   runs `python -m xmedjax.main FLAGS`,
    logging every file this process opens for writing to LOG
python multihost_worker.py steps OUT DATA_DIR STEPS [ADDRESS NUM_PROCESSES PROCESS_ID]
    float64 SGD train steps of a tiny model on the prepared phantoms, each process
    reading its own shard; writes OUT.p<i>.json (the shard's example digests) and, on
    process 0, OUT.npz (losses and final parameters)
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import runpy
import sys


def run_main(log_path: str, argv: list[str]) -> None:
    real_open = builtins.open
    writes = real_open(log_path, "w")

    def logging_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            writes.write(os.path.abspath(os.fspath(file)) + "\n")
            writes.flush()
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = logging_open  # io.open: zipfile (np.savez) and friends
    sys.argv = ["xmedjax.main", *argv]
    runpy.run_module("xmedjax.main", run_name="__main__", alter_sys=True)


def run_steps(
    out: str,
    data_dir: str,
    steps: int,
    address: str = "",
    num_processes: int = 1,
    process_id: int = 0,
) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    from xmedjax import input_pipeline
    from xmedjax import mesh as mesh_lib
    from xmedjax import train_state as ts
    from xmedjax.models import create_model

    if num_processes > 1:
        mesh_lib.initialize_distributed("on", address, num_processes, process_id)
    import jax.numpy as jnp
    import numpy as np

    model = create_model("resnet50", 2, in_channels=1, width=0.0625, seed=3, dtype=jnp.float64)
    tx = ts.make_optimizer("sgd", 1e-3)
    mdef, state = ts.create_train_state(model, tx)

    def to64(tree):
        return jax.tree.map(
            lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
        )

    state = state.replace(params=to64(state.params), rest=to64(state.rest))
    state = state.replace(opt_state=tx.init(state.params))
    mesh = mesh_lib.make_mesh()
    state = ts.place_state(state, mesh)
    step = ts.jit_train_step(mdef, state, mesh)
    augment = {
        "rotation_range": 20.0,
        "width_shift_range": 0.1,
        "height_shift_range": 0.1,
        "zoom_range": 0.1,
        "horizontal_flip": True,
    }
    batches = input_pipeline.make_train_iterator(
        data_dir,
        "train",
        global_batch_size=8,
        preprocess=input_pipeline.Preprocess(64, 1, "unit"),
        augment=augment,
        seed=0,
    )
    digests, losses = [], []
    for _ in range(steps):
        batch = next(batches)
        digests.append(
            [hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest() for x in batch["image"]]
        )
        glob = input_pipeline.to_global_array(
            {"image": batch["image"].astype(np.float64), "label": batch["label"]}, mesh
        )
        state, metrics = step(state, glob)
        losses.append(float(metrics["loss"]))
    with open(f"{out}.p{jax.process_index()}.json", "w") as f:
        json.dump(
            {"devices": mesh.devices.size, "processes": jax.process_count(), "digests": digests}, f
        )
    leaves = [
        np.asarray(x) for x in jax.tree.leaves((state.params, state.rest))
    ]  # replicated: every process has all
    if jax.process_index() == 0:
        np.savez(
            f"{out}.npz", losses=np.array(losses), **{f"leaf{i}": v for i, v in enumerate(leaves)}
        )


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "main":
        assert rest[1] == "--", "usage: multihost_worker.py main LOG -- FLAGS"
        run_main(rest[0], rest[2:])
    else:
        out, data_dir, steps, *dist = rest
        run_steps(out, data_dir, int(steps), *(dist[:1] + [int(v) for v in dist[1:]]))
