"""`fit` under bad input and interruptions on the training side: each ends in the right result or one clear
line and a non-zero exit, before any work where the input alone decides.

Issue 14: fewer tokens than one SAE batch trained nothing and saved (and analysed) untrained SAEs, exit 0; a
`${run_dir}` in a config kept the config's run directory after `--run_dir` replaced it; SIGTERM stopped
training with exit status 0; `--ckpt_path last` that found nothing trained from scratch after a warning; a
YAML syntax error named `<unicode string>`; a run directory that cannot be written was not checked up front.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from refusal_sae.layout import RunLayout
from tests.conftest import ROOT
from tests.run_cli import cli, cli_in_process, one_line_error
from tests.tiny_model import TINY_CALLBACKS, tiny_fit_options

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = ("residuals_0", "residuals_1")
CHECKPOINTS_ONLY = """
trainer:
  callbacks:
    - class_path: lightning_modules.RunDirCheckpoint
      init_args: {save_last: link}
"""
"""Callbacks that save `last.ckpt` and run no circuit analysis, so that a run is quick."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """`fit` options for one quick epoch of the tiny pipeline, checkpoints only (no analysis)."""
    root = tmp_path_factory.mktemp("tiny")
    callbacks = root / "checkpoints_only.yaml"
    callbacks.write_text(CHECKPOINTS_ONLY)
    return [*tiny_fit_options(root), "--config", str(callbacks), "--model.sae.num_latents", "64",
            "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]


def files_under(root: Path) -> list[str]:
    """Every path under `root`, relative: to see what a refused run left behind."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# ------------------------------------------------------------------------------------ case 1: batch size


@pytest.mark.slow
def test_fewer_tokens_than_one_batch_stop_before_the_first_step(
    capsys: pytest.CaptureFixture[str], tiny: list[str], tmp_path: Path
) -> None:
    """The tiny run has about a thousand tokens: a batch of 100000 would give no optimiser step at all."""
    result = cli_in_process(capsys, "fit", *tiny, "--run_dir", str(tmp_path), "--data.batch_size", "100000")
    error = one_line_error(result)
    assert "data.batch_size=100000 exceeds the" in error and "no optimiser step" in error
    assert "lower data.batch_size to at most" in error and "data.prompts.n_per_category" in error
    run = RunLayout(tmp_path)
    assert not run.saes.exists() and not run.checkpoints.exists() and not run.analysis_root.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("option", "message"),
    [("--trainer.max_epochs", "trainer.max_epochs: 0 takes no optimiser step"),
     ("--data.batch_size", "data.batch_size: 0 is not a positive integer")],
)
def test_a_zero_that_trains_nothing_is_refused_before_anything_is_written(
    capsys: pytest.CaptureFixture[str], tiny: list[str], tmp_path: Path, option: str, message: str
) -> None:
    result = cli_in_process(capsys, "fit", *tiny, "--run_dir", str(tmp_path / "run"), option, "0")
    assert message in one_line_error(result)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ case 4: run_dir


def config_deriving_from_run_dir(run_dir: Path) -> Path:
    """A config setting `run_dir` and a path derived from it (`${run_dir}/cache`), written beside `run_dir`."""
    config = run_dir.parent / "c.yaml"
    config.write_text(f"run_dir: {run_dir}\ndata:\n  activations:\n    cache_dir: ${{run_dir}}/cache\n")
    return config


@pytest.mark.slow
def test_run_dir_given_after_the_config_takes_every_path_the_config_derived_from_it(
    capsys: pytest.CaptureFixture[str], tiny: list[str], tmp_path: Path
) -> None:
    """Later arguments win, as for every LightningCLI option, and `${run_dir}` in the config follows the
    winner: nothing is written into the config's run directory."""
    config = config_deriving_from_run_dir(tmp_path / "from_config")
    given = tmp_path / "given"
    result = cli_in_process(capsys, "fit", *tiny, "--config", str(config), "--run_dir", str(given))
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "from_config").exists()
    run = RunLayout(given)
    assert (given / "cache" / "manifest.json").is_file()
    assert all((run.saes / layer / "sae.safetensors").is_file() for layer in LAYERS)
    assert (run.checkpoints / "last.ckpt").is_file() and run.prompts_csv.is_file()
    saved = yaml.safe_load(run.config.read_text(encoding="utf-8"))
    assert saved["run_dir"] == str(given) and saved["data"]["activations"]["cache_dir"] == str(given / "cache")


