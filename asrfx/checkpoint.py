"""``asrfx.checkpoint``: asrfx's checkpoint files (they live in :mod:`asrfx.cli.checkpoint`)."""

from .cli.checkpoint import *  # noqa: F401,F403
from .cli.checkpoint import __all__  # noqa: F401
