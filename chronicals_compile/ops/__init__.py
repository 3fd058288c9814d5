"""``torch.ops.chronicals.*``: importing this package registers every op.

Each op is a ``torch.library.custom_op`` with a SymInt-safe fake kernel, a registered autograd
formula whose backward is itself an op, a CUDA kernel (Triton) and a CPU reference; ``lora_linear``
(torch ops only) is a ``triton_op`` instead, which AOTAutograd decomposes so that Inductor launches
its GEMMs.
"""
from __future__ import annotations

import importlib

for _name in ("rms_norm", "add_rms_norm", "swiglu", "rope", "linear_cross_entropy", "lora_linear",
              "gated_mlp", "flash_attention"):
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _err:
        if _err.name != f"{__name__}.{_name}":
            raise
