"""Damaged model and SAE files, and a rerun with fewer layers: one clear line and exit 2, or the right result.

Issue 14: a truncated or corrupted safetensors file, a model directory without config.json and a file named
`.gguf` that is not one each ended in a traceback; a rerun of `fit` that trained fewer layers left the old
run's SAEs beside the new ones, where `analyze` took them as this run's.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from refusal_sae.analysis import load_discovery
from refusal_sae.cli import main
from refusal_sae.errors import UserError
from refusal_sae.layout import RunLayout
from refusal_sae.model import ModelConfig, ModelWrapper
from refusal_sae.sae import SAEConfig, SAEMeta, SparseAutoencoder
from refusal_sae.sae_io import load_sae
from tests.conftest import single_thread
from tests.run_cli import cli_in_process, one_line_error
from tests.tiny_model import tiny_fit_options

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_options(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """`fit` options for the tiny pipeline (1 epoch, circuit analysis included); the model is at `<root>/model`."""
    return [*tiny_fit_options(tmp_path_factory.mktemp("tiny")), "--model.sae.num_latents", "128",
            "--trainer.max_epochs", "1"]


def model_dir_of(options: list[str]) -> Path:
    return Path(options[options.index("--data.model.name") + 1])


@pytest.fixture
def model_copy(tiny_options: list[str], tmp_path: Path) -> Path:
    """A copy of the tiny model that a test may damage."""
    return Path(shutil.copytree(model_dir_of(tiny_options), tmp_path / "model"))


def fit_error(capsys: pytest.CaptureFixture[str], options: list[str], run_dir: Path, *more: str) -> str:
    """The one `error:` line of a `fit` that must fail (exit 2, no traceback)."""
    return one_line_error(cli_in_process(capsys, "fit", *options, "--run_dir", str(run_dir), *more))


# --------------------------------------------------------------------------------------------------
# the model


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_damaged_model_weights_name_the_file(capsys: pytest.CaptureFixture[str], tiny_options: list[str],
                                             model_copy: Path, tmp_path: Path, damage: str) -> None:
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 8 + data[8:])
    error = fit_error(capsys, tiny_options, tmp_path / "run", "--data.model.name", str(model_copy))
    assert f"{weights} is truncated or corrupted" in error and "download or save the model again" in error


def test_a_missing_shard_of_a_sharded_model_is_named(model_copy: Path) -> None:
    from safetensors import safe_open

    (model_copy / "model.safetensors").rename(model_copy / "model-00001-of-00002.safetensors")
    with safe_open(str(model_copy / "model-00001-of-00002.safetensors"), framework="pt") as f:
        names = list(f.keys())
    weight_map = dict.fromkeys(names, "model-00001-of-00002.safetensors") | {names[0]: "model-00002-of-00002.safetensors"}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(UserError) as e:
        ModelWrapper(ModelConfig(name=str(model_copy)))
    assert f"{model_copy / 'model-00002-of-00002.safetensors'} not found" in str(e.value)


def test_weights_that_do_not_fill_the_configured_architecture_are_refused(model_copy: Path) -> None:
    """A config.json naming 4 layers beside weights of 2 (transformers would start layers 2 and 3 at random, with a
    warning) or of fewer layers than the weights hold: one line naming a tensor (#30 case 1)."""
    config = json.loads((model_copy / "config.json").read_text(encoding="utf-8"))
    for layers, says in ((4, "has no weight for model.layers.2."), (1, "holds weights its config.json has no place "
                                                                       "for, e.g. model.layers.1.")):
        (model_copy / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
        with pytest.raises(UserError, match=re.escape(says)) as e:
            ModelWrapper(ModelConfig(name=str(model_copy)))
        assert "do not belong together" in str(e.value)


def test_a_weight_of_another_shape_and_missing_tokenizer_files_are_one_line(model_copy: Path, tmp_path: Path) -> None:
    """Tracebacks of #30 case 16: a weight whose shape is not config.json's, a directory without the tokenizer's
    files, a GGUF file without its metadata."""
    from safetensors.torch import load_file, save_file

    pristine = Path(shutil.copytree(model_copy, tmp_path / "pristine"))
    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(n for n in tensors if n.endswith("q_proj.weight"))[0]
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(UserError, match="a weight's shape is not the one its config.json describes") as e:
        ModelWrapper(ModelConfig(name=str(model_copy)))
    assert "\n" not in str(e.value)
    for path in pristine.iterdir():
        if path.name.startswith("tokenizer"):
            path.unlink()
    with pytest.raises(UserError, match="its tokenizer cannot be built") as e:
        ModelWrapper(ModelConfig(name=str(pristine)))
    assert "\n" not in str(e.value) and "tokenizer files" in str(e.value)
    import gguf

    bare = tmp_path / "bare.gguf"  # a whole GGUF file with one tensor and no tokenizer or architecture metadata
    writer = gguf.GGUFWriter(str(bare), arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="its tokenizer cannot be built") as e:
        ModelWrapper(ModelConfig(name=str(bare)))
    assert "a GGUF file written with its architecture and tokenizer metadata" in str(e.value)


def test_integer_weights_are_refused_naming_the_tensor(model_copy: Path) -> None:
    """int8 weights (a quantized checkpoint) would be cast to float without a word; refused naming file and tensor."""
    from safetensors.torch import load_file, save_file

    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(n for n in tensors if n.endswith("q_proj.weight"))[0]
    tensors[name] = tensors[name].mul(100).to(torch.int8)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(UserError, match=re.escape(f"{weights}: {name} is stored as I8, not a float dtype")):
        ModelWrapper(ModelConfig(name=str(model_copy)))


@pytest.mark.slow
def test_model_dir_without_config_json(capsys: pytest.CaptureFixture[str], tiny_options: list[str],
                                       model_copy: Path, tmp_path: Path) -> None:
    (model_copy / "config.json").unlink()
    error = fit_error(capsys, tiny_options, tmp_path / "run", "--data.model.name", str(model_copy))
    assert f"{model_copy}: no config.json" in error and "save_pretrained" in error


def test_config_json_without_model_type(model_copy: Path) -> None:
    (model_copy / "config.json").write_text("{}")
    with pytest.raises(UserError, match="config.json names no model_type"):
        ModelWrapper(ModelConfig(name=str(model_copy)))


@pytest.mark.slow
def test_a_file_named_gguf_that_is_not_one(capsys: pytest.CaptureFixture[str], tiny_options: list[str],
                                          model_copy: Path, tmp_path: Path) -> None:
    fake = model_copy / "model.gguf"
    fake.write_text("not a model\n")
    error = fit_error(capsys, tiny_options, tmp_path / "run", "--data.model.name", str(fake))
    assert f"{fake} is not a GGUF file" in error
    with pytest.raises(UserError, match="is not a GGUF file"):  # the same file named by data.model.gguf_file
        ModelWrapper(ModelConfig(name=str(model_copy), gguf_file="model.gguf"))


def test_a_truncated_gguf_is_refused_and_a_whole_one_passes(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    whole = tmp_path / "whole.gguf"
    writer = GGUFWriter(str(whole), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(4096, dtype=np.float32).reshape(128, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(UserError, match=f"{cut} is a truncated or corrupted GGUF file"):
        ModelWrapper(ModelConfig(name=str(cut)))
    # imported here, so that the lines above also run on code without it
    from refusal_sae.loading import check_gguf_file

    check_gguf_file(whole)  # the check refuses only what is damaged


# --------------------------------------------------------------------------------------------------
# SAEs of a finished run


@pytest.fixture(scope="module")
def fitted(tiny_options: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run with SAEs for residuals_0 and residuals_1 (copied before a test changes it)."""
    run_dir = tmp_path_factory.mktemp("fitted") / "run"
    with single_thread():  # `main` itself: cli_in_process needs capsys, which a module fixture cannot have
        main(["fit", *tiny_options, "--run_dir", str(run_dir)])
    assert sorted(p.name for p in RunLayout(run_dir).saes.iterdir()) == ["residuals_0", "residuals_1"]
    return run_dir


@pytest.fixture
def run_copy(fitted: Path, tmp_path: Path) -> RunLayout:
    return RunLayout(shutil.copytree(fitted, tmp_path / "run", symlinks=True))


@pytest.mark.slow
def test_analyze_names_a_truncated_sae_file(capsys: pytest.CaptureFixture[str], run_copy: RunLayout) -> None:
    weights = run_copy.saes / "residuals_1" / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    error = one_line_error(cli_in_process(capsys, "analyze", "--run_dir", str(run_copy.root), "--name", "again"))
    assert f"{weights} is corrupted or truncated" in error


@pytest.mark.slow
def test_analyze_names_an_sae_config_with_a_null_size(capsys: pytest.CaptureFixture[str], run_copy: RunLayout) -> None:
    cfg = run_copy.saes / "residuals_0" / "cfg.json"
    cfg.write_text(json.dumps(json.loads(cfg.read_text()) | {"d_in": None}))
    error = one_line_error(cli_in_process(capsys, "analyze", "--run_dir", str(run_copy.root), "--name", "again"))
    assert f"{cfg}: model.sae.d_in: None is not a positive integer" in error
    with pytest.raises(UserError, match="model.sae.d_in: None"):
        load_sae(cfg.parent)


# --------------------------------------------------------------------------------------------------
# a rerun with fewer layers


@pytest.mark.slow
def test_overwrite_with_fewer_layers_leaves_only_the_new_saes(capsys: pytest.CaptureFixture[str],
                                                             tiny_options: list[str], run_copy: RunLayout) -> None:
    result = cli_in_process(capsys, "fit", *tiny_options, "--run_dir", str(run_copy.root),
                            "--data.activations.layers", "[1]", "--data.activations.overwrite", "true")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in run_copy.saes.parent.iterdir() if "saes" in p.name) == ["saes"]  # no temporaries
    assert [p.name for p in run_copy.saes.iterdir()] == ["residuals_1"]
    assert load_discovery(run_copy.latest).means.layers == ["residuals_1"]
    again = cli_in_process(capsys, "analyze", "--run_dir", str(run_copy.root), "--stage", "discover", "--name", "again")
    assert again.returncode == 0, again.stderr
    assert load_discovery(run_copy.analysis("again")).means.layers == ["residuals_1"]


@pytest.mark.slow
def test_analyze_takes_only_the_layers_fit_trained(capsys: pytest.CaptureFixture[str], tiny_options: list[str],
                                                   run_copy: RunLayout) -> None:
    """A rerun on the same cache that trains one of its two layers: its SAE is the only one left, and
    `analyze` analyses that layer, as the run's own analysis did, instead of asking for the other."""
    result = cli_in_process(capsys, "fit", *tiny_options, "--run_dir", str(run_copy.root),
                            "--model.layers", "[residuals_0]")
    assert result.returncode == 0, result.stderr
    assert [p.name for p in run_copy.saes.iterdir()] == ["residuals_0"]
    again = cli_in_process(capsys, "analyze", "--run_dir", str(run_copy.root), "--name", "again")
    assert again.returncode == 0, again.stderr
    assert load_discovery(run_copy.analysis("again")).means.layers == ["residuals_0"]


def test_export_clears_what_a_killed_export_left(tmp_path: Path) -> None:
    # imported here, so that the other tests of this file also run on code without it
    from refusal_sae.sae_io import export_saes

    saes = tmp_path / "saes"
    (tmp_path / ".saes.partial" / "residuals_9").mkdir(parents=True)  # a killed export's half-written set
    (saes / "residuals_5").mkdir(parents=True)
    sae = SparseAutoencoder(SAEConfig(d_in=8, num_latents=16, k=4), SAEMeta(layer="residuals_2", model="m"))
    export_saes({"residuals_2": sae}, saes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saes"]
    assert [p.name for p in saes.iterdir()] == ["residuals_2"]
    assert load_sae(saes / "residuals_2", expected_layer="residuals_2").cfg.width == 16


def test_an_sae_with_non_finite_weights_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    """A diverged SAE (NaN or inf in a weight) would turn every effect into NaN downstream: it is refused at load."""
    from refusal_sae.sae_io import save_sae

    sae = SparseAutoencoder(SAEConfig(d_in=8, num_latents=16, k=4), SAEMeta(layer="residuals_2", model="m"))
    save_sae(sae, tmp_path / "ok")
    assert load_sae(tmp_path / "ok").cfg.width == 16
    with torch.no_grad():
        sae.W_dec[3, 1] = float("nan")
        sae.b_dec[0] = float("inf")
    save_sae(sae, tmp_path / "bad")
    with pytest.raises(UserError, match=r"bad/sae.safetensors: (W_dec|b_dec) holds 1 non-finite value\(s\)") as e:
        load_sae(tmp_path / "bad")
    assert "\n" not in str(e.value)
