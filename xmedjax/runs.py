"""Run set-up and restore: what every mode and every tool builds from a config and a work directory.

    setup_runtime(config)              # distributed start-up and compile cache (first, once)
    run = build_run(config, workdir)   # data, mesh, model, a fresh TrainState; writes config.json
    state, step = restore_best(run)    # the best checkpoint, placed as run.state is
    trained = load_trained(workdir)    # read-only: a trained run's best model, on the host

`build_run` is for the modes of `python -m xmedjax.main` (it builds the phantom dataset when
needed and records the config in WORKDIR/config.json). `load_trained` is for tools and
notebooks (`python -m xmedjax.compare`, ...): it reads the saved config, validates it,
restores the best checkpoint, and never creates or writes anything in the work directory.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from xmedjax import checkpointing, cli_errors, config_checks, input_pipeline, logging_utils
from xmedjax import mesh as mesh_lib
from xmedjax import train_state as ts
from xmedjax.config_checks import ConfigError

CONFIG_FILE = "config.json"  # the config the run trained with (train mode writes it)
RESUMES_FILE = "resumes.jsonl"  # one line per resumed train command: time, step, changes


@dataclasses.dataclass
class Run:
    """What every mode builds from a config: data, mesh, model definition and TrainState."""

    config: Any
    workdir: str
    data_dir: str
    info: input_pipeline.DatasetInfo
    mesh: Any
    mdef: ts.ModelDef
    state: ts.TrainState
    primary: bool
    # Settings a resumed train command changed ({"optimizer.learning_rate": (saved, new)}):
    # the keys `RESUMABLE` allows, against WORKDIR/config.json; empty on a fresh start.
    changes: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A trained run's best checkpoint, ready for `xmedjax.explain` functions.

    `state` holds host numpy arrays (params and BatchNorm statistics, `nnx.merge`-able with
    `graphdef`); `step` is the best checkpoint's step.
    """

    workdir: str
    config: ml_collections.ConfigDict
    graphdef: nnx.GraphDef
    state: nnx.State
    label_names: tuple[str, ...]
    data_dir: str
    step: int


# ----------------------------------------------------------------------------- set-up
def setup_runtime(config) -> None:
    """Distributed start-up (before any device use) and the persistent compile cache."""
    mesh_lib.initialize_distributed(
        config.runtime.distributed,
        config.runtime.coordinator_address,
        config.runtime.num_processes,
        config.runtime.process_id,
    )
    mesh_lib.setup_compilation_cache(config.runtime.compilation_cache_dir)


def _workdir(workdir: str) -> str:
    return os.path.abspath(os.path.expanduser(workdir))


def phantom_dir(config, workdir: str) -> str:
    """WORKDIR/data/phantoms_<kind>_<size>px_<counts>_seed<seed>: the built-in dataset's folder."""
    d = config.data
    counts = "_".join(f"{k}{v}" for k, v in sorted(dict(d.phantom_counts).items()))
    return os.path.join(
        workdir, "data", f"phantoms_{d.phantom_kind}_{d.image_size}px_{counts}_seed{d.phantom_seed}"
    )


def dataset_dir(config, workdir: str) -> str:
    """The folder of the config's prepared dataset (or phantoms); builds and checks nothing."""
    if config.data.dataset == "prepared":
        return os.path.expanduser(config.data.data_dir)
    return config.data.data_dir or phantom_dir(config, workdir)


def prepare_data(config, workdir: str) -> str:
    """The prepared dataset's folder; phantoms are built on first use (process 0)."""
    data_dir = dataset_dir(config, workdir)
    if config.data.dataset == "prepared":
        input_pipeline.read_dataset_info(data_dir)  # missing -> names the data_prep.build command
        return data_dir
    info_file = os.path.join(data_dir, input_pipeline.INFO_FILE)
    if not os.path.isfile(info_file) and mesh_lib.is_primary():
        from data_prep.phantoms import build_phantom_dataset  # noqa: PLC0415

        logging_utils.log(f"building {config.data.phantom_kind} phantoms into {data_dir}")
        build_phantom_dataset(
            data_dir,
            kind=config.data.phantom_kind,
            counts=dict(config.data.phantom_counts),
            size=config.data.image_size,
            seed=config.data.phantom_seed,
        )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices("xmedjax_phantoms_built")
    return data_dir


