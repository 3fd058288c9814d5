"""Size equality that also holds for symbolic sizes, decided by SymPy, never by guessing.

Under ``dynamic=True`` the hidden size may be a SymInt; a divisor ``N`` in ``sum(...)/N`` must be
provably the same expression, not merely equal for the current example.
"""
from __future__ import annotations

import sympy
import torch


def _expr(value):
    if isinstance(value, torch.SymInt):
        return value.node.expr
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return sympy.Integer(int(value)) if float(value).is_integer() else None
    return None


def same_size(a, b) -> bool:
    ea, eb = _expr(a), _expr(b)
    if ea is None or eb is None:
        return False
    return sympy.simplify(ea - eb) == 0
