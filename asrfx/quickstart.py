"""``python -m asrfx.quickstart``: the README's first command (it lives in :mod:`asrfx.cli.quickstart`)."""

from .cli.quickstart import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
