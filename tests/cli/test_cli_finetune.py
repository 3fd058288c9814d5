"""``chronicals finetune`` end to end on tiny settings (aot_eager or eager: Inductor is slow on this CPU).

The CLI's default really compiles with Inductor; here the hidden ``--compiler aot_eager`` keeps the
backend's passes (and their report) while skipping code generation.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from chronicals_compile.cli import checkpoint
from chronicals_compile.testing.cli_runner import error_lines, write_jsonl

TINY = ["finetune", "--model", "tiny", "--max-len", "64", "--batch-tokens", "512", "--seed", "0"]


def load_metrics(out_dir) -> dict:
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One full fine-tuning run through the backend (aot_eager), shared by the checks below."""
    from chronicals_compile.cli import main

    out = tmp_path_factory.mktemp("full")
    code = main([*TINY, "--steps", "16", "--lr", "3e-3", "--compiler", "aot_eager", "--output-dir", str(out)])
    return code, out


def test_full_run_learns_and_reports(full_run):
    code, out = full_run
    assert code == 0
    m = load_metrics(out)
    losses = m["losses"]
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) / 4 < losses[0] - 0.3, losses  # decreasing-ish: random init, ln(vocab) ~ 8.3
    assert all(g > 0 and math.isfinite(g) for g in m["grad_norms"])
    assert m["real_tokens_per_s"] > 0 and m["compiled"]
    assert m["swaps"].get("rms_norm", 0) > 0  # the backend ran its passes
    assert os.path.getsize(out / "loss.png") > 1000
    report = (out / "report.txt").read_text()
    assert "graph(s) compiled" in report and "rms_norm" in report


def test_full_run_saves_a_loadable_model(full_run):
    _, out = full_run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = out / "model"
    assert (model_dir / "config.json").exists() and (model_dir / "model.safetensors").exists()
    state = json.loads((model_dir / "trainer_state.json").read_text())
    assert state["complete"] and state["step"] == 16
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([tok("Explain json.dumps.\n")["input_ids"]])
    assert math.isfinite(model(input_ids=ids, labels=ids).loss.item())
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temporaries left


def test_local_folder_model_with_prompt_response_file(full_run, cli, tmp_path):
    """--model <folder> (the run above's output) on a user jsonl, eager."""
    _, out = full_run
    path = write_jsonl(tmp_path / "d.jsonl",
                       [{"q": f"What is {i} + {i}?", "a": f"It is {2 * i}."} for i in range(40)])
    code, stdout, err = cli("finetune", "--model", out / "model", "--dataset", path, "--prompt-field", "q",
                            "--response-field", "a", "--max-len", "32", "--steps", "2", "--no-compile",
                            "--output-dir", tmp_path / "o")
    assert code == 0, err
    assert "loss on response tokens" in stdout and "eager baseline" in stdout
    assert (tmp_path / "o" / "model" / "model.safetensors").exists()


