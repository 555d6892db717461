"""The one exception type for bad user input (paths, options, config files, checkpoints).

The command line catches it and prints its message with a non-zero exit status; every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Input the user can fix: the message says what was wrong and what was expected."""
