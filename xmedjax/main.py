"""python -m xmedjax.main --config=configs/NAME.py --workdir=runs/NAME [--config.KEY=VALUE ...]

Modes (config.mode): train (default: train or resume, then evaluate the best checkpoint on
val and test and explain the test split), evaluate, explain, predict: see xmedjax/modes.py.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from xmedjax import cli_errors, config_checks

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints, logs, metrics, report."
)


@cli_errors.one_line_errors()
def main(argv: list[str]) -> None:
    """One mode of one run; every failure ends in one line (the traceback: --verbosity=1)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:  # Orbax/TFDS info lines drown the progress bars
        logging.set_verbosity(logging.WARNING)
    if not _WORKDIR.value:
        sys.exit("error: --workdir is required (e.g. --workdir=runs/demo)")
    config = config_checks.validate(_CONFIG.value)  # ConfigError: "config error: ..."
    # heavy imports after the config is known good
    from xmedjax import modes, train  # noqa: PLC0415

    try:
        modes.MODES[config.mode](config, _WORKDIR.value)
    except train.Preempted as err:  # SIGTERM or Ctrl-C: the step was saved
        print(str(err), flush=True)
        sys.exit(128 + err.signum)


def run() -> None:
    flags.mark_flags_as_required(["config"])
    app.run(main)


if __name__ == "__main__":
    run()
