"""The ``chronicals`` command (also ``python -m chronicals_compile``).

    chronicals finetune [options]   fine-tune a causal LM with the backend, BFD packing, LoRA+
    chronicals verify [--quick]     property-based equivalence of every fused op, as a table

Exit codes: 0 success; 1 a failed run (unhealthy gradients, a failing op); 2 bad input, reported
as one ``chronicals: error: ...`` line on stderr with no traceback; 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

PROG = "chronicals"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one ``chronicals: error:`` line (no usage dump), exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else None
        hint = f" (see '{PROG} {sub} --help')" if sub else f" (see '{PROG} --help')"
        self.exit(2, f"{PROG}: error: {message}{hint}\n")


def build_parser() -> argparse.ArgumentParser:
    from . import arguments, verify

    parser = _Parser(prog=PROG, description="chronicals-compile: fine-tune causal LMs with fused Triton kernels "
                                            "swapped in by a torch.compile backend.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subs = parser.add_subparsers(dest="command", metavar="{finetune,verify}")
    ft = subs.add_parser("finetune", help="fine-tune a causal LM (default: an embedded model and dataset, no network)",
                         description="Fine-tune a causal LM with the chronicals backend, BFD packing and (with --lora-r) LoRA+.")
    arguments.add_arguments(ft)
    ft.set_defaults(func=_run_finetune)
    vf = subs.add_parser("verify", help="check every fused op against float64 references (hypothesis)",
                         description="Property-based equivalence of every fused op against float64 references, as a table.")
    verify.add_arguments(vf)
    vf.set_defaults(func=_run_verify)
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def _run_finetune(args) -> int:
    from .finetune import run

    return run(args)


def _run_verify(args) -> int:
    from .verify import resolve_device, run

    args.device_resolved = resolve_device(args.device)
    if args.device_resolved != "cuda":
        # Before anything imports triton: the interpreter is chosen at import time.
        os.environ["TRITON_INTERPRET"] = "1"
    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``chronicals`` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, argument errors (already printed)
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2

    from .data import DataError
    from .arguments import TrainingError, UsageError

    try:
        return args.func(args)
    except (UsageError, DataError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
