"""The `python -m refusal_sae` command line, run for real in a subprocess."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from refusal_sae.cli import main
from tests.conftest import ROOT, write_csv

DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


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


def test_fit_help_lists_data_model_trainer_and_callback_options() -> None:
    result = cli("fit", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--data.prompts.source", "--data.prompts.balance", "--model.sae.k", "--model.layers",
                   "--trainer.devices", "--trainer.precision", "--trainer.callbacks", "--run_dir"):
        assert option in result.stdout, option
    # field docstrings are the help text
    assert "'sample' (bundled)" in result.stdout


def test_print_config_resolves_interpolation(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "seeded.yaml"
    config.write_text(DEFAULT_CONFIG.read_text().replace("seed_everything: 0", "seed_everything: 11"))
    result = cli_in_process(capsys, "fit", "--config", str(config), "--print_config")
    assert result.returncode == 0, result.stderr
    assert "seed_everything: 11" in result.stdout
    assert "    seed: 11" in result.stdout  # data.prompts.seed: ${seed_everything}


def test_fit_runs_data_stage_and_says_what_did_not_run(tmp_path: Path) -> None:
    result = cli("fit", "--config", str(DEFAULT_CONFIG), "--run_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "data" / "prompts.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["split"] for r in rows} == {"discovery", "evaluation"}
    toxic = sum(r["refusal_label"] == "True" for r in rows)
    assert toxic == len(rows) - toxic == 120  # bundled sample: 12 toxic per category, all kept
    assert "not built yet" in result.stderr and "no SAE was trained" in result.stderr


def test_same_seed_gives_same_prompts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for run in ("a", "b"):
        assert cli_in_process(capsys, "fit", "--config", str(DEFAULT_CONFIG), "--run_dir", str(tmp_path / run)).returncode == 0
    assert (tmp_path / "a/data/prompts.csv").read_bytes() == (tmp_path / "b/data/prompts.csv").read_bytes()


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_unknown_config_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("data:\n  prompts:\n    sorce: sample\n")
    assert "does not accept option 'data.prompts.sorce'" in one_line_error(cli("fit", "--config", str(config)))


def test_bad_option_value(capsys: pytest.CaptureFixture[str]) -> None:
    error = one_line_error(cli_in_process(capsys, "fit", "--config", str(DEFAULT_CONFIG), "--data.prompts.balance", "some"))
    assert '"data.prompts.balance"' in error and "some" in error


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--data.prompts.source", "no/such/dir", "data.prompts.source: directory 'no/such/dir' not found"),
        ("--data.prompts.categories", "[hate, weapons]", "unknown category 'weapons'"),
    ],
)
def test_bad_data_input_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, option: str, value: str, message: str
) -> None:
    error = one_line_error(cli_in_process(capsys, "fit", "--config", str(DEFAULT_CONFIG), "--run_dir", str(tmp_path), option, value))
    assert message in error
    assert not (tmp_path / "data" / "prompts.csv").exists()


def test_bad_csv_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write_csv(tmp_path / "src" / "or-bench-toxic.csv", [{"prompt": "x", "topic": "hate"}], ("prompt", "topic"))
    result = cli_in_process(capsys, "fit", "--config", str(DEFAULT_CONFIG), "--run_dir", str(tmp_path / "run"),
                 "--data.prompts.source", str(tmp_path / "src"))
    assert "or-bench-toxic.csv: missing column 'category' (columns found: prompt, topic)" in one_line_error(result)
