"""Errors asrfx raises; each message names the node or module and says what to do."""

from __future__ import annotations

__all__ = ["AsrfxError", "TracingError", "AsrfxWarning"]


class AsrfxError(Exception):
    """Base class of every error asrfx raises on bad input."""


class TracingError(AsrfxError):
    """A model (or a part of it) cannot be traced or shape-propagated."""


class AsrfxWarning(UserWarning):
    """Something the caller should know, where the result is still correct."""