def test_a_run_dir_a_later_config_would_override_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`--run_dir A --config c.yaml` with c.yaml's own run_dir: later options win, so A would be dropped
    silently; it is refused instead, naming both and the order that works."""
    config = config_deriving_from_run_dir(tmp_path / "from_config")
    line = one_line_error(cli_in_process(capsys, "fit", "--run_dir", str(tmp_path / "given"), "--config", str(config),
                                         "--print_config"))
    assert f"--run_dir {tmp_path / 'given'} comes before --config {config}" in line
    assert "put --run_dir after --config" in line
    assert not (tmp_path / "given").exists() and not (tmp_path / "from_config").exists()


# ------------------------------------------------------------------------------------ case 7: SIGTERM


def sigterm_fit(args: list[str], log: Path, ready: Callable[[], bool], sig: int = signal.SIGTERM) -> str:
    """Run a real `fit` with `args` in a subprocess, send it `sig` once `ready()`, and return its one `error:` line
    after checking it exited 128 + `sig` (143 for SIGTERM, 130 for SIGINT)."""
    with open(log, "w") as out:
        fit = subprocess.Popen([sys.executable, "-m", "refusal_sae", "fit", *args], cwd=ROOT, stdout=out,
                               stderr=subprocess.STDOUT)
    try:
        give_up = time.monotonic() + 600  # only so that a hung fit cannot hang the tests
        while not ready() and fit.poll() is None and time.monotonic() < give_up:
            time.sleep(0.05)
        assert ready() and fit.poll() is None, log.read_text()
        fit.send_signal(sig)
        fit.wait(timeout=120)
    finally:
        if fit.poll() is None:
            fit.kill()
            fit.wait()
    output = log.read_text()
    assert fit.returncode == 128 + sig, output
    assert "Traceback" not in output, output
    [error] = [line for line in output.splitlines() if line.startswith("error:")]
    return error


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "by"), [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C (SIGINT)")])
def test_sigterm_during_training_exits_143_keeping_the_checkpoint_to_resume_from(
    capsys: pytest.CaptureFixture[str], tiny: list[str], tmp_path: Path, sig: int, by: str
) -> None:
    """A real SIGTERM (or SIGINT, Ctrl-C: exit 130) to a real `fit` once its first checkpoint exists; the advice it
    prints then resumes."""
    run_dir = tmp_path / "run"
    last = RunLayout(run_dir).checkpoints / "last.ckpt"
    error = sigterm_fit([*tiny, "--trainer.max_epochs", "100000", "--run_dir", str(run_dir)], tmp_path / "fit.log",
                        lambda: os.path.exists(last), sig)
    assert f"training stopped by {by}" in error and f"{last}, is kept" in error and "--ckpt_path last" in error
    epoch = torch.load(last, weights_only=True)["epoch"]
    assert not RunLayout(run_dir).saes.exists()  # an unfinished run exports no SAEs

    resumed = cli_in_process(capsys, "fit", *tiny, "--trainer.max_epochs", str(epoch + 2), "--run_dir", str(run_dir),
                             "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(last, weights_only=True)["epoch"] == epoch + 1
    assert all((RunLayout(run_dir).saes / layer / "sae.safetensors").is_file() for layer in LAYERS)


@pytest.mark.slow
def test_a_checkpoint_the_disk_cannot_take_is_one_line_and_the_previous_one_resumes(tiny: list[str],
                                                                                    tmp_path: Path) -> None:
    """The OS refuses the checkpoint's bytes (a real file-size limit, RLIMIT_FSIZE, below a checkpoint's size: the
    write fails as on a full disk, EFBIG instead of ENOSPC): `fit` ends with one line naming the checkpoint kept,
    leaves no part of the new one, and resuming from the kept one finishes the run (#30 case 11)."""
    import resource

    run_dir = tmp_path / "run"  # every fit in its own process: a fit holds its run directory until its process ends
    first = cli("fit", *tiny, "--run_dir", str(run_dir))
    assert first.returncode == 0, first.stderr
    checkpoints = RunLayout(run_dir).checkpoints
    last = checkpoints / "last.ckpt"
    before = sorted(p.name for p in checkpoints.iterdir())
    limit = last.stat().st_size // 2

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    refused = subprocess.run([sys.executable, "-m", "refusal_sae", "fit", *tiny, "--run_dir", str(run_dir),
                              "--trainer.max_epochs", "2", "--ckpt_path", "last"], cwd=ROOT, capture_output=True,
                             text=True, timeout=600, preexec_fn=small_files)
    error = one_line_error(refused)
    assert "writing checkpoint" in error and "File too large" in error and f"{last}, is intact" in error, error
    assert sorted(p.name for p in checkpoints.iterdir()) == before  # nothing half-written beside it
    assert torch.load(last, weights_only=True)["epoch"] == 0
    resumed = cli("fit", *tiny, "--run_dir", str(run_dir), "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(last, weights_only=True)["epoch"] == 1


@pytest.mark.slow
def test_sigterm_during_the_epoch_end_analysis_stops_it_at_once_and_resumes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A real SIGTERM while the last epoch's circuit analysis runs: `fit` stops there (143, one line naming the
    checkpoint kept) instead of analysing on, no analysis looks complete, and resuming finishes the run."""
    root = tmp_path / "tiny"
    root.mkdir()
    options = tiny_fit_options(root)
    slow = root / "slow_analysis.yaml"  # many random circuits: an analysis that lasts long enough to be stopped
    slow.write_text(TINY_CALLBACKS.replace("random_circuits: 2", "random_circuits: 200")
                    .replace("    - class_path: lightning_modules.RunDirCheckpoint\n",
                             "    - class_path: lightning_modules.RunDirCheckpoint\n      init_args: {save_last: link}\n"))
    options[options.index("--config", options.index("--config") + 1) + 1] = str(slow)
    run = RunLayout(tmp_path / "run")
    error = sigterm_fit([*options, "--model.sae.num_latents", "64", "--trainer.max_epochs", "2",
                         "--trainer.enable_progress_bar", "false", "--run_dir", str(run.root)], tmp_path / "fit.log",
                        run.epoch(2).discovery_json.is_file)  # the analysis left alone would run for many minutes
    assert "stopped by SIGTERM in epoch 1" in error and "is kept" in error, error
    assert torch.load(run.checkpoints / "last.ckpt", weights_only=True)["epoch"] == 0  # the epoch before
    assert run.epoch(2).root.is_dir() and not run.epoch(2).complete and not run.latest.root.exists()
    # resumed with the usual analysis: the interrupted epoch is trained again, analysed and the SAEs exported
    options[options.index(str(slow))] = str(root / "callbacks.yaml")
    resumed = cli_in_process(capsys, "fit", *options, "--model.sae.num_latents", "64", "--trainer.max_epochs", "2",
                             "--run_dir", str(run.root), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr
    assert all((run.saes / layer / "sae.safetensors").is_file() for layer in LAYERS) and run.epoch(2).complete


# ------------------------------------------------------------------------------------ case 8: --ckpt_path


def dangling_last(run_dir: Path) -> None:
    """`last.ckpt` linking to a checkpoint that was deleted."""
    run_dir.joinpath("checkpoints").mkdir(parents=True)
    run_dir.joinpath("checkpoints", "last.ckpt").symlink_to("epoch=3-step=40.ckpt")


def truncated_last(run_dir: Path) -> None:
    """`last.ckpt` cut short (a full disk, a killed copy): the start of a zip archive without its directory."""
    run_dir.joinpath("checkpoints").mkdir(parents=True)
    run_dir.joinpath("checkpoints", "last.ckpt").write_bytes(b"PK\x03\x04" + bytes(200))


@pytest.mark.parametrize(
    ("prepare", "ckpt_path", "message"),
    [
        (None, "last", "checkpoints does not exist"),  # a mistyped run_dir
        (lambda run_dir: run_dir.joinpath("checkpoints").mkdir(parents=True), "last", "no last.ckpt in"),
        (dangling_last, "last", "last.ckpt is a link to epoch=3-step=40.ckpt, which does not exist"),
        (lambda run_dir: run_dir.mkdir(), "no/such.ckpt", "--ckpt_path no/such.ckpt: no such checkpoint file"),
        (truncated_last, "last", "last.ckpt is not a complete checkpoint (cut short or damaged)"),
    ],
    ids=["mistyped-run-dir", "no-checkpoint", "dangling-link", "missing-file", "truncated"],
)
@pytest.mark.slow
def test_a_checkpoint_to_resume_that_is_not_there_stops_before_any_work(
    capsys: pytest.CaptureFixture[str], tiny: list[str], tmp_path: Path, prepare: Callable[[Path], object] | None,
    ckpt_path: str, message: str
) -> None:
    run_dir = tmp_path / "run"
    if prepare is not None:
        prepare(run_dir)
    before = files_under(run_dir)
    result = cli_in_process(capsys, "fit", *tiny, "--run_dir", str(run_dir), "--ckpt_path", ckpt_path)
    error = one_line_error(result)
    assert message in error and "leave out --ckpt_path to start afresh" in error
    assert files_under(run_dir) == before
    assert run_dir.exists() == (prepare is not None)


# ------------------------------------------------------------------------------------ config and run_dir


@pytest.mark.slow
def test_a_yaml_syntax_error_names_the_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("run_dir: runs/x\ndata:\n  batch_size: [1, 2\n")
    error = one_line_error(cli_in_process(capsys, "fit", "--config", str(config)))
    assert f'"{config}", line 3' in error and "<unicode string>" not in error


def test_analyze_names_a_config_file_with_a_yaml_syntax_error(capsys: pytest.CaptureFixture[str],
                                                              tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("analysis:\n  evaluation:\n    sizes: [1, 2\n")
    error = one_line_error(cli_in_process(capsys, "analyze", "--run_dir", str(tmp_path), "--config", str(config)))
    assert f'"{config}", line 3' in error and "<unicode string>" not in error


@pytest.mark.slow
def test_an_unknown_key_names_the_config_file_that_sets_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("data:\n  prompts:\n    source: sample\n")
    bad.write_text("data:\n  prompts:\n    sorce: sample\n")
    error = one_line_error(cli_in_process(capsys, "fit", "--config", str(good), "--config", str(bad)))
    assert error.startswith(f"error: {bad}: ") and "does not accept option 'data.prompts.sorce'" in error


@pytest.mark.slow
def test_a_broken_interpolation_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  activations:\n    cache_dir: ${nowhere}/cache\n")
    error = one_line_error(cli_in_process(capsys, "fit", "--config", str(config), "--print_config"))
    assert error.startswith("error: data.activations.cache_dir: ") and "nowhere" in error


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A directory nobody may write into: mode 0555, or for root (whom modes do not stop) a read-only tmpfs."""
    directory = tmp_path / "read_only"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(directory)],
                             check=False, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs as root: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@pytest.mark.slow
