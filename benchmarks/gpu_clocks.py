"""SM clock and board power while a benchmark times its steps, read by ``nvidia-smi`` in the
background. Why: two variants' identical GEMMs ran 5-8% apart in one session's profile
(results/2026-12-01-h200-session4/README.md); a denser step can run at lower clocks under the power
limit, so every timed row says what the chip ran at. Missing ``nvidia-smi`` gives no figures, never
an error. Temperature rides along: variants run one after another on one chip, and a chip that
has heated up may clock lower for the later ones."""
from __future__ import annotations

import os
import shutil
import subprocess


class ClockSampler:
    """``with ClockSampler(index) as c: ...`` then ``c.summary()`` -> {"sm_mhz", "power_w"} or {}."""

    def __init__(self, index: int = 0, period_ms: int = 100):
        self.cmd = ["nvidia-smi", "-i", str(physical_index(index)), "--query-gpu=clocks.sm,power.draw,temperature.gpu",
                    "--format=csv,noheader,nounits", f"-lms={period_ms}"]
        self.proc: subprocess.Popen | None = None
        self.samples: list[tuple[float, ...]] = []

    def __enter__(self) -> "ClockSampler":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if shutil.which(self.cmd[0]):
            try:
                self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            except OSError:
                self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.samples = parse(out)
        self.proc = None

    def summary(self) -> dict:
        if not self.samples:
            return {}
        n = len(self.samples)
        out = {"sm_mhz": sum(s[0] for s in self.samples) / n, "power_w": sum(s[1] for s in self.samples) / n,
               "clock_samples": n}
        temps = [s[2] for s in self.samples if len(s) > 2]
        if temps:
            out["temp_c"] = sum(temps) / len(temps)
        return out


def parse(text: str) -> list[tuple[float, ...]]:
    """Lines of ``<sm MHz>, <watts>[, <deg C>]``; anything else (a header, ``[N/A]``) is skipped."""
    samples = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) not in (2, 3):
            continue
        try:
            samples.append(tuple(float(p) for p in parts))
        except ValueError:
            continue
    return samples


def physical_index(index: int) -> int | str:
    """nvidia-smi numbers GPUs physically; CUDA_VISIBLE_DEVICES renumbers them for torch."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible):
        return int(visible[index]) if visible[index].isdigit() else visible[index]
    return index
