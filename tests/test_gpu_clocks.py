"""The benchmarks' clock sampler: parsing nvidia-smi's lines, and no figures (never an error)
where there is no nvidia-smi."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import gpu_clocks  # noqa: E402


def test_parse_skips_what_is_not_a_sample():
    text = "1980, 612.35\n[N/A], 100\nclocks.sm, power.draw\n1755, 700.10\n"
    assert gpu_clocks.parse(text) == ([(1980.0, 612.35), (1755.0, 700.10)], [])


def test_summary_is_the_mean():
    c = gpu_clocks.ClockSampler()
    c.samples = [(1980.0, 600.0), (1780.0, 700.0)]
    assert c.summary() == {"sm_mhz": 1880.0, "power_w": 650.0, "clock_samples": 2}


def test_temperature_is_read_when_present():
    assert gpu_clocks.parse("1980, 612.35, 41\n1755, 700.10, 63\n") == ([(1980.0, 612.35, 41.0),
                                                                       (1755.0, 700.10, 63.0)], [])
    c = gpu_clocks.ClockSampler()
    c.samples = [(1980.0, 600.0, 40.0), (1780.0, 700.0, 60.0)]
    assert c.summary()["temp_c"] == 50.0


def test_no_nvidia_smi_gives_no_figures(monkeypatch):
    monkeypatch.setattr(gpu_clocks.shutil, "which", lambda name: None)
    with gpu_clocks.ClockSampler() as c:
        pass
    assert c.summary() == {}


def test_physical_index_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpu_clocks.physical_index(1) == 3
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_clocks.physical_index(1) == 1


def test_clock_reasons_are_shares_of_samples():
    text = "1980, 612.35, 41, 0x0000000000000000\n1755, 700.10, 63, 0x0000000000000004\n" \
           "1700, 690.0, 64, 0x000000000000000C\n1700, 690.0, 64, bogus\n"
    samples, reasons = gpu_clocks.parse(text)
    assert len(samples) == 3 and reasons == [0, 4, 12]
    c = gpu_clocks.ClockSampler()
    c.samples, c.reasons, c.power_limit_w = samples, reasons, 700.0
    summary = c.summary()
    assert summary["clock_reasons"] == "sw_power_cap 67%, hw_slowdown 33%, none 33%"
    assert summary["power_limit_w"] == 700.0
