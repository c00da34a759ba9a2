"""python -m xmedjax.main --config=configs/NAME.py --workdir=runs/NAME [--config.KEY=VALUE ...]

Modes (config.mode): train (default: train or resume, then evaluate the best checkpoint on
val and test and explain the test split), evaluate, explain, predict: see xmedjax/modes.py.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from xmedjax import config_checks

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints, logs, metrics, report."
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:  # Orbax/TFDS info lines drown the progress bars
        logging.set_verbosity(logging.WARNING)
    if not _WORKDIR.value:
        sys.exit("error: --workdir is required (e.g. --workdir=runs/demo)")
    try:
        config = config_checks.validate(_CONFIG.value)
    except config_checks.ConfigError as err:
        sys.exit(f"config error: {err}")
    # heavy imports after the config is known good
    from xmedjax import modes, train  # noqa: PLC0415

    try:
        modes.MODES[config.mode](config, _WORKDIR.value)
    except config_checks.ConfigError as err:  # a value that does not fit the data or devices
        sys.exit(f"config error: {err}")
    except (train.NonFiniteError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    except train.Preempted as err:
        print(str(err), flush=True)
        sys.exit(143)


def run() -> None:
    flags.mark_flags_as_required(["config"])
    app.run(main)


if __name__ == "__main__":
    run()
