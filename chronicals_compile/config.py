"""Every option the backend understands, in one typed place.

Options reach the backend through ``torch.compile(..., options={...})``. Ours carry the
``chronicals.`` prefix; everything else is handed to Inductor untouched, because
``torch._inductor.config.patch`` rejects keys it does not know.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Literal

PREFIX = "chronicals."

#: Pattern names, as reported by ``explain`` and accepted by ``disable``.
PATTERNS = ("rms_norm", "add_rms_norm", "swiglu", "rope", "linear_cross_entropy", "causal_mask", "gqa_attention",
            "gate_recompute", "concat_linear", "lora_linear", "mlp_epilogue", "flash_attention",
            "concat_narrow_linear")

LogitsPolicy = Literal["auto", "drop", "detach", "keep"]

#: Patterns that stay off by default on CUDA because the last GPU measurement did not show our
#: kernel beating Inductor's own fusion of the same chain (the issue's rule: swap by default only
#: where ours wins). ``enable=[...]`` turns them on. Each entry says where the figures are.
#: ``rope`` left this table after it won in the whole step: 135.4k -> 136.7k tok/s alone and
#: 137.1k -> 139.9k beside CUDA graphs (benchmarks/results/2026-12-01-h200-session6/call1/e2e_rope.md).
CUDA_OFF_BY_DEFAULT = {
    "rms_norm": "forward+backward 0.88-1.09x Inductor's fusion of the same function on the H200, "
                "0.88x at Qwen2.5-0.5B's width 896 (benchmarks/results/2026-11-28-h200-session3/micro.md)",
    "flash_attention": "flash-attn-4 4.0.0b4's Hopper kernels lose to cuDNN alone (0.867 against 0.707 ms "
                       "fwd+bwd a Qwen2.5-0.5B layer) and are within the spread in the step (+0.7%, -1.6%) "
                       "on an H100 (benchmarks/results/2026-12-06-h100-session18)",
    "swiglu": "at parity with Inductor (1.00x, both at copy bandwidth) on the H200: nothing to win "
              "(benchmarks/results/2026-11-28-h200-session2/micro.md)",
}


#: Patterns off by default on every device until a GPU measurement says they win.
OFF_BY_DEFAULT = {
    "add_rms_norm": "forward+backward 0.90-1.00x Inductor's own fusion of the residual add into its "
                    "norm on the H200 (benchmarks/results/2026-11-28-h200-session3/micro.md)",
    "concat_linear": "slower in the Qwen0.5B 8x2048 step on the H200 since mlp_epilogue takes gate/up: "
                     "full fine-tuning 2.9% slower with q/k/v fused (session 13, 1f124c8; neutral with "
                     "CUDA graphs), LoRA 0.7% slower "
                     "(benchmarks/results/2026-12-02-h200-session7/call2/e2e_concat.md, call4/e2e_lora_bf16.md)",
    "concat_narrow_linear": "within the spread in the Qwen0.5B 8x2048 step on an H100: +0.6% and -1.0% in two "
                            "runs (benchmarks/results/2026-12-06-h100-session21)",
}

#: Patterns never applied on CUDA, even when enabled: the reason names what goes wrong there.
CUDA_UNAVAILABLE = {
    "add_rms_norm": "chained through every layer it leaves no Inductor buffer between our ops, and "
                    "Inductor's IR printing then grows exponentially with depth: a 24-layer Qwen "
                    "compile hung on the H200 (benchmarks/results/2026-11-28-h200-session3/README.md); "
                    "it was also no faster than Inductor's fusion",
}


#: ``Options.cce_mode``'s values, for the checks and the CLI's choices.
CCE_MODES = ("fused", "recompute", "lean")


@dataclasses.dataclass(frozen=True)
class Options:
    #: Pattern names to leave to Inductor.
    disable: frozenset[str] = frozenset()
    #: Pattern names to swap even where they are off by default (see ``CUDA_OFF_BY_DEFAULT``).
    enable: frozenset[str] = frozenset()
    #: What happens to a logits graph output once lm_head + CE is fused.
    #: ``auto`` = ``drop`` when training (grad enabled, labels present), ``keep`` otherwise.
    logits: LogitsPolicy = "auto"
    #: Cut cross-entropy in training: ``fused`` computes dh and dW during the forward (the logits
    #: once) and scales them in backward; ``recompute`` recomputes the logit tiles in backward
    #: (less memory held between forward and backward, a third more matmul work); ``lean`` is
    #: ``recompute`` holding the least extra memory exact gradients allow: the smaller fp32
    #: accumulator needed (dh's N x d x 4 bytes, or dW's when V < N; none for a frozen lm_head)
    #: and a buffer no larger than the smaller gradient, for the most
    #: memory-bound runs (H200, Qwen2.5-0.5B's lm_head at 16k tokens: 0.34 GiB with the gradients
    #: against fused's 1.5, at 1.7x its time; the training step 13% slower for 0.7 GiB less peak,
    #: results/2026-12-03-h200-session10; with a frozen lm_head 37 MiB beyond dh at 27.8 ms against
    #: fused's 997 MiB at 17.4, the LoRA step 16% slower for 0.28 GiB, session11). All three give
    #: the same gradients up to rounding.
    cce_mode: Literal["fused", "recompute", "lean"] = "fused"  # the values of CCE_MODES
    #: Rows per gradient chunk of the cut cross-entropy on CUDA (memory against speed): each chunk
    #: holds a [rows, V] buffer in the input dtype; fewer, larger chunks re-read the fp32 dW
    #: accumulator less and run the GEMMs nearer peak (H200, Qwen2.5-0.5B at 8 x 2048: 1664 rows
    #: 132.8k tok/s, 8192 rows 136.4k with 1.9 GiB more peak memory). ``None``: a buffer of
    #: 4 x lm_head's bytes, at most 2 GiB (or ``CHRONICALS_CCE_CHUNK_ROWS``).
    cce_chunk_rows: int | None = None
    #: Who compiles the rewritten graph: ``inductor`` (default), ``aot_eager`` (AOTAutograd
    #: without code generation: fast CPU tests of the passes) or ``eager`` (debugging).
    compiler: Literal["inductor", "aot_eager", "eager"] = "inductor"
    #: An Inductor mode (``max-autotune``, ``reduce-overhead``...). Lives here because
    #: torch.compile refuses ``mode`` and ``options`` together.
    mode: str | None = None
    #: Fraction (0..1) of the activations Inductor's partitioner may keep for backward
    #: (``torch._functorch.config.activation_memory_budget``): lower recomputes more in backward
    #: and holds less between forward and backward. ``None`` leaves torch's default (1.0, i.e.
    #: recompute only what is free). Inductor only: the other compilers do not partition by cost.
    memory_budget: float | None = None
    #: Programmatic Dependent Launch for Inductor's Triton kernels (``triton.enable_pdl``, Hopper
    #: and later; ignored elsewhere and by a torch without it): each kernel may be scheduled while
    #: the one before it drains and waits on the GPU only before it touches that one's outputs,
    #: which hides part of the ~1 us launch gap between the step's ~1,600 kernels, in the same
    #: bits (tests/gpu/test_pdl_gpu.py). An explicit ``triton.enable_pdl`` among the options wins.
    pdl: bool = False
    #: ``mlp_epilogue``'s op keeps the interleaved gate/up weight it builds in the forward for its
    #: backward instead of interleaving the two weights again: one copy a layer less (~10 us on the
    #: H200, ~0.2% of the Qwen2.5-0.5B step, predicted) for 2 x F x d more elements held between
    #: forward and backward (0.39 GiB at Qwen2.5-0.5B). Same gradients, bit for bit.
    mlp_keep_weight: bool = False

    def enabled(self, pattern: str, device_type: str | None = None) -> bool:
        if pattern in self.disable:
            return False
        if device_type == "cuda" and pattern in CUDA_UNAVAILABLE:
            return False
        if pattern in self.enable:
            return True
        if pattern == "rms_norm" and self.enabled("add_rms_norm", device_type):
            return True  # add_rms_norm rewrites the RMSNorm pass's ops: it needs them
        if pattern in OFF_BY_DEFAULT:
            return False
        return not (device_type == "cuda" and pattern in CUDA_OFF_BY_DEFAULT)


def split_options(options: dict[str, Any] | None) -> tuple[Options, dict[str, Any]]:
    """Separate our ``chronicals.*`` keys from Inductor's, validating ours by name."""
    ours: dict[str, Any] = {}
    inductor: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if key.startswith(PREFIX):
            ours[key[len(PREFIX):]] = value
        else:
            inductor[key] = value
    return make_options(**ours), inductor


