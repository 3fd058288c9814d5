"""benchmarks/e2e.py end to end on the CPU: tiny shape, subprocess per variant, table + JSON + PNG."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from chronicals_compile.testing.cli_runner import REPO


def test_e2e_tiny_cpu(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "e2e.py"), "--device", "cpu", "--tiny",
           "--variants", "eager,liger,cce,chronicals", "--modes", "full,lora", "--steps", "2", "--warmup", "1",
           "--chronicals-compiler", "aot_eager", "--out", str(tmp_path), "--name", "e2e-test"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    payload = json.loads((tmp_path / "e2e-test.json").read_text())
    assert {"date", "commit", "device", "torch", "transformers"} <= set(payload["environment"])
    assert payload["complete"] is True  # rewritten after every variant; complete once all ran
    runs = {(r["mode"], r["variant"]): r for r in payload["results"]}
    assert len(runs) == 8
    for mode in ("full", "lora"):
        eager, ours = runs[(mode, "eager")], runs[(mode, "chronicals")]
        assert eager["status"] == ours["status"] == "ok", (eager["status"], ours["status"])
        assert ours["loss_check"] == "ok" and ours["grad_health"] == "ok"
        assert ours["tokens_per_s"] > 0 and len(ours["step_times_s"]) == 3
        for peer in ("liger", "cce"):  # optional packages: measured when installed, a row either way
            peer_run = runs[(mode, peer)]
            assert peer_run["status"] == "ok" or peer_run["status"].startswith("n/a"), peer_run["status"]
            if peer_run["status"] == "ok":
                assert peer_run["loss_check"] == "ok" and peer_run["grad_health"] == "ok"
    assert runs[("lora", "eager")]["trainable_parameters"] < runs[("full", "eager")]["trainable_parameters"]
    md = (tmp_path / "e2e-test.md").read_text()
    assert "| tiny-2x64 | lora | chronicals | ok |" in md and "MFU = " in md
    assert (tmp_path / "e2e-test-throughput.png").stat().st_size > 1000
    # a run cut by a time limit leaves its JSON: the charts can be drawn from it afterwards
    (tmp_path / "e2e-test-throughput.png").unlink()
    redraw = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "e2e.py"), "--charts-from",
                             str(tmp_path / "e2e-test.json")], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert redraw.returncode == 0, redraw.stdout + redraw.stderr
    assert (tmp_path / "e2e-test-throughput.png").stat().st_size > 1000


def test_precompile_launches_each_compiled_variant_once_untimed(monkeypatch):
    """Only variants whose compiled code is timing-independent are compiled ahead, each as one
    untimed step flagged ``precompile``, never more than ``concurrency`` at once."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import e2e

    launched, alive = [], []

    class FakeProc:
        def __init__(self, cmd, **kwargs):
            self.spec = json.loads(cmd[cmd.index("--worker") + 1])
            self.pid, self.polls = 0, 0
            launched.append(self.spec)
            alive.append(self)
            assert len(alive) <= 2, "more workers than the concurrency"

        def poll(self):
            self.polls += 1
            if self.polls < 2:
                return None
            alive.remove(self)
            return 0

    monkeypatch.setattr(e2e.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(e2e.time, "sleep", lambda s: None)
    specs = [{"variant": v, "steps": 10, "warmup": 3} for v in
             ("eager", "inductor", "liger", "chronicals", "chronicals-autotune", "chronicals-gqa")]
    e2e.precompile(specs, concurrency=2, timeout=60)
    assert [s["variant"] for s in launched] == ["inductor", "chronicals", "chronicals-gqa"]
    assert all(s["steps"] == 1 and s["warmup"] == 0 and s["precompile"] for s in launched)
    assert not alive


def test_every_option_a_variant_passes_exists_here():
    """A misspelt key costs a device call (session 26's first nomix key lived under ``triton.``):
    every key the variants hand Inductor must name a config entry here (torch 2.13; the device's
    2.11 has the same keys), and our own options must pass their validation."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import e2e
    from torch._inductor import config

    from chronicals_compile.config import make_options

    assert set(e2e.VARIANT_INDUCTOR) | set(e2e.VARIANT_OPTIONS) <= set(e2e.VARIANTS)
    for options in e2e.VARIANT_OPTIONS.values():
        make_options(**options)  # a bad name or value raises
    for variant, patches in e2e.VARIANT_INDUCTOR.items():
        for key in patches:
            owner = config
            *parents, leaf = key.split(".")
            for part in parents:
                owner = getattr(owner, part)
            assert hasattr(owner, leaf), (variant, key)
