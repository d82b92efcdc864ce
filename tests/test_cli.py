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
    assert main([]) == 0
    assert "env" in capsys.readouterr().out


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