def make_options(**kwargs: Any) -> Options:
    fields = {f.name for f in dataclasses.fields(Options)}
    unknown = set(kwargs) - fields
    if unknown:
        raise ValueError(
            f"unknown chronicals option(s) {sorted(unknown)}; known: {sorted(fields)}"
        )
    for key in ("disable", "enable"):
        if key in kwargs:
            names = [kwargs[key]] if isinstance(kwargs[key], str) else kwargs[key]
            kwargs[key] = frozenset(_check_patterns(names, key))
    if kwargs.get("disable", frozenset()) & kwargs.get("enable", frozenset()):
        raise ValueError(f"pattern(s) {sorted(kwargs['disable'] & kwargs['enable'])} both enabled and disabled")
    if "logits" in kwargs and kwargs["logits"] not in ("auto", "drop", "detach", "keep"):
        raise ValueError(
            f"chronicals.logits must be one of auto, drop, detach, keep; got {kwargs['logits']!r}"
        )
    if kwargs.get("cce_mode", "fused") not in CCE_MODES:
        raise ValueError(f"chronicals.cce_mode must be fused, recompute or lean; got {kwargs['cce_mode']!r}")
    if kwargs.get("compiler", "inductor") not in ("inductor", "aot_eager", "eager"):
        raise ValueError(f"chronicals.compiler must be inductor, aot_eager or eager; got {kwargs['compiler']!r}")
    rows = kwargs.get("cce_chunk_rows")
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ValueError(f"chronicals.cce_chunk_rows must be a positive integer or None; got {rows!r}")
    for key in ("pdl", "mlp_keep_weight"):
        if not isinstance(kwargs.get(key, False), bool):
            raise ValueError(f"chronicals.{key} must be True or False; got {kwargs[key]!r}")
    budget = kwargs.get("memory_budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not 0.0 <= budget <= 1.0):
        raise ValueError(f"chronicals.memory_budget must be a number from 0 to 1; got {budget!r}")
    return Options(**kwargs)


def _check_patterns(names: Iterable[str], key: str = "disable") -> list[str]:
    names = list(names)
    bad = [n for n in names if n not in PATTERNS]
    if bad:
        raise ValueError(f"unknown pattern name(s) {bad} in chronicals.{key}; known: {list(PATTERNS)}")
    return names
