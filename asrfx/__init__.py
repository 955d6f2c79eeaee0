"""asrfx: inference-cost-free channel attention (ASR) as torch.fx passes.

Detect channel-attention blocks in any traced model by graph structure::

    sites = asrfx.find_attention(model, example_inputs=(torch.randn(1, 3, 224, 224),))
    print(sites)

and measure how constant their gates are over data (the paper's Stripe Observation)::

    print(asrfx.stripe(model, loader))
"""

from . import attention, checkpoint, models
from .api import backbone, convert, find_attention, fuse, insert, report_of, stripe
from .passes.fuse import Fold, FuseReport
from .deploy.verify import verify
from .passes.convert import ConvertedSite, ConvertReport
from .errors import AsrfxError, AsrfxWarning, TracingError
from .nn.gated_norm import GatedBatchNorm, GatedSyncBatchNorm, convert_sync_batchnorm
from .passes.report import SiteTable
from .observe.recorder import GateRecorder
from .observe.stripe import SiteStripe, StripeStats
from .passes.site import (
    Absorption, AttentionSite, Combine, GateUse, LayoutLoss, LeafRecord, Rejection, SiteKind, Verdict,
)
from .graph.capture import trace

__all__ = [
    "find_attention",
    "convert",
    "fuse",
    "insert",
    "stripe",
    "StripeStats",
    "SiteStripe",
    "GateRecorder",
    "attention",
    "checkpoint",
    "models",
    "verify",
    "report_of",
    "backbone",
    "FuseReport",
    "Fold",
    "ConvertReport",
    "ConvertedSite",
    "GatedBatchNorm",
    "GatedSyncBatchNorm",
    "convert_sync_batchnorm",
    "AsrfxWarning",
    "trace",
    "SiteTable",
    "AttentionSite",
    "GateUse",
    "Absorption",
    "Rejection",
    "Verdict",
    "LayoutLoss",
    "LeafRecord",
    "SiteKind",
    "Combine",
    "AsrfxError",
    "TracingError",
]

__version__ = "0.1.0"
