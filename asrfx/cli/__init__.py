"""The command line (``python -m asrfx``): commands, model specs, checkpoint files, quickstart."""

from .commands import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main

__all__ = ["main", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]
