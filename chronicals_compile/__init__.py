"""chronicals-compile: fine-tuning made faster and lighter by compiling, not patching.

``torch.compile(model, backend="chronicals")`` works after ``pip install`` with no import of
ours. ``compile`` and ``explain`` below are the same backend with friendlier arguments.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .config import Options, PREFIX
from .report import Report

__all__ = ["compile", "explain", "Report", "Options", "runtime"]
__version__ = "0.1.0"

_COMPILE_KWARGS = ("dynamic", "fullgraph")


def _split(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    ours = {f.name for f in dataclasses.fields(Options)}
    compile_kwargs = {k: options.pop(k) for k in _COMPILE_KWARGS if k in options}
    backend_options = {}
    for key, value in options.items():
        if key.startswith(PREFIX) or key not in ours:
            backend_options[key] = value  # already prefixed, or an Inductor option
        else:
            backend_options[PREFIX + key] = value
    from .config import split_options

    split_options(backend_options)  # validate now, with a clear error, not at first call
    return compile_kwargs, backend_options


def compile(model: torch.nn.Module, **options: Any) -> torch.nn.Module:
    """Compile ``model`` in place with the chronicals backend and return it.

    In place (``nn.Module.compile``) because HF ``Trainer`` reads ``model.forward``'s signature to
    filter dataset columns, and accelerate refuses unknown ``torch_compile_backend`` names: pass
    the returned model to ``Trainer`` instead. ``options`` mixes our keys (``disable``, ``logits``,
    ``compiler``, ``mode``; with or without the ``chronicals.`` prefix), ``dynamic``/``fullgraph``
    for torch.compile, and any Inductor config key.
    """
    from .backend import chronicals_backend

    compile_kwargs, backend_options = _split(dict(options))
    model.compile(backend=chronicals_backend, options=backend_options or None, **compile_kwargs)
    return model


def explain(model: torch.nn.Module, *args: Any, options: dict[str, Any] | None = None,
            dynamic: bool | None = None, **kwargs: Any) -> Report:
    """Compile and run one call of ``model(*args, **kwargs)``; report what was swapped and why not.

    A fresh backend object forces a fresh capture, so the report describes this call even when
    the model was compiled before. ``report.output`` holds the call's result.
    """
    from .backend import chronicals_backend
    from .report import collecting

    compile_kwargs, backend_options = _split(dict(options or {}))

    def backend(gm, example_inputs, **kw):
        return chronicals_backend(gm, example_inputs, **kw)

    with collecting() as report:
        compiled = torch.compile(model, backend=backend, dynamic=dynamic,
                                 options=backend_options or None, **compile_kwargs)
        report.output = compiled(*args, **kwargs)
    if report.graphs == 0:
        report.notes.append("no graph was compiled by this call: Dynamo reused a cached graph or hit "
                            "torch._dynamo.config.recompile_limit (torch._dynamo.reset() clears both)")
    return report


def __getattr__(name: str) -> Any:
    if name == "runtime":
        import importlib

        return importlib.import_module(".runtime", __name__)
    raise AttributeError(name)