def test_a_read_only_run_dir_is_one_line_before_any_work(
    capsys: pytest.CaptureFixture[str], tiny: list[str], read_only_dir: Path
) -> None:
    run_dir = read_only_dir / "run"
    error = one_line_error(cli_in_process(capsys, "fit", *tiny, "--run_dir", str(run_dir)))
    assert str(run_dir) in error and "--run_dir" in error
    assert not run_dir.exists()


@pytest.mark.slow
def test_a_run_dir_that_is_a_file_is_one_line_before_any_work(
    capsys: pytest.CaptureFixture[str], tiny: list[str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    run_dir.write_text("not a directory")
    error = one_line_error(cli_in_process(capsys, "fit", *tiny, "--run_dir", str(run_dir)))
    assert str(run_dir) in error and "--run_dir" in error
    assert run_dir.read_text() == "not a directory"


@pytest.mark.slow
def test_a_resume_onto_a_cache_rebuilt_from_other_prompts_is_refused(
    capsys: pytest.CaptureFixture[str], tiny: list[str], tmp_path: Path
) -> None:
    """#30 case 3: the config changed to `overwrite: true` with other prompts, then `--ckpt_path last`: the
    checkpoint's SAEs would go on training on data they were not trained on. Refused in one line; the same data
    resumes."""
    run_dir = tmp_path / "run"
    first = cli_in_process(capsys, "fit", *tiny, "--run_dir", str(run_dir))
    assert first.returncode == 0, first.stderr
    other = cli_in_process(capsys, "fit", *tiny, "--run_dir", str(run_dir), "--trainer.max_epochs", "2",
                           "--data.prompts.n_per_category", "4", "--data.activations.overwrite", "true",
                           "--ckpt_path", "last")
    error = one_line_error(other)
    assert "holds SAEs for another configuration: prompts_sha256" in error
    assert "the activation cache holds other prompts than the SAEs were trained on" in error
    same = cli_in_process(capsys, "fit", *tiny, "--run_dir", str(run_dir), "--trainer.max_epochs", "2",
                          "--data.activations.overwrite", "true", "--ckpt_path", "last")
    assert same.returncode == 0, same.stderr
