"""Exit statuses and the command-line error, shared by every ``mav`` command.

Commands raise :class:`CliError` (or any :class:`stages.errors.UserError`); ``workflows.cli.main`` prints
it as one line ``mav: error: ...`` and exits with its code. No command module imports the CLI module.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from stages.errors import UserError

EXIT_USAGE = 2      # bad input: nothing was started
EXIT_FAILED = 1     # the work ran and failed (some rows failed, a write failed, Ray could not start)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143   # SIGTERM (128 + SIGTERM): ray job stop, Kubernetes, a process manager


class CliError(UserError):
    """An error reported as one line, no traceback, with exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class Stop:
    """What stopped a command: Ctrl-C, or SIGTERM handled as Ctrl-C (see :func:`sigterm_as_interrupt`)."""

    def __init__(self) -> None:
        self.terminated = False

    def status(self) -> tuple[str, int]:
        """(what stopped the command, its exit status)."""
        return ("stopped by SIGTERM", EXIT_TERMINATED) if self.terminated else ("interrupted", EXIT_INTERRUPTED)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises KeyboardInterrupt once, so the work stops as on Ctrl-C; yields a
    :class:`Stop` that says which it was (Ray re-raises an interrupt caught in its calls as a plain
    KeyboardInterrupt, so the exception's type cannot). A second SIGTERM while the first is handled (the
    manifest or checkpoint being written) is ignored. Install it after ``ray.init``, whose own handler it
    replaces for the block. Outside the main thread it only yields."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if not stop.terminated:
            stop.terminated = True
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)
