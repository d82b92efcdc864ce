"""The `hf-fwp` console entry point."""

import re
import subprocess
import sys

import pytest

import hf_fwp
from hf_fwp.cli import main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"hf-fwp {hf_fwp.__version__}"
    assert main([]) == 2  # no command is a usage error, as in argparse
    assert "give a command" in capsys.readouterr().err


def test_env_reports_auto_backend(capsys):
    assert main(["env", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"auto backend on cpu +chunk", out) and out.strip().endswith("naive")


def test_bad_device_is_a_one_line_error(capsys):
    assert main(["env", "--device", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-fwp: error: device 'nonsense'") and "Traceback" not in err


def test_console_script_runs_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-m", "hf_fwp.cli", "--help"], capture_output=True, text=True, check=True)
    assert "usage: hf-fwp" in out.stdout


@pytest.mark.parametrize("args", [["--version"], ["--help"], []])
def test_version_and_help_answer_without_importing_torch(args):
    # The heavy imports take seconds on a small machine; these two answers must not wait for them.
    code = (f"import sys, hf_fwp_cli\ntry:\n    hf_fwp_cli.main({args!r})\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    if args == ["--version"]:
        assert f"hf-fwp {hf_fwp.__version__}" in out.stdout
    elif args == ["--help"]:
        assert "convert" in out.stdout
    else:  # no command: usage and a one-line error on stderr
        assert "usage: hf-fwp" in out.stderr and "give a command" in out.stderr


def test_installed_command_is_the_light_entry_point():
    from pathlib import Path

    out = subprocess.run([str(Path(sys.executable).with_name("hf-fwp")), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"hf-fwp {hf_fwp.__version__}"
