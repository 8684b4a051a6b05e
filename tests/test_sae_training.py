"""SAE training through the real command line on a tiny random Llama: DDP, W&B offline, resuming, bad input.

All runs share one activation cache (collected by the first of them), so each costs only its training.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from refusal_sae.layout import RunLayout
from refusal_sae.report import card_data
from refusal_sae.sae_io import load_sae
from tests.conftest import ROOT
from tests.run_cli import cli_in_process, one_line_error
from tests.tiny_model import DEFAULT_CONFIG, TINY_CALLBACKS, tiny_fit_options, tiny_held_out_hard_categories

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

LAYERS = ("residuals_0", "residuals_1")
BATCH = 64  # tokens per batch and process


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The default config (circuit callbacks with the tiny vocabulary's openers) on a tiny model, 60
    prompts and a shared activation cache, without W&B."""
    root = tmp_path_factory.mktemp("tiny")
    return [*tiny_fit_options(root), "--data.activations.cache_dir", str(root / "activations")]


def test_ddp_ranks_end_identical_with_global_dead_latent_counts_and_w_and_b_offline(
    tiny: list[str], tmp_path: Path
) -> None:
    # The default config's W&B logger writes under the config file's run_dir (interpolated when read).
    config = tmp_path / "config.yaml"
    config.write_text(DEFAULT_CONFIG.read_text().replace("run_dir: runs/default", f"run_dir: {tmp_path}"))
    args = [a for a in tiny if a not in ("--trainer.logger", "false")]
    args[args.index(str(DEFAULT_CONFIG))] = str(config)
    # the edit and trade-off stages on too, on one category: refusal rates as metrics, answers and points in tables
    category = tiny_held_out_hard_categories()[0]  # one with hard held-out prompts, for the over-refusal stage
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(TINY_CALLBACKS.replace("          validity:", "          editing: {enabled: true, categories: "
                                                f"[{category}], random_circuits: 1, max_new_tokens: 2, bootstrap: 100}}\n"
                                                f"          tradeoff: {{enabled: true, categories: [{category}], layer: "
                                                "residuals_1, feature_sizes: [2], direction_strengths: [1.0], "
                                                "direction_subtract: [], orthogonalisation: [1.0], max_new_tokens: 2, "
                                                "bootstrap: 100, transfer: null}\n"
                                                "          validity:"))
    args[args.index("--config", args.index(str(config)) + 1) + 1] = str(callbacks)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["WANDB_MODE"] = "online"  # the config's `offline: true` must win: no account, no network here
    env["WANDB_DATA_DIR"] = str(tmp_path / "wandb_data")  # where W&B stages artifacts' files (default: in $HOME)
    result = subprocess.run(
        [sys.executable, "-m", "refusal_sae", "fit", *args, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
         "--trainer.strategy", "ddp", "--trainer.max_epochs", "2", "--model.save_all_ranks", "true",
         "--model.sae.num_latents", "512", "--model.sae.k", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [load_file(RunLayout(tmp_path).rank_state(r)) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) == 10
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][name]), f"rank 1 differs from rank 0 in {name}"
    global_step = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert global_step > 4
    for layer in LAYERS:
        saved = load_sae(tmp_path / "saes" / layer, expected_layer=layer)
        assert torch.equal(saved.W_dec, ranks[0][f"saes.{layer}.W_dec"])
        # Every step counts both ranks' tokens (2 x 64), and a latent that fired on either rank is reset.
        # Counting one rank's tokens would give multiples of 64 topping out at global_step * 64.
        counts = ranks[0][f"saes.{layer}.tokens_since_fired"]
        assert (counts % (2 * BATCH) == 0).all()
        assert counts.max() == global_step * 2 * BATCH  # latents that never fired on any rank
        assert (counts == 0).any()  # those that fired in the last step

    assert "less than the current step" not in result.stderr  # W&B dropped nothing logged at an old step
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "expected one offline W&B run from rank 0"
    history = runs[0].read_bytes()
    # the circuit analysis ran once, on rank 0, and logged its metrics, curves, the points table and the heatmap
    assert RunLayout(tmp_path).latest.read_summary() is not None
    for key in ("sae/residuals_0/fvu", "sae/residuals_1/fvu_epoch", "sae/residuals_1/dead_fraction",
                "sae/residuals_0/cos_sim", "circuits/correlation/violence/span",
                "circuits/correlation/hate/sanity_passed", "circuits/correlation/violence/faithfulness",
                "circuits/correlation/curves", "circuits/correlation/similarity", "circuits/points",
                f"answers/correlation/{category}/model/toxic_refusal_rate", "circuits/answers",
                "tradeoff/features/ablate 2/hard_refusal_rate", "tradeoff/points", "tradeoff/figure"):
        assert key.encode() in history, key
    # the report's node cards as a table, a row per card, each with its top contexts as an HTML file (highlighted
    # tokens) in the table's artifact
    cards = card_data(RunLayout(tmp_path).latest)["cards"]
    [table] = runs[0].parent.glob("files/media/table/circuits/node_cards_*.table.json")
    logged = json.loads(table.read_text(encoding="utf-8"))
    assert len(logged["data"]) == len(cards) > 0
    assert [row[0] for row in logged["data"]] == list(cards) and logged["columns"][-1] == "top_contexts"
    assert b"circuits/node_cards" in history and b"media/html/" in history
    staged = [p for p in (tmp_path / "wandb_data").rglob("*") if p.is_file()]
    contexts = [text for p in staged if 'class="rs-ctx"' in (text := p.read_text(encoding="utf-8", errors="replace"))]
    assert len(contexts) == len(cards) and all("background:rgba(255,140,0," in text for text in contexts)


