"""The train state and the pure, jitted, data-parallel train and eval steps.

The model lives as `nnx.split(model, nnx.Param, ...)`: a static `graphdef` plus two
pytrees, `params` and `rest` (BatchNorm statistics). A step is a pure function
`(state, batch) -> (state, metrics)` under plain `jax.jit` with `NamedSharding`s: the batch
sharded over the mesh's "data" axis, everything else replicated. BatchNorm in train mode
therefore normalises over the global batch (XLA inserts the all-reduce).

The gradient is taken with respect to `(params, rest)` and the second half dropped: merging
`rest` captured from the outer trace inside `value_and_grad` fails with "Cannot mutate
BatchStat from a different trace level" in flax 0.12.

Each train step checks that the loss and the gradients' sum of squares are finite (so every
gradient is, and none would make Adam's second moment infinite); a bad step returns the
state unchanged with `finite=False`, and the loop stops (the last good checkpoint stays).
The optimiser's update and that guard are one function, `guarded_update.guarded_step`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from xmedjax import compile_options, first_call, guarded_update, heap_warming, optimizer_layout
from xmedjax import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
    """Everything a step changes; a pytree that Orbax saves as is."""

    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Any  # nnx.State of nnx.Param
    rest: Any  # nnx.State of BatchNorm statistics
    opt_state: Any  # optax state (learning rate inside, see make_optimizer)


@flax.struct.dataclass
class ModelDef:
    """The static half: graphdefs for train and eval mode, and the optimiser."""

    graphdef: Any = flax.struct.field(pytree_node=False)
    eval_graphdef: Any = flax.struct.field(pytree_node=False)
    tx: Any = flax.struct.field(pytree_node=False)


def make_optimizer(
    name: str, learning_rate: float, *, weight_decay: float = 0.0, momentum: float = 0.9
):
    """An optax optimiser whose learning rate sits in its state (`set_learning_rate`).

    `optax.inject_hyperparams` keeps the rate in `opt_state.hyperparams`, so reduce-on-plateau
    changes it without recompiling and checkpoints carry it. `optax.flatten` keeps each
    moment as one vector over all parameters (xmedjax/optimizer_layout.py: fewer, larger
    fused loops; checkpoints still hold one array per parameter). Adam and AdamW come marked
    `guarded_update.FlatAdam`: the train step writes their update out.
    """
    if name == "adam":
        inner = optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)
    elif name == "adamw":
        inner = optax.inject_hyperparams(optax.adamw)(
            learning_rate=learning_rate, weight_decay=weight_decay
        )
    elif name == "sgd":
        inner = optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate, momentum=momentum)
    else:
        raise ValueError(f"config.optimizer.name must be adam, adamw or sgd, got {name!r}")
    flat = optax.flatten(inner)
    return flat if name == "sgd" else guarded_update.FlatAdam(*flat)


def learning_rate(state: TrainState) -> float:
    return float(np.asarray(state.opt_state.hyperparams["learning_rate"]))


def set_learning_rate(state: TrainState, value: float) -> TrainState:
    """Returns `state` with a new learning rate (same dtype and sharding)."""
    old = state.opt_state.hyperparams["learning_rate"]
    new = jax.device_put(jnp.asarray(value, dtype=old.dtype), old.sharding)
    hyper = dict(state.opt_state.hyperparams)
    hyper["learning_rate"] = new
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))


def create_train_state(model: nnx.Module, tx) -> tuple[ModelDef, TrainState]:
    """Splits a (train-mode) model into its static definition and a fresh TrainState."""
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    eval_graphdef, _, _ = nnx.split(model, nnx.Param, ...)
    model.train()
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params)
    )
    return ModelDef(graphdef, eval_graphdef, tx), state


def model_state(state: TrainState) -> nnx.State:
    """params and BatchNorm statistics as one nnx.State (for nnx.merge, Grad-CAM, export)."""
    return nnx.merge_state(state.params, state.rest)


def class_weights_from_counts(counts, mode: str) -> np.ndarray | None:
    """'balanced': n / (K * n_k), as Keras' class_weight='balanced'; 'none': None."""
    if mode == "none":
        return None
    counts = np.asarray(counts, np.float64)
    if np.any(counts == 0):
        raise ValueError(
            f"config.training.class_weighting=balanced needs every class in train, got counts {counts.tolist()}"
        )
    return (counts.sum() / (len(counts) * counts)).astype(np.float32)


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    weights: jax.Array | None = None,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Mean softmax cross-entropy; per-class `weights` scale each example (Keras semantics)."""
    per_example = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels
    )
    if weights is not None:
        per_example = per_example * jnp.asarray(weights)[labels]
    if valid is None:
        return jnp.mean(per_example)
    valid = valid.astype(jnp.float32)
    return jnp.sum(per_example * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def train_step(
    mdef: ModelDef,
    class_weights,
    state: TrainState,
    batch: dict,
    offsets: tuple[jax.Array, ...] | None = None,
) -> tuple[TrainState, dict]:
    """One optimiser step on a (global) batch {'image', 'label'}; pure. `offsets`: each
    parameter's start in the optimiser's flat vectors, as int32 scalars given at run time
    (`jit_train_step`; see `guarded_update`), or None."""

    def loss_fn(params, rest):
        model = nnx.merge(mdef.graphdef, params, rest)
        logits = model(batch["image"])
        loss = cross_entropy(logits, batch["label"], class_weights)
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return loss, (logits, new_rest)

    (loss, (logits, new_rest)), (grads, _) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True
    )(state.params, state.rest)
    # A non-finite step changes nothing: the caller stops on finite=False.
    new_params, new_opt, finite, grad_norm = guarded_update.guarded_step(
        mdef.tx, state.params, state.opt_state, grads, loss, offsets
    )
    step, rest = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        (state.step + 1, new_rest),
        (state.step, state.rest),
    )
    new_state = TrainState(step=step, params=new_params, rest=rest, opt_state=new_opt)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
    return new_state, {
        "loss": loss,
        "accuracy": accuracy,
        "finite": finite,
        "grad_norm": grad_norm,
    }


def eval_step(mdef: ModelDef, state: TrainState, batch: dict) -> dict:
    """Eval-mode forward (running BatchNorm statistics) -> float32 logits; pure."""
    model = nnx.merge(mdef.eval_graphdef, state.params, state.rest)
    return {
        "logits": model(batch["image"]).astype(jnp.float32),
        "label": batch["label"],
        "valid": batch["valid"],
        "index": batch["index"],
    }


def state_sharding(state: TrainState, mesh) -> Any:
    """Replicated sharding for every leaf of the state."""
    rep = mesh_lib.replicated(mesh)
    return jax.tree.map(lambda _: rep, state)


def place_state(state: TrainState, mesh) -> TrainState:
    """Puts (or re-puts) every leaf replicated over the mesh."""
    return jax.device_put(state, state_sharding(state, mesh))


def jit_train_step(mdef: ModelDef, state: TrainState, mesh, class_weights=None) -> Callable:
    """`(state, batch) -> (state, metrics)` jitted over the mesh; the state is donated. Its
    first call traces with the garbage collector paused (`first_call`) and, on one CPU
    device with huge pages, warms the heap while compiling (`heap_warming`).

    The parameters' offsets into the optimiser's flat vectors go in as run-time arguments
    (`guarded_update`: one update kernel per parameter shape, not per parameter), bound
    here: the step, and what its `trace`, `lower` and `compile` return, are called with
    `(state, batch)` as before; `step.offsets` holds them (None with
    `guarded_update.RUNTIME_OFFSETS` off)."""
    weights = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)
    rep = mesh_lib.replicated(mesh)
    data = mesh_lib.batch_sharded(mesh)
    s_shard = state_sharding(state, mesh)
    offsets = None  # off: the offsets are constants of the program
    if guarded_update.RUNTIME_OFFSETS:
        starts = optimizer_layout.parameter_offsets(state.params)
        offsets = tuple(jax.device_put(np.int32(start), rep) for start in starts)
    jitted = jax.jit(
        functools.partial(train_step, mdef, weights),
        in_shardings=(s_shard, data, None if offsets is None else (rep,) * len(offsets)),
        out_shardings=(s_shard, rep),
        donate_argnums=0,
    )
    warm = heap_warming.applies(mesh.devices.flat[0].platform, mesh.devices.size)
    return _WithOffsets(first_call.wrap(jitted, warm_heap=warm), offsets)


def jit_eval_step(mdef: ModelDef, state: TrainState, mesh) -> Callable:
    """`(state, batch) -> outputs` jitted over the mesh; outputs replicated on every process."""
    rep = mesh_lib.replicated(mesh)
    data = mesh_lib.batch_sharded(mesh)
    jitted = jax.jit(
        functools.partial(eval_step, mdef),
        in_shardings=(state_sharding(state, mesh), data),
        out_shardings=rep,
        # On a CPU, XLA's own convolutions (xmedjax/compile_options.py).
        compiler_options=compile_options.forward_options(mesh.devices.flat[0].platform),
    )
    return first_call.wrap(jitted)  # traced with the garbage collector paused


class _WithOffsets:
    """A jitted `(state, batch, offsets)` step, or a stage of it (traced, lowered,
    compiled), called as `(state, batch)` (`jit_train_step`)."""

    def __init__(self, fn: Any, offsets: tuple[jax.Array, ...] | None):
        functools.update_wrapper(self, fn, updated=())  # name and docstring, not attributes
        self._fn, self.offsets = fn, offsets

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self._fn(state, batch, self.offsets)

    def trace(self, state: TrainState, batch: dict) -> _WithOffsets:
        return _WithOffsets(self._fn.trace(state, batch, self.offsets), self.offsets)

    def lower(self, *args: Any, **kwargs: Any) -> _WithOffsets:
        """The jitted step's `lower(state, batch)`, or a traced one's `lower()`."""
        if args:
            args = (*args, self.offsets)
        return _WithOffsets(self._fn.lower(*args, **kwargs), self.offsets)

    def compile(self, *args: Any, **kwargs: Any) -> _WithOffsets:
        return _WithOffsets(self._fn.compile(*args, **kwargs), self.offsets)

    def __getattr__(self, name: str) -> Any:  # as_text, cost_analysis, eval_shape, ...
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._fn, name)
