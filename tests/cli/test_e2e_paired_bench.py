"""benchmarks/e2e_paired.py on the CPU: several variants in one process, one step each per round in
a rotating order, paired ratios with a distribution-free interval, losses against the first variant."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest

from chronicals_compile.testing.cli_runner import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import e2e  # noqa: E402
import e2e_paired  # noqa: E402


def _binomial_below(n: int, j: int) -> float:
    """P(Binomial(n, 1/2) < j), summed directly."""
    return sum(math.comb(n, i) for i in range(j)) / 2 ** n


@pytest.mark.parametrize("n", [6, 7, 10, 20, 30, 31])
def test_median_interval_is_the_binomial_order_statistic_interval(n):
    values = [float(v) for v in range(n, 0, -1)]  # unsorted on purpose
    low, high = e2e_paired.median_interval(values)
    j = int(low)  # values are 1..n, so the bound is its own rank
    assert high == n + 1 - j
    # the widest-tail rank whose tail probability stays within 2.5%, and the next one would exceed it
    assert _binomial_below(n, j) <= 0.025 < _binomial_below(n, j + 1)
    assert low <= e2e_paired.median(values) <= high


def test_too_few_rounds_give_no_interval_and_the_median_is_the_middle():
    assert e2e_paired.median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # P(B = 0) = 1/32 > 2.5%
    assert e2e_paired.median([3.0, 1.0, 2.0]) == 2.0
    assert e2e_paired.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert math.isnan(e2e_paired.median([]))


def test_each_variant_takes_each_position_equally_often():
    variants = ["a", "b", "c"]
    orders = [e2e_paired.rotation(variants, r) for r in range(6)]
    assert all(sorted(o) == variants for o in orders)
    for position in range(3):
        seen = [o[position] for o in orders]
        assert all(seen.count(v) == 2 for v in variants)


def test_paired_ratio_is_baseline_time_over_variant_time():
    times = {"base": [2.0, 4.0], "fast": [1.0, 2.0]}
    assert e2e_paired.paired_ratios(times, "base", "fast") == [2.0, 2.0]


def test_variants_that_cannot_share_a_process_are_refused_by_name(capsys):
    env_variant = next(iter(e2e.VARIANT_ENV))
    assert e2e_paired.main(["--device", "cpu", "--tiny", "--variants", f"chronicals,{env_variant},liger,nope"]) == 2
    err = capsys.readouterr().err
    assert f"{env_variant} sets environment variables" in err
    assert "liger patches transformers' classes" in err and "unknown variant 'nope'" in err
    assert e2e_paired.main(["--device", "cpu", "--tiny", "--variants", "chronicals"]) == 2
    assert "at least two variants" in capsys.readouterr().err
    assert e2e_paired.main(["--device", "cpu", "--tiny", "--variants", "eager,chronicals",
                            "--baselines", "inductor"]) == 2
    assert "baseline 'inductor' is not among the variants" in capsys.readouterr().err


def test_tiny_cpu_run_interleaves_compares_and_checks_losses(tmp_path, monkeypatch):
    """Three variants, six rounds: every step order is the rotation, each chronicals variant compiled
    its own graph (no cache entry shared across backends), losses equal the first variant's, the
    paired ratios have intervals; a variant failing to build is a row, the others still run."""
    from torch._dynamo.utils import counters

    order = []
    step = e2e.training_step

    def recording_step(model, trainable, optimizer, loss_step, ids, variant):
        order.append(variant)
        return step(model, trainable, optimizer, loss_step, ids, variant)

    build = e2e.build_variant

    def failing_build(spec):
        if spec["variant"] == "chronicals-nomix":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return build(spec)

    monkeypatch.setattr(e2e, "training_step", recording_step)
    monkeypatch.setattr(e2e, "build_variant", failing_build)
    swaps_before = counters["chronicals"]["linear_cross_entropy"]
    variants = ["eager", "chronicals", "chronicals-nomix", "chronicals-keep-w1"]
    code = e2e_paired.main(["--device", "cpu", "--tiny", "--variants", ",".join(variants), "--rounds", "6",
                            "--warmup", "1", "--chronicals-compiler", "aot_eager", "--out", str(tmp_path),
                            "--name", "paired"])
    assert code == 0
    live = ["eager", "chronicals", "chronicals-keep-w1"]
    warmups = live  # one warm-up step each, in the listed order
    timed = [v for r in range(6) for v in e2e_paired.rotation(variants, r) if v in live]
    assert order == warmups + timed
    assert counters["chronicals"]["linear_cross_entropy"] - swaps_before == 2

    payload = json.loads((tmp_path / "paired.json").read_text())
    assert payload["complete"] is True  # rewritten every five rounds, complete at the end
    assert payload["rounds"] == 6 and payload["baselines"] == ["eager", "chronicals"]
    runs = {r["variant"]: r for r in payload["results"]}
    assert runs["chronicals-nomix"]["status"] == "OOM beside 2 resident variant(s)"
    for v in live:
        run = runs[v]
        assert run["status"] == "ok" and len(run["step_s"]) == 6 and len(run["losses"]) == 7
        assert run["bad_grad_norm_steps"] == [] and all(g > 0 for g in run["grad_norms"])
        assert run["loss_check"] == "reference" if v == "eager" else run["loss_check"].startswith("ok (0.00%")
    for v in ("chronicals", "chronicals-keep-w1"):
        entry = runs[v]["versus"]["eager"]
        ratios = e2e_paired.paired_ratios({"eager": runs["eager"]["step_s"], v: runs[v]["step_s"]}, "eager", v)
        assert entry["rounds"] == 6 and entry["median"] == pytest.approx(e2e_paired.median(ratios))
        assert entry["interval"] is not None and entry["interval"][0] <= entry["median"] <= entry["interval"][1]
    assert "chronicals" in runs["chronicals-keep-w1"]["versus"]
    md = (tmp_path / "paired.md").read_text()
    assert "| chronicals-nomix | OOM beside 2 resident variant(s) |" in md
    assert "vs eager (95% CI)" in md and "6 paired round(s)" in md


def test_precompile_hands_every_variant_to_e2e_workers_and_a_budget_keeps_one_round(tmp_path, monkeypatch):
    """--precompile fills the compile caches through e2e.py's workers (one spec per variant, with the
    keys a worker reads); --budget stops the rounds early but never before the first one."""
    handed = []
    monkeypatch.setattr(e2e, "precompile", lambda specs, n, timeout: handed.append((specs, n, timeout)) or 0.0)
    code = e2e_paired.main(["--device", "cpu", "--tiny", "--variants", "eager,chronicals", "--rounds", "50",
                            "--warmup", "1", "--precompile", "2", "--budget", "0.001", "--chronicals-compiler",
                            "aot_eager", "--out", str(tmp_path), "--name", "budget"])
    assert code == 0
    (specs, n, timeout), = handed
    assert n == 2 and timeout == pytest.approx(0.0005)
    assert [s["variant"] for s in specs] == ["eager", "chronicals"]
    for spec in specs:
        assert {"shape", "mode", "preset", "batch", "seq", "device", "dtype", "seed", "lr", "warmup",
                "steps", "chronicals_compiler"} <= set(spec)
    payload = json.loads((tmp_path / "budget.json").read_text())
    assert payload["rounds"] == 1