def _check_splits(config, data_dir: str, info: input_pipeline.DatasetInfo) -> None:
    for key in ("train_split", "val_split", "test_split"):
        split = config.data[key]
        if split not in info.splits:
            raise ConfigError(
                f"config.data.{key}={split!r} is not a split of {data_dir} (has {sorted(info.splits)})"
            )
    if info.splits[config.data.train_split] < config.training.batch_size:
        raise ConfigError(
            f"config.training.batch_size={config.training.batch_size} exceeds the "
            f"{info.splits[config.data.train_split]} examples of split {config.data.train_split!r}"
        )


# ----------------------------------------------------------------------------- the model
# Initialisation runs once: compile it fast rather than well (ResNet50 1/8 on 2 CPU cores,
# cold cache: 4 s, against 11 s at the default level and 9 s eagerly).
_INIT_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def _model_factory(config, num_classes: int) -> Callable[[], nnx.Module]:
    from xmedjax.models import create_model  # noqa: PLC0415

    dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}[config.model.dtype]

    def make() -> nnx.Module:
        return create_model(
            config.model.arch,
            num_classes,
            in_channels=config.data.channels,
            dtype=dtype,
            seed=config.training.seed,
            width=config.model.width,
        )

    return make


def build_model(config, num_classes: int) -> nnx.Module:
    """The config's model, initialised by one quickly compiled XLA program (plus init weights)."""
    make = _model_factory(config, num_classes)
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    init = jax.jit(lambda: nnx.split(make())[1])
    try:
        compiled = init.lower().compile(compiler_options=_INIT_COMPILER_OPTIONS)
    except Exception:  # noqa: BLE001 - an unknown option on another backend: default compile
        compiled = init.lower().compile()
    model = nnx.merge(graphdef, compiled())
    if config.init.checkpoint:
        init_weights(model, os.path.expanduser(config.init.checkpoint), head=config.init.head)
    return model


def init_weights(model: nnx.Module, path: str, *, head: str) -> None:
    """`config.init.checkpoint`: converted weights (`python -m xmedjax.convert`), or a trained
    run's work directory, whose best checkpoint initialises the model (transfer from another
    task: same arch, width and channels; head="reinit" gives a fresh classifier when the
    class count differs)."""
    from xmedjax.models import weights_io  # noqa: PLC0415

    if os.path.isdir(os.path.join(path, "checkpoints")):
        trained = load_trained(path)
        source = nnx.merge(trained.graphdef, trained.state)
        weights_io.load_state(model, nnx.state(source), head=head)
    else:
        weights_io.load_weights(model, path, head=head)


def make_optimizer(config) -> Any:
    """The config's optax optimiser (learning rate in its state: `train_state.make_optimizer`)."""
    return ts.make_optimizer(
        config.optimizer.name,
        config.optimizer.learning_rate,
        weight_decay=config.optimizer.weight_decay,
        momentum=config.optimizer.momentum,
    )


def _abstract_train_state(config, num_classes: int) -> tuple[ts.ModelDef, ts.TrainState]:
    """ModelDef and the TrainState's shapes on one device: a restore target, nothing computed."""
    make, tx = _model_factory(config, num_classes), make_optimizer(config)
    mdef, abstract = jax.eval_shape(lambda: ts.create_train_state(make(), tx))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract
    )
    return mdef, abstract


