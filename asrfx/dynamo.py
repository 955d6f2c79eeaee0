"""``import asrfx.dynamo`` registers the ``"asrfx"`` torch.compile backend (it lives in
:mod:`asrfx.deploy.dynamo`; an installed asrfx registers it through its entry point)."""

from .deploy.dynamo import *  # noqa: F401,F403
from .deploy.dynamo import __all__  # noqa: F401
