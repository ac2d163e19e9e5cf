"""The README's examples run as written: its Python example without warnings, its commands as CI runs them."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_two_commands_are_where_ci_reads_them():
    install, test = _blocks("bash")[:2]
    assert install.strip().startswith("pip install torch==") and "kvcompress demo" in install
    assert "test" in re.search(r'pip install "\.\[([^\]]*)\]"', install)[1].split(",")  # the test command needs pytest
    assert test.strip() == "python -m pytest -q"


@pytest.mark.model
def test_python_example_runs_without_warnings(tmp_path):
    code = _blocks("python")[0]
    run = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-W", "error::UserWarning", "-c", code],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "1815" in run.stdout and "bytes" in run.stdout
    assert "Warning" not in run.stderr, run.stderr[-2000:]