# ----------------------------------------------------------------------------- saved runs
# The config keys that make a checkpoint's model: a saved run must be restored with the same.
# (data.normalization: the model's input contract; another one gives silently wrong outputs.)
MODEL_KEYS = (
    "model.arch",
    "model.width",
    "model.dtype",
    "data.channels",
    "data.image_size",
    "data.normalization",
)
# The keys a resumed train command may change (prefixes end in "."), each applied from the
# resume step: the step limits (grow: the run goes on; shrink: it ends sooner, or at once),
# the learning rate (the current rate becomes the new value, plateau reductions so far
# dropped), the plateau/early-stopping knobs (from the next epoch end), how often to
# checkpoint and log, and what only evaluation, explanation, prediction or the runtime use.
# Any other change (the data, its split and order, augmentation, batch size, seed, optimiser,
# best metric, class weighting, initial weights) would make the resumed run neither the
# saved one nor a fresh one: refused, one line (see `check_resume`).
RESUMABLE = (
    "mode",
    "optimizer.learning_rate",
    "training.max_epochs",
    "training.max_steps",
    "training.early_stopping_patience",
    "training.early_stopping_min_delta",
    "training.reduce_on_plateau_patience",
    "training.reduce_on_plateau_factor",
    "training.min_learning_rate",
    "training.checkpoint_every_steps",
    "training.log_every_steps",
    "training.eval_batch_size",
    "data.worker_count",
    "data.test_split",
    "evaluate.",
    "explain.",
    "predict.",
    "runtime.",
)


def require_best_checkpoint(workdir: str) -> int:
    """The step of WORKDIR's best checkpoint; creates nothing.

    Raises FileNotFoundError, one line naming the work directory, when there is none (a
    mistyped --workdir, or a run that never reached its first checkpoint).
    """
    workdir = _workdir(workdir)
    step = checkpointing.saved_step(workdir, checkpointing.BEST)
    if step is None:
        raise FileNotFoundError(
            f"{workdir} has no best checkpoint (nothing under "
            f"{checkpointing.checkpoint_dir(workdir, checkpointing.BEST)}); train it first "
            "(config.mode=train) or check --workdir"
        )
    return step


