"""What a compiled training step holds from forward to backward, per token and layer (issue 7).

Peak memory is mostly what the forward keeps for the backward, so a memory change is predicted
here before a GPU measures it. Each variant runs in its own process: builds the preset's model
(random weights; ``--layers`` fewer than the preset, since the per-layer figure is what counts),
compiles it like ``benchmarks/e2e.py``, runs one forward with labels, and walks the autograd graph
behind the loss: every tensor a backward node saved (compiled graphs included), each storage
counted once, parameters and their views left out. Tensors are put in classes by their last
dimension and size against the model's widths (``hidden``, ``intermediate``, ``attention``
[..., heads, seq, head_dim], ``vocab``, ``other``); the table gives bf16-equivalent elements per
token per layer and the bytes extrapolated to the preset's full depth; vocabulary-wide tensors
(the loss's) are given as measured.

    python benchmarks/saved_activations.py --preset qwen2.5-0.5b --layers 2 --seq 512 --device cpu

On the CPU the compile is Inductor's CPU backend: the partition (what is saved) is decided before
code generation, by the same partitioner as on CUDA, but passes that differ by device (our
rms_norm and swiglu run on the CPU by default, not on CUDA: ``config.CUDA_OFF_BY_DEFAULT``) are
disabled on the CPU to match the CUDA defaults unless ``--cpu-defaults``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for path in (HERE, REPO):
    if path not in sys.path:
        sys.path.insert(0, path)

from chronicals_compile.config import CUDA_OFF_BY_DEFAULT  # noqa: E402 (after the path set-up)
from chronicals_compile.testing.saved import held_tensors  # noqa: E402

TAG = "SAVED_RESULT "
#: variant -> chronicals options (None: plain Inductor)
VARIANTS = {
    "inductor": None,
    "chronicals": {},
    "chronicals-keep-gate": {"disable": ["gate_recompute"]},
    "chronicals-no-lora-linear": {"disable": ["lora_linear"]},  # with --lora-r: peft's three GEMMs
    "chronicals-concat": {"enable": ["concat_linear"]},  # q/k/v (and gate/up where it pays) as one GEMM
}
#: The passes off by default on CUDA (the CPU run disables them to match the GPU's graph).
CUDA_DEFAULT_OFF = sorted(CUDA_OFF_BY_DEFAULT)


def classify(t, config) -> str:
    last = t.shape[-1] if t.dim() else 1
    head_dim = config.hidden_size // config.num_attention_heads
    if last == config.vocab_size or (t.dim() and t.shape[0] == config.vocab_size):
        return "vocab"
    if last == config.intermediate_size:
        return "intermediate"
    if t.dim() == 4 and last == head_dim:
        return "attention"
    if last == config.hidden_size:
        return "hidden"
    return "other"


def worker(spec: dict) -> dict:
    import torch

    from chronicals_compile.cli import presets

    preset = presets.PRESETS[spec["preset"]]
    full_layers = preset.layers
    preset = presets.Preset(**{**preset.__dict__, "layers": spec["layers"] or preset.layers})
    dtype = getattr(torch, spec["dtype"])
    model = presets.build_model(preset, preset.vocab or 4096, dtype=dtype, device=spec["device"], seed=0)
    model.config.use_cache = False
    if spec.get("lora_r"):  # as e2e.py's LoRA mode with --lora-adapter-dtype model
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"),
                               autocast_adapter_dtype=False)
    model.train()
    options = VARIANTS[spec["variant"]]
    if options is None:
        model.compile()
    else:
        import chronicals_compile

        options = dict(options)
        if spec["device"] == "cpu" and not spec["cpu_defaults"]:
            options["disable"] = sorted({*options.get("disable", []), *CUDA_DEFAULT_OFF})
        chronicals_compile.compile(model, **options)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq"]), generator=gen).to(spec["device"])
    on_gpu = spec["device"].startswith("cuda")
    model(input_ids=ids, labels=ids).loss.backward()  # compiles; the step measured below is the second
    model.zero_grad(set_to_none=True)
    phases = {}
    if on_gpu:
        torch.cuda.synchronize()
        phases["before GiB"] = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    loss = model(input_ids=ids, labels=ids).loss
    if on_gpu:
        torch.cuda.synchronize()
        phases["forward peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
        phases["after forward GiB"] = torch.cuda.memory_allocated() / 2**30
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tokens = ids.numel()
    per_class: dict[str, int] = {}
    by_shape: dict[str, int] = {}
    t = None
    for t in held_tensors(loss):
        if t.untyped_storage().data_ptr() in params:
            continue
        cls = classify(t, model.config)
        per_class[cls] = per_class.get(cls, 0) + t.untyped_storage().nbytes()
        key = f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}"
        by_shape[key] = by_shape.get(key, 0) + t.untyped_storage().nbytes()
    del t  # the loop's last saved tensor must not outlive the graph below
    if on_gpu:  # where the step's peak is: the forward's end, or inside the backward
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        torch.cuda.synchronize()
        phases["backward peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
    layers = model.config.num_hidden_layers
    top = sorted(by_shape.items(), key=lambda kv: -kv[1])[:10]
    return {"variant": spec["variant"], "tokens": tokens, "layers": layers, "full_layers": full_layers,
            "bytes": per_class, "phases": phases, "top_saved": top}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="qwen2.5-0.5b")
    p.add_argument("--layers", type=int, default=2, help="layers built (0: the preset's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--cpu-defaults", action="store_true", help="keep the CPU's pass defaults")
    p.add_argument("--lora-r", type=int, default=0, help="peft LoRA of this rank on all linear projections "
                   "(adapters in the model's dtype)")
    p.add_argument("--full-tokens", type=int, default=8 * 2048, help="tokens of the step to extrapolate to")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(TAG + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if variant not in VARIANTS:
            print(f"saved_activations: unknown variant {variant!r}; known: {list(VARIANTS)}", file=sys.stderr)
            return 2
        spec = {"variant": variant, "preset": args.preset, "layers": args.layers, "batch": args.batch,
                "seq": args.seq, "device": device, "dtype": args.dtype, "cpu_defaults": args.cpu_defaults,
                "lora_r": args.lora_r}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                              capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(TAG)), None)
        if line is None:
            print(f"saved_activations: {variant} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(line[len(TAG):]))
    classes = sorted({c for r in rows for c in r["bytes"]} - {"vocab"})
    import common

    env = common.environment(device)
    print(f"# Held for backward, {args.preset} ({args.layers or 'all'} layers built), {args.batch} x {args.seq}, "
          f"{args.dtype}\n")
    print(", ".join(f"{k} {v}" for k, v in env.items()) + "\n")
    print("Command: `python benchmarks/saved_activations.py " + " ".join(argv if argv is not None else sys.argv[1:])
          + "`\n")
    print("Per layer: bf16-equivalent elements per token per layer (saved bytes / 2 / tokens / layers built), "
          f"and GiB extrapolated to the preset's depth at {args.full_tokens} tokens. The loss column (tensors "
          "as wide as the vocabulary: logits, or the cut cross-entropy's dW) is MiB as measured at this shape: "
          "it does not scale per layer.\n")
    print("| variant | " + " | ".join(classes) + " | per layer total | GiB at full depth | loss MiB |")
    print("|---|" + "---|" * (len(classes) + 3))
    for r in rows:
        per = {c: r["bytes"].get(c, 0) / 2 / r["tokens"] / r["layers"] for c in classes}
        total = sum(per.values())
        gib = total * 2 * args.full_tokens * r["full_layers"] / 2**30
        loss_mib = r["bytes"].get("vocab", 0) / 2**20
        print(f"| {r['variant']} | " + " | ".join(f"{per[c]:,.0f}" for c in classes)
              + f" | {total:,.0f} | {gib:.2f} | {loss_mib:,.1f} |")
    if any(r["phases"] for r in rows):
        print("\nThe measured step (the second; CUDA allocator): allocated before it, the forward's peak, "
              "allocated after the forward, the backward's peak.\n")
        names = list(rows[0]["phases"])
        print("| variant | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for r in rows:
            print(f"| {r['variant']} | " + " | ".join(f"{r['phases'].get(n, 0):.2f}" for n in names) + " |")
    for r in rows:
        print(f"\nLargest saved tensors by shape, {r['variant']} (MiB, all layers built): "
              + "; ".join(f"{k} {v / 2**20:,.1f}" for k, v in r["top_saved"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
