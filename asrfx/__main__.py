"""python -m asrfx: the command line (asrfx.cli)."""

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
