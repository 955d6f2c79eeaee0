"""Gate algebra: pure functions and tables, no graph code.

``rules`` says which ops a per-channel scale or shift passes through and which layers
absorb it; ``fold`` computes the folded parameters. Graph code imports these, never the
reverse.
"""
