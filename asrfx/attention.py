"""``asrfx.attention``: the paper's attention modules (they live in :mod:`asrfx.nn.attention`)."""

from .nn.attention import *  # noqa: F401,F403
from .nn.attention import __all__  # noqa: F401
