"""SM clock and board power while a benchmark times its steps, read by ``nvidia-smi`` in the
background. Why: two variants' identical GEMMs ran 5-8% apart in one session's profile
(results/2026-12-01-h200-session4/README.md); a denser step can run at lower clocks under the power
limit, so every timed row says what the chip ran at. Missing ``nvidia-smi`` gives no figures, never
an error. Temperature rides along: variants run one after another on one chip, and a chip that
has heated up may clock lower for the later ones. The driver's clock-event reasons ride along too
(where this nvidia-smi knows the field): they say *why* a clock is below its maximum (power cap,
thermal, applications setting), which session 5 could only infer."""
from __future__ import annotations

import os
import shutil
import subprocess


class ClockSampler:
    """``with ClockSampler(index) as c: ...`` then ``c.summary()`` -> {"sm_mhz", "power_w"} or {}."""

    def __init__(self, index: int = 0, period_ms: int = 100):
        self.gpu = str(physical_index(index))
        self.period_ms = period_ms
        self.cmd = ["nvidia-smi", "-i", self.gpu, "--query-gpu=clocks.sm,power.draw,temperature.gpu",
                    "--format=csv,noheader,nounits", f"-lms={period_ms}"]
        self.proc: subprocess.Popen | None = None
        self.samples: list[tuple[float, ...]] = []
        self.reasons: list[int] = []
        self.power_limit_w: float | None = None

    def __enter__(self) -> "ClockSampler":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if shutil.which(self.cmd[0]):
            self._probe_reasons()
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
        self.samples, self.reasons = parse(out)
        self.proc = None

    def _probe_reasons(self) -> None:
        """Adds the clock-event reasons to the query only if this driver answers for them (an
        unknown field would make nvidia-smi print nothing at all)."""
        try:
            probe = subprocess.run(["nvidia-smi", "-i", self.gpu, "--query-gpu=clocks_event_reasons.active,power.limit",
                                    "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return
        fields = [f.strip() for f in probe.stdout.strip().split(",")]
        if probe.returncode != 0 or len(fields) != 2 or not fields[0].startswith("0x"):
            return
        try:
            self.power_limit_w = float(fields[1])
        except ValueError:
            pass
        self.cmd[3] += ",clocks_event_reasons.active"

    def summary(self) -> dict:
        if not self.samples:
            return {}
        n = len(self.samples)
        out = {"sm_mhz": sum(s[0] for s in self.samples) / n, "power_w": sum(s[1] for s in self.samples) / n,
               "clock_samples": n}
        temps = [s[2] for s in self.samples if len(s) > 2]
        if temps:
            out["temp_c"] = sum(temps) / len(temps)
        if self.power_limit_w is not None:
            out["power_limit_w"] = self.power_limit_w
        if self.reasons:
            out["clock_reasons"] = reason_shares(self.reasons)
        return out


#: NVML's clocks-event reason bits (nvmlClocksEventReason*).
REASON_BITS = {0x1: "idle", 0x2: "applications_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
               0x10: "sync_boost", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake",
               0x100: "display_clocks"}


def reason_shares(masks: list[int]) -> str:
    """``"sw_power_cap 85%, none 15%"``: the share of samples in which each reason was active."""
    counts = {name: sum(1 for m in masks if m & bit) for bit, name in REASON_BITS.items()}
    counts["none"] = sum(1 for m in masks if m == 0)
    parts = [f"{name} {100 * c / len(masks):.0f}%" for name, c in counts.items() if c]
    return ", ".join(parts) or "none"


def parse(text: str) -> tuple[list[tuple[float, ...]], list[int]]:
    """Lines of ``<sm MHz>, <watts>[, <deg C>[, <0x reasons>]]``; anything else (a header, ``[N/A]``)
    is skipped. Returns the numeric samples and the reason masks."""
    samples, reasons = [], []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) not in (2, 3, 4):
            continue
        mask = None
        if len(parts) == 4:
            try:
                mask = int(parts[3], 16)
            except ValueError:
                continue
            parts = parts[:3]
        try:
            samples.append(tuple(float(p) for p in parts))
        except ValueError:
            continue
        if mask is not None:
            reasons.append(mask)
    return samples, reasons


def physical_index(index: int) -> int | str:
    """nvidia-smi numbers GPUs physically; CUDA_VISIBLE_DEVICES renumbers them for torch."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible):
        return int(visible[index]) if visible[index].isdigit() else visible[index]
    return index
