"""The one family of errors for bad user input.

Every error a user can fix by changing what they gave (a config, a checkpoint, an input file, training
data, a command-line value) derives from :class:`UserError`; the CLI reports any of them as one line and
exit status 2 (``workflows.errors``), the Serve API as a 4xx.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad user input; the message names the bad value and what was expected."""