def _lookup(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _saved_num_classes(workdir: str) -> int | None:
    """The classifier size of the run's checkpoint (best, else latest), from Orbax metadata."""
    from xmedjax.models.convert import HEAD_KEYS  # noqa: PLC0415

    tree = checkpointing.saved_state_metadata(workdir, checkpointing.BEST)
    if tree is None:
        tree = checkpointing.saved_state_metadata(workdir, checkpointing.LATEST)
    params = (tree or {}).get("params", {})
    for head in HEAD_KEYS:
        if head in params:
            return int(params[head]["bias"]["value"].shape[0])
    return None


def _requested_num_classes(config: Any, workdir: str) -> int | None:
    """The class count of the config's dataset when it exists already (nothing is built)."""
    data_dir = dataset_dir(config, workdir)
    if not os.path.isfile(os.path.join(data_dir, input_pipeline.INFO_FILE)):
        return None
    return input_pipeline.read_dataset_info(data_dir).num_classes


def saved_model_differences(config: Any, workdir: str) -> dict[str, tuple[Any, Any]]:
    """{key: (saved, requested)} of the model keys where WORKDIR's checkpoints differ from config.

    Compares MODEL_KEYS with WORKDIR/config.json (the config the checkpoints were made with)
    and the checkpoint's classifier size with the config's dataset ("num_classes"). Empty
    when the work directory holds no checkpoint. Reads metadata only; writes nothing.
    """
    workdir = _workdir(workdir)
    has_checkpoint = any(
        checkpointing.saved_step(workdir, w) is not None
        for w in (checkpointing.BEST, checkpointing.LATEST)
    )
    if not has_checkpoint:
        return {}
    saved = _read_config_json(workdir) or {}
    out = {}
    for key in MODEL_KEYS:
        try:
            old, new = _lookup(saved, key), _lookup(config, key)
        except KeyError:  # no config.json, or a key it lacks
            continue
        if old != new:
            out[f"config.{key}"] = (old, new)
    saved_classes = _saved_num_classes(workdir)
    asked_classes = _requested_num_classes(config, workdir)
    if None not in (saved_classes, asked_classes) and saved_classes != asked_classes:
        out["num_classes (of the dataset)"] = (saved_classes, asked_classes)
    return out


def check_same_model(config: Any, workdir: str) -> None:
    """Before restoring: raises ConfigError, one line naming each model key that differs from
    the checkpoints in `workdir` with its saved value (instead of Orbax's shape errors)."""
    diffs = saved_model_differences(config, workdir)
    if diffs:
        keys = ", ".join(f"{k}={old!r} (this config: {new!r})" for k, (old, new) in diffs.items())
        raise ConfigError(
            f"{_workdir(workdir)} holds checkpoints of another model: saved {keys}; use the "
            "saved values, or another --workdir for a new run"
        )


def _read_config_json(workdir: str) -> dict | None:
    """WORKDIR/config.json as saved (None without one); ConfigError when it is not JSON."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as err:
            raise ConfigError(
                f"{path} is not valid JSON ({err}); restore it from a copy, or delete it "
                "(the next train command writes it again, unchecked)"
            ) from None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf keys of a JSON-like config: {"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_differences(config: Any, workdir: str) -> dict[str, tuple[Any, Any]]:
    """{key: (saved, this config)} for every setting where `config` differs from the config
    WORKDIR's run trained with (WORKDIR/config.json), when WORKDIR holds a `latest`
    checkpoint that a train command would resume; else {}. Read-only.

    A key the saved config lacks because it predates the key in the schema is skipped; any
    other key present on one side only differs (None on the other side).
    """
    workdir = _workdir(workdir)
    if checkpointing.saved_step(workdir, checkpointing.LATEST) is None:
        return {}
    saved = _read_config_json(workdir)
    if saved is None:
        return {}
    old, new = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
    schema = _flat(config_checks.default_config().to_dict())
    keys = sorted((old.keys() | new.keys()) - (schema.keys() - old.keys()))
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def resumable(key: str) -> bool:
    """Whether a resumed train command may change `key` (dotted, without "config.")."""
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)


def check_resume(config: Any, workdir: str) -> dict[str, tuple[Any, Any]]:
    """The settings a train command resuming WORKDIR changes ({key: (saved, new)}, all
    `RESUMABLE`); ConfigError, one line naming each other changed key with its saved value.
    """
    diffs = resume_differences(config, workdir)
    refused = {k: v for k, v in diffs.items() if not resumable(k)}
    if refused:
        keys = ", ".join(
            f"config.{k}={old!r} (this config: {new!r})" for k, (old, new) in refused.items()
        )
        raise ConfigError(
            f"{_workdir(workdir)} was trained with other settings, which a resumed run cannot "
            f"change: saved {keys}; rerun with the saved values, or use another --workdir "
            "for a new run"
        )
    return diffs


def record_resume(run: Run, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Appends one line to WORKDIR/resumes.jsonl (process 0): time, step, {key: [old, new]}."""
    if not run.primary:
        return
    path = os.path.join(run.workdir, RESUMES_FILE)
    record = {
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "step": step,
        "changes": {k: [old, new] for k, (old, new) in changes.items()},
    }
    with cli_errors.writing(path), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _write_config_json(run: Run) -> None:
    """WORKDIR/config.json, atomically (other processes may be reading it in their checks)."""
    if jax.process_count() > 1:  # every process has read the old one before it is replaced
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices("xmedjax_config_checked")
    if not run.primary:
        return
    path = os.path.join(run.workdir, CONFIG_FILE)
    with cli_errors.writing(path + ".tmp"), open(path + ".tmp", "w") as f:
        f.write(run.config.to_json_best_effort(indent=2))
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- runs
def build_run(config, workdir: str, *, training: bool = True) -> Run:
    """Data, mesh, model and a fresh (replicated) TrainState; nothing restored yet.

    Creates the work directory and builds the phantom dataset on first use. A work directory
    whose checkpoints are of another model (`MODEL_KEYS`, class count) raises ConfigError
    first, before anything is written. With `training` (train mode), a run to be resumed is
    checked too (`check_resume`: the changed keys land in `Run.changes`) and
    WORKDIR/config.json records this config (process 0); the other modes leave it as it is.
    """
    workdir = _workdir(workdir)
    check_same_model(config, workdir)  # before anything is built, written or restored
    changes = check_resume(config, workdir) if training else {}
    os.makedirs(workdir, exist_ok=True)
    data_dir = prepare_data(config, workdir)
    info = input_pipeline.read_dataset_info(data_dir)
    _check_splits(config, data_dir, info)
    input_pipeline.check_trainable(data_dir, config.data.train_split)
    mesh = mesh_lib.make_mesh()
    mesh_lib.check_batch_size(config.training.batch_size, mesh)
    model = build_model(config, info.num_classes)
    mdef, state = ts.create_train_state(model, make_optimizer(config))
    state = ts.place_state(state, mesh)
    primary = mesh_lib.is_primary()
    run = Run(config, workdir, data_dir, info, mesh, mdef, state, primary, changes)
    if training:
        _write_config_json(run)
    return run


def eval_data_kwargs(run: Run) -> dict[str, Any]:
    """The keyword arguments `evaluate.predict_split` needs to read the run's dataset."""
    return {
        "data_dir": run.data_dir,
        "preprocess": input_pipeline.Preprocess.from_config(run.config),
    }


def restore_best(run: Run) -> tuple[ts.TrainState, int]:
    """(state, step) of the run's best checkpoint, with run.state's structure and placement."""
    with checkpointing.RunCheckpoints(run.workdir) as ckpt:
        state, _, step = ckpt.restore_state(run.state, checkpointing.BEST)
    return state, step


def host_model_state(state: ts.TrainState) -> nnx.State:
    """The model's state as host numpy arrays (for single-device functions such as Grad-CAM)."""
    return jax.device_get(ts.model_state(state))


# ----------------------------------------------------------------------------- trained runs
def read_saved_config(workdir: str) -> ml_collections.ConfigDict:
    """WORKDIR/config.json, validated; FileNotFoundError or ConfigError naming the workdir."""
    workdir = _workdir(workdir)
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{workdir} is not a training run (no {CONFIG_FILE}); "
            "train first: python -m xmedjax.main --config=... --workdir=" + workdir
        )
    with open(path) as f:
        saved = json.load(f)
    config = ml_collections.ConfigDict(_with_later_defaults(saved))
    return _validated(config, path)


