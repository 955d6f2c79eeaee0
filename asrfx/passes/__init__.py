"""The compiler passes over traced graphs: detect, convert, fuse, insert.

``site`` and ``report`` hold their typed records; ``contract`` is what the passes agree
on about the ASR form (psi names, node roles, the invariants of a fused graph).
"""
