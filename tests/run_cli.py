"""The `python -m refusal_sae` command line as the tests run it: in a subprocess, or in this process with
its exit status and output, and the one `error:` line of a run that must fail."""

from __future__ import annotations

import subprocess
import sys

import pytest

from refusal_sae.cli import main
from tests.conftest import ROOT


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real command in a fresh interpreter (slow: imports Lightning each time, so used sparingly)."""
    return subprocess.run(
        [sys.executable, "-m", "refusal_sae", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def cli_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """`main(args)` in this process, with its exit status and output, as `cli` would report them."""
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one `error:` line of a command that failed as a user error (exit 2, no traceback)."""
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]