def _with_later_defaults(saved: dict, schema: dict | None = None) -> dict:
    """A saved config with the keys the schema gained since it was written (e.g. new
    augmentation options, all off by default) set to their defaults, so a run trained by an
    earlier xmedjax stays readable; saved values and unknown keys are kept as they are."""
    schema = config_checks.default_config().to_dict() if schema is None else schema
    out = dict(saved)
    for key, value in schema.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_later_defaults(out[key], value)
    return out


def _validated(config, source: str) -> ml_collections.ConfigDict:
    try:
        return config_checks.validate(config)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_trained(workdir: str, config: Any = None) -> TrainedModel:
    """A trained run's best checkpoint on the host, for tools that do not train.

    `config` (optional) replaces WORKDIR/config.json; either is validated. Reads the dataset's
    `xmedjax_dataset.json` (class names and count) but builds no data, and creates or writes
    nothing under `workdir`. A missing config.json, dataset or best checkpoint raises
    FileNotFoundError, a bad config (or a `config` of another model than the checkpoint's)
    ConfigError, each one line naming the work directory.
    """
    workdir = _workdir(workdir)
    if config is None:
        config = read_saved_config(workdir)
    else:
        config = _validated(config, f"config for {workdir}")
        check_same_model(config, workdir)
    require_best_checkpoint(workdir)
    data_dir = dataset_dir(config, workdir)
    info = input_pipeline.read_dataset_info(data_dir)
    mdef, abstract = _abstract_train_state(config, info.num_classes)
    state, _, step = checkpointing.restore_saved(workdir, abstract, checkpointing.BEST)
    return TrainedModel(
        workdir=workdir,
        config=config,
        graphdef=mdef.graphdef,
        state=host_model_state(state),
        label_names=tuple(info.label_names),
        data_dir=data_dir,
        step=step,
    )


__all__ = [
    "CONFIG_FILE",
    "MODEL_KEYS",
    "RESUMABLE",
    "RESUMES_FILE",
    "Run",
    "TrainedModel",
    "build_model",
    "build_run",
    "check_resume",
    "check_same_model",
    "dataset_dir",
    "eval_data_kwargs",
    "host_model_state",
    "load_trained",
    "make_optimizer",
    "phantom_dir",
    "prepare_data",
    "read_saved_config",
    "record_resume",
    "require_best_checkpoint",
    "restore_best",
    "resumable",
    "resume_differences",
    "saved_model_differences",
    "setup_runtime",
]
