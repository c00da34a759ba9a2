"""One line per failure for xmedjax's command-line mains (``data_prep.cli_errors`` plus
xmedjax's own errors).

    from xmedjax import cli_errors

    @cli_errors.one_line_errors("xmedjax.convert")
    def main(argv): ...

An expected failure (a missing or unreadable file, no space left, a read-only folder, a bad
config value, a damaged checkpoint, weights that do not fit, a work directory in use) ends
in one line and exit status 1; a bug in one line pointing at a log file that holds its
traceback; ``--verbosity=1`` prints every traceback. ``ConfigError`` keeps its ``config error:`` prefix.
"""

from __future__ import annotations

from collections.abc import Iterable

from data_prep import cli_errors as _base
from data_prep.cli_errors import describe, verbose, with_path, writing

EXPECTED: tuple = (
    *_base.EXPECTED,
    ("xmedjax.errors:ConfigError", "config error: "),
    "xmedjax.checkpointing:CheckpointError",
    "xmedjax.models.convert:WeightLoadError",
    "xmedjax.train:NonFiniteError",
    "xmedjax.workdir_lock:WorkdirBusy",
)


def one_line_errors(
    command: str | None = None, *, expected: Iterable = (), log_file: str | None = None
) -> _base.one_line_errors:
    """``data_prep.cli_errors.one_line_errors`` knowing xmedjax's errors (``EXPECTED``)."""
    return _base.one_line_errors(command, expected=(*EXPECTED, *expected), log_file=log_file)


__all__ = ["EXPECTED", "describe", "one_line_errors", "verbose", "with_path", "writing"]
