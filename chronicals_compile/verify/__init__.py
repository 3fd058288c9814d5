"""Kernel-equivalence checks, shared by the test suite and ``chronicals verify``.

Each module here exposes ``NAME``, ``cases()`` (a hypothesis strategy of keyword arguments) and
``check(**case, device=...) -> list[Measurement]``.
"""
