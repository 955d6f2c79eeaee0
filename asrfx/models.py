"""``asrfx.models``: the paper's CIFAR ResNets (they live in :mod:`asrfx.nn.models`)."""

from .nn.models import *  # noqa: F401,F403
from .nn.models import __all__  # noqa: F401
