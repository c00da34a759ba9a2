"""python -m xmedjax.main --config=configs/NAME.py --workdir=runs/NAME [--config.KEY=VALUE ...]

Modes (config.mode): train (default: train or resume, then evaluate the best checkpoint on
val and test and explain the test split), evaluate, explain, predict: see xmedjax/modes.py.
Every failure ends in one line (the traceback: --verbosity=1): a bad command line
(`cli_flags`: a missing config file, one without get_config, an unknown --config.KEY), a
bad config value, a work directory another command holds. SIGTERM and Ctrl-C during
training save the step and exit with 143 and 130.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from xmedjax import cli_errors, cli_flags, config_checks

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
        with modes.timed_command(config.mode, _WORKDIR.value, argv=sys.argv):
            modes.MODES[config.mode](config, _WORKDIR.value)
    except train.Preempted as err:  # SIGTERM or Ctrl-C: the step was saved
        print(str(err), flush=True)
        sys.exit(128 + err.signum)


def run() -> None:
    cli_flags.checked(sys.argv)  # the config file and override keys, each failure one line
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=cli_flags.parse_flags)


if __name__ == "__main__":
    run()
