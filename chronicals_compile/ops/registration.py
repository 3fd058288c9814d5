"""Ops on the step's hot path, defined with ``torch.library.Library`` instead of ``custom_op``.

Why: the compiled graph calls each of our ops through the dispatcher every step, and
``custom_op`` wraps every call in Python layers: its autograd kernel (a dataclass built and the
schema checked per call), its backend kernel, and an aliasing check of the outputs against the
inputs. For ``chronicals::gated_mlp`` that was ~26 us of the H100 host's time a call beside the
body's 83 (results/2026-12-06-h100-session19/call2), paid 24 times a forward and 24 a backward, in
the layers where the host keeps only just ahead of the GPU. Here the schema is inferred from the
same type hints, the body is the kernel for every backend, the fake kernel is the same, and the
autograd kernel runs torch's own ``register_autograd`` machinery only when a gradient is being
recorded; otherwise (the compiled graph's forward runs with grad off) it goes straight to the body.
On this CPU the dispatch cost fell from 8.7 to 5.0 us a call, and to 2.4 us for an op without autograd.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import _C
from torch._library.autograd import Info, make_autograd_impl

_LIBRARIES: dict[str, torch.library.Library] = {}


def _library(namespace: str) -> torch.library.Library:
    if namespace not in _LIBRARIES:
        _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    return _LIBRARIES[namespace]


def define_op(qualname: str, body: Callable, *, fake: Callable, backward: Callable | None = None,
              setup_context: Callable | None = None) -> torch._ops.OpOverload:
    """``torch.ops.<qualname>.default`` running ``body`` (type-hinted like a ``custom_op``), with
    ``fake`` for tracing and, if given, ``backward``/``setup_context`` as ``register_autograd``
    takes them. Without a backward the op is not differentiable (torch's autograd fallback)."""
    namespace, name = qualname.split("::")
    lib = _library(namespace)
    lib.define(name + torch.library.infer_schema(body, mutates_args=()), tags=(torch.Tag.pt2_compliant_tag,))
    lib.impl(name, body, "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, fake, lib=lib)
    op = getattr(getattr(torch.ops, namespace), name).default
    if backward is not None:
        recording = make_autograd_impl(op, Info(backward, setup_context))
        below_autograd = _C._after_autograd_keyset

        def autograd_kernel(keyset, *args):
            if _C.is_grad_enabled() and _C._any_requires_grad(*args):
                return recording(keyset, *args)
            with _C._AutoDispatchBelowAutograd():
                return op.redispatch(keyset & below_autograd, *args)

        lib.impl(name, autograd_kernel, "Autograd", with_keyset=True)
    return op
