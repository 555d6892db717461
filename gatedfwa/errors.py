"""The exceptions that end a ``gatedfwa`` command with a one-line message instead of a
traceback.

* :class:`ConfigError`: input the user can fix (paths, options, config files, checkpoints);
  the command line prints the message and exits with status 2.
* :class:`Interrupted`: Ctrl-C stopped a command; the message says what was kept (the
  checkpoint saved, the text printed); exit status 130, as for any program stopped by SIGINT.

Every other exception is a bug and keeps its traceback. This module imports nothing, so
the command line can name these types without loading torch.
"""

from __future__ import annotations

__all__ = ["ConfigError", "Interrupted"]


class ConfigError(ValueError):
    """Input the user can fix: the message says what was wrong and what was expected."""


class Interrupted(Exception):
    """Ctrl-C during a command; the message says what was kept."""