def test_lora_run_saves_an_adapter(cli, tmp_path):
    code, stdout, err = cli(*TINY, "--steps", "4", "--lora-r", "4", "--gradient-checkpointing",
                            "--compiler", "aot_eager", "--output-dir", tmp_path)
    assert code == 0, err
    assert "LoRA r=4" in stdout and "LoRA+ ratio 16" in stdout and "gradient checkpointing" in stdout
    files = os.listdir(tmp_path / "model")
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    assert "model.safetensors" not in files
    cfg = json.loads((tmp_path / "model" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and {t.rsplit(".", 1)[-1] for t in cfg["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj",
        "gate_proj", "up_proj", "down_proj"}
    m = load_metrics(tmp_path)
    assert all(g > 0 for g in m["grad_norms"]) and m["trainable_parameters"] < m["parameters"] / 5


def test_lora_adapters_in_the_model_dtype(cli, tmp_path):
    """peft keeps adapters of a bf16 model in fp32 by default; --lora-dtype model keeps them bf16."""
    from safetensors import safe_open

    code, stdout, err = cli(*TINY, "--steps", "2", "--lora-r", "4", "--dtype", "bf16", "--lora-dtype", "model",
                            "--compiler", "aot_eager", "--output-dir", tmp_path)
    assert code == 0, err
    assert "(adapters bfloat16)" in stdout
    with safe_open(str(tmp_path / "model" / "adapter_model.safetensors"), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}, dtypes


def test_enable_and_disable_reach_the_backend(cli, tmp_path, monkeypatch):
    import chronicals_compile

    seen = {}
    real = chronicals_compile.compile

    def recording(model, **options):
        seen.update(options)
        return real(model, **options)

    monkeypatch.setattr(chronicals_compile, "compile", recording)
    code, stdout, err = cli(*TINY, "--steps", "2", "--enable", "concat_linear", "--disable", "linear_cross_entropy",
                            "--cce-mode", "lean", "--compiler", "aot_eager", "--output-dir", tmp_path)
    assert code == 0, err
    assert seen.get("cce_mode") == "lean" and seen.get("enable") == ["concat_linear"], seen
    swaps = load_metrics(tmp_path)["swaps"]
    assert swaps.get("concat_linear", 0) > 0 and "linear_cross_entropy" not in swaps, swaps
    assert all(g > 0 for g in load_metrics(tmp_path)["grad_norms"])


def test_interrupt_keeps_last_checkpoint(cli, tmp_path, monkeypatch):
    """Ctrl-C at step 5 with --save-every 2: the step-4 save is intact, nothing half-written."""
    real = torch.nn.utils.clip_grad_norm_
    calls = []

    def clip(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    code, _, err = cli(*TINY, "--steps", "8", "--save-every", "2", "--no-compile", "--output-dir", tmp_path)
    assert code == 130
    assert "interrupted at step 4/8" in err and "step 4" in err
    state = json.loads((tmp_path / "model" / "trainer_state.json").read_text())
    assert state["step"] == 4 and not state["complete"]
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []


@pytest.mark.parametrize("norm, needle", [(0.0, "gradient norm is zero at step 1"),
                                          (float("nan"), "gradient norm is nan at step 1")])
def test_unhealthy_gradient_norm_fails_clearly(cli, tmp_path, monkeypatch, norm, needle):
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(norm))
    code, _, err = cli(*TINY, "--steps", "3", "--no-compile", "--output-dir", tmp_path)
    lines = [l for l in error_lines(err) if l.startswith("chronicals:")]
    assert code == 1 and len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "model").exists()  # nothing saved from a broken run


def test_save_atomic_leaves_previous_save_on_failure(tmp_path):
    dst = tmp_path / "model"

    def good(d):
        open(os.path.join(d, "weights"), "w").write("v1")

    def interrupted(d):
        open(os.path.join(d, "weights"), "w").write("half")
        raise KeyboardInterrupt

    checkpoint.save_atomic(str(dst), good)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic(str(dst), interrupted)
    assert (dst / "weights").read_text() == "v1"
    assert os.listdir(tmp_path) == ["model"]
    checkpoint.save_atomic(str(dst), lambda d: open(os.path.join(d, "weights"), "w").write("v2"))
    assert (dst / "weights").read_text() == "v2" and os.listdir(tmp_path) == ["model"]


def test_torchrun_two_ranks_ddp(tmp_path):
    """``torchrun --nproc_per_node 2 -m chronicals_compile finetune``: two gloo ranks on the CPU,
    each on its own rows; rank 0 alone prints and saves; the logged figures are global."""
    import subprocess
    import sys

    from chronicals_compile.testing.cli_runner import REPO

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "chronicals_compile", *TINY, "--steps", "12", "--lr", "3e-3", "--compiler", "aot_eager",
           "--output-dir", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("chronicals finetune: done") == 1, result.stdout
    assert "2 ranks (DDP)" in result.stdout and "over 2 ranks" in result.stdout
    m = load_metrics(out)
    assert m["world_size"] == 2 and m["steps"] == 12
    assert all(math.isfinite(x) for x in m["losses"]) and min(m["grad_norms"]) > 0
    assert sum(m["losses"][-4:]) / 4 < m["losses"][0]
    # every step's real tokens are both ranks' rows: more than one rank's 8 x 64 could hold
    assert min(m["real_tokens_per_step"]) > 512
    assert m["swaps"].get("linear_cross_entropy") == 1 and m["swaps"].get("rms_norm") == 5
    assert os.path.isfile(out / "model" / "config.json")
