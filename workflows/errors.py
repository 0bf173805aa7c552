"""Exit statuses and the command-line error, shared by every ``mav`` command.

Commands raise :class:`CliError` (or any :class:`stages.errors.UserError`); ``workflows.cli.main`` prints
it as one line ``mav: error: ...`` and exits with its code. No command module imports the CLI module.
"""

from __future__ import annotations

from stages.errors import UserError

EXIT_USAGE = 2      # bad input: nothing was started
EXIT_FAILED = 1     # the work ran and failed (some rows failed, a write failed, Ray could not start)


class CliError(UserError):
    """An error reported as one line, no traceback, with exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code