def test_resume_from_last_checkpoint_gives_the_saes_of_an_uninterrupted_run(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, tiny: list[str], tmp_path: Path
) -> None:
    # wide and sparse, dead after a few steps: AuxK and the dead-latent counters take part
    dead = ["--model.sae.num_latents", "512", "--model.sae.k", "4", "--model.sae.dead_tokens_threshold", "256"]
    runs = [("straight", "2", []), ("halves", "1", []), ("halves", "2", ["--ckpt_path", "last"])]
    for run, epochs, extra in runs:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            result = cli_in_process(capsys, "fit", *tiny, *dead, "--run_dir", str(tmp_path / run),
                                    "--trainer.max_epochs", epochs, *extra)
        assert result.returncode == 0, result.stderr
        restored = f"Restored all states from the checkpoint at {tmp_path / run / 'checkpoints' / 'last.ckpt'}"
        assert (restored in caplog.text) == bool(extra)
    straight, resumed = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)
                         for run in ("straight", "halves"))
    assert resumed["global_step"] == straight["global_step"] and resumed["epoch"] == 1
    for name, tensor in straight["state_dict"].items():  # weights and dead-latent counters
        assert torch.equal(resumed["state_dict"][name], tensor), name
    assert any(straight["state_dict"][f"saes.{layer}.tokens_since_fired"].max() >= 256 for layer in LAYERS)
    for layer in LAYERS:
        output = f"saes/{layer}/sae.safetensors"
        assert (tmp_path / "straight" / output).read_bytes() == (tmp_path / "halves" / output).read_bytes()


def test_resuming_with_other_saes_is_one_line_naming_checkpoint_and_difference(
    capsys: pytest.CaptureFixture[str], tiny: list[str], tmp_path: Path
) -> None:
    result = cli_in_process(capsys, "fit", *tiny, "--run_dir", str(tmp_path), "--trainer.max_epochs", "1")
    assert result.returncode == 0, result.stderr
    result = cli_in_process(capsys, "fit", *tiny, "--run_dir", str(tmp_path), "--trainer.max_epochs", "2",
                            "--model.sae.num_latents", "64", "--ckpt_path", "last")
    error = one_line_error(result)
    assert f"checkpoint {tmp_path / 'checkpoints' / 'last.ckpt'} holds SAEs for another configuration" in error
    assert "num_latents 1536 (this run: 64)" in error


def test_diverging_training_stops_with_one_line_naming_layer_and_step(
    capsys: pytest.CaptureFixture[str], tiny: list[str], tmp_path: Path
) -> None:
    result = cli_in_process(capsys, "fit", *tiny, "--run_dir", str(tmp_path), "--trainer.max_epochs", "1",
                            "--model.lr", "1e30", "--model.warmup_steps", "0")
    error = one_line_error(result)
    stopped = r"training stopped at step \d+ \(epoch 0\): the (loss|weights) of layer residuals_[01] "
    assert re.search(stopped, error), error
    assert "lower model.lr" in error and "no checkpoint had been saved yet" in error
    assert not (tmp_path / "saes").exists()


def test_optimiser_and_schedule_come_from_the_command_line(
    capsys: pytest.CaptureFixture[str], tiny: list[str], tmp_path: Path
) -> None:
    result = cli_in_process(
        capsys, "fit", *tiny, "--run_dir", str(tmp_path), "--trainer.max_epochs", "1",
        "--model.optimizer", "torch.optim.AdamW", "--model.optimizer.weight_decay", "0.25",
        "--model.lr_scheduler", "torch.optim.lr_scheduler.CosineAnnealingLR", "--model.lr_scheduler.T_max", "50",
        "--model.lr", "0.004", "--model.warmup_steps", "3",
    )
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    group = checkpoint["optimizer_states"][0]["param_groups"][0]
    assert group["weight_decay"] == 0.25 and group["initial_lr"] == 0.004 and "decoupled_weight_decay" in group
    schedule = checkpoint["lr_schedulers"][0]
    assert schedule["_milestones"] == [3] and schedule["last_epoch"] == checkpoint["global_step"]
    assert checkpoint["hyper_parameters"]["optimizer"]["class_path"] == "torch.optim.AdamW"
