"""The project's one tolerance rule, shared by the CPU suite, the GPU suite and ``chronicals verify``.

``|ours - ref64| <= |torch_same_dtype - ref64| + atol + rtol * |ref64|``, elementwise: our kernel
may be as wrong as PyTorch itself is in the same dtype, plus a little slack, and no more. NaN in
ours passes only where the float64 reference is NaN too (propagation, never invention).
"""
from __future__ import annotations

import dataclasses

import torch

#: Slack per dtype (atol, rtol): a few units in the last place of the dtype.
SLACK = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}


@dataclasses.dataclass
class Measurement:
    """One compared tensor: ``ratio`` = worst error / its bound (<= 1 passes)."""

    name: str
    dtype: torch.dtype
    ratio: float
    max_error: float
    ok: bool

    def __str__(self) -> str:
        state = "ok" if self.ok else "FAIL"
        return f"{self.name} [{self.dtype}]: max err {self.max_error:.3g}, {self.ratio:.3f} of bound ({state})"


def measure(name: str, ours: torch.Tensor, same_dtype: torch.Tensor, ref64: torch.Tensor,
            dtype: torch.dtype | None = None, slack_scale: float = 1.0,
            magnitude: torch.Tensor | None = None) -> Measurement:
    """``magnitude``: for a value that is a sum of terms, the sum of the terms' absolute values.
    Rounding one term moves the sum by the term's ulp, not the sum's, so a sum that cancels to
    near zero gets slack relative to its terms (passed as float64, shaped like ``ref64``)."""
    dtype = dtype or ours.dtype
    atol, rtol = SLACK[dtype]
    if ours.shape != ref64.shape:
        return Measurement(name, dtype, float("inf"), float("inf"), False)
    dev = ref64.device  # compared where they live: float64 math over 10^8 elements on a CPU takes minutes
    o, t, r = (x.detach().to(dev, torch.float64) for x in (ours, same_dtype, ref64))
    mag = r.abs() if magnitude is None else magnitude.detach().to(dev, torch.float64).abs().expand_as(r)
    ref_nan = torch.isnan(r)
    nan_ok = bool(torch.equal(torch.isnan(o), ref_nan))
    finite = ~ref_nan
    o, t, r, mag = o[finite], t[finite], r[finite], mag[finite]
    inf_ok = bool(torch.equal(torch.isinf(o), torch.isinf(r))) and bool(torch.equal(o[torch.isinf(r)], r[torch.isinf(r)]))
    fin = ~torch.isinf(r)
    o, t, r, mag = o[fin], t[fin], r[fin], mag[fin]
    err = (o - r).abs()
    torch_err = (t - r).abs().nan_to_num(nan=0.0, posinf=0.0)
    bound = torch_err + slack_scale * (atol + rtol * mag.nan_to_num(nan=0.0, posinf=0.0))
    ratio = float((err / bound).max()) if err.numel() else 0.0
    max_err = float(err.max()) if err.numel() else 0.0
    ok = nan_ok and inf_ok and ratio <= 1.0 and not torch.isnan(err).any()
    return Measurement(name, dtype, ratio if nan_ok and inf_ok else float("inf"), max_err, ok)


def assert_all_ok(measurements: list[Measurement]) -> None:
    bad = [m for m in measurements if not m.ok]
    assert not bad, "\n".join(str(m) for m in bad)
