"""SAEs brought from elsewhere (`refusal_sae.sae_io.load_sae`): SAELens directories (standard and topk, the cfg.json
of SAELens 5 and 6), raw safetensors files, and ours; each fixture is written here in its format, and the loaded
SAE's encode / decode must equal the format's own definition, written out below from SAELens' `StandardSAE`,
`TopKSAE` and `process_sae_in`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from refusal_sae.analysis import AnalysisConfig, check_loaded_saes
from refusal_sae.errors import UserError
from refusal_sae.sae_io import PretrainedSAE, load_sae, saelens_layer, save_sae
from refusal_sae.sae_quality import LayerQuality

D_IN, D_SAE = 24, 96


def weights(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D_IN, D_SAE, generator=g).to(dtype) / 4,
            "W_dec": torch.randn(D_SAE, D_IN, generator=g).to(dtype) / 4,
            "b_enc": torch.randn(D_SAE, generator=g).to(dtype) / 2,
            "b_dec": torch.randn(D_IN, generator=g).to(dtype)}


def write_saelens(directory: Path, architecture: str = "standard", *, k: int | None = None, apply_b_dec: bool = True,
                  hook: str = "blocks.1.hook_resid_post", version: int = 6, seed: int = 0, **extra) -> dict:
    """A SAELens directory: cfg.json as SAELens `version` writes it (6: hook and model under `metadata`, the
    architecture named; 5: at the top level, a topk SAE as `standard` with `activation_fn: topk`)."""
    directory.mkdir(parents=True)
    w = weights(seed)
    save_file(w, directory / "sae_weights.safetensors")
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": apply_b_dec,
           "normalize_activations": "none"}
    where = {"hook_name": hook, "model_name": "tiny", "hook_head_index": None, "prepend_bos": True}
    if version == 6:
        cfg |= {"architecture": architecture, "metadata": where} | ({"k": k} if k is not None else {})
    else:
        cfg |= where | {"architecture": "standard", "activation_fn": "topk" if architecture == "topk" else "relu",
                        "activation_fn_kwargs": {"k": k} if k is not None else {}}
    (directory / "cfg.json").write_text(json.dumps(cfg | extra))
    return w


def saelens_encode(w: dict, x: torch.Tensor, k: int | None, apply_b_dec: bool) -> torch.Tensor:
    """SAELens: sae_in = x - b_dec * apply_b_dec_to_input; hidden_pre = sae_in @ W_enc + b_enc; standard: ReLU;
    topk: the k largest of hidden_pre, ReLU'd, the rest 0."""
    pre = (x - w["b_dec"] * apply_b_dec) @ w["W_enc"] + w["b_enc"]
    if k is None:
        return pre.relu()
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


def saelens_decode(w: dict, f: torch.Tensor) -> torch.Tensor:
    return f @ w["W_dec"] + w["b_dec"]


X = torch.randn(5, 7, D_IN, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("architecture,k", [("standard", None), ("topk", 8)])
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("version", [5, 6])
def test_saelens_directories_encode_and_decode_as_saelens_defines(tmp_path: Path, architecture: str, k: int | None,
                                                                  apply_b_dec: bool, version: int) -> None:
    w = write_saelens(tmp_path / "sae", architecture, k=k, apply_b_dec=apply_b_dec, version=version)
    sae = load_sae(tmp_path / "sae", expected_layer="residuals_1", expected_d_in=D_IN)
    assert sae.meta.layer == "residuals_1" and sae.meta.model == "tiny"
    assert sae.cfg.activation == ("relu" if k is None else "topk") and sae.cfg.width == D_SAE
    want = saelens_encode(w, X, k, apply_b_dec)
    assert (want > 0).sum(-1).max() > 8 if k is None else (want > 0).sum(-1).max() == k  # ReLU: not secretly top-8
    f = sae.encode(X)
    torch.testing.assert_close(f, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(f), saelens_decode(w, want), rtol=1e-5, atol=1e-5)
    # what the ablation keeps per token (`encode_topk`): the same features, sparse
    torch.testing.assert_close(sae.densify(*sae.encode_topk(X)), f)
    assert ((sae.decode(f) + sae.error(X)).float() == X).all()


def test_a_raw_safetensors_file_loads_with_the_activation_it_is_given(tmp_path: Path) -> None:
    w = weights(2)
    save_file(w, tmp_path / "sae.safetensors")
    for activation, k in (("relu", None), ("topk", 5)):
        sae = load_sae(tmp_path / "sae.safetensors", activation=activation, k=k, expected_layer="residuals_3")
        torch.testing.assert_close(sae.encode(X), saelens_encode(w, X, k, True), rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="needs its activation: relu or topk"):
        load_sae(tmp_path / "sae.safetensors")
    with pytest.raises(UserError, match="k"):
        load_sae(tmp_path / "sae.safetensors", activation="topk", k=D_SAE + 1)


def test_a_loaded_relu_sae_saved_here_loads_back_the_same_and_is_never_trained(tmp_path: Path) -> None:
    write_saelens(tmp_path / "saelens", apply_b_dec=False)
    sae = load_sae(tmp_path / "saelens")
    save_sae(sae, tmp_path / "ours")
    again = load_sae(tmp_path / "ours", expected_layer="residuals_1")
    assert again.cfg.activation == "relu" and not again.cfg.normalize_decoder
    torch.testing.assert_close(again.encode(X), sae.encode(X), rtol=0, atol=0)
    with pytest.raises(UserError, match="model.sae.activation: 'relu' SAEs are loaded for analysis"):
        again.train()(X)


@pytest.mark.parametrize("hook,layer", [("blocks.16.hook_resid_post", "residuals_16"),
                                        ("blocks.16.hook_resid_pre", "residuals_15"),
                                        ("blocks.1.hook_resid_pre", "residuals_0")])
def test_saelens_hooks_map_to_the_residual_after_a_block(hook: str, layer: str) -> None:
    assert saelens_layer(hook) == layer


@pytest.mark.parametrize("change,field", [
    ({"architecture": "jumprelu"}, "architecture 'jumprelu' is not supported"),
    ({"architecture": "gated"}, "architecture 'gated' is not supported"),
    ({"normalize_activations": "expected_average_only_in"}, "normalize_activations is 'expected_average_only_in'"),
    ({"metadata": {"hook_name": "blocks.3.hook_mlp_out"}}, "hook_name 'blocks.3.hook_mlp_out' reads no residual"),
    ({"metadata": {"hook_name": "blocks.0.hook_resid_pre"}}, "hook_name 'blocks.0.hook_resid_pre'"),
    ({"d_sae": 95}, "W_dec has shape"),
    ({"d_in": "24"}, "d_in is '24'"),
])
def test_saelens_configs_that_are_not_read_here_are_one_line_naming_the_field(tmp_path: Path, change: dict,
                                                                              field: str) -> None:
    write_saelens(tmp_path / "sae", **change)
    with pytest.raises(UserError, match=field) as e:
        load_sae(tmp_path / "sae")
    assert "cfg.json" in str(e.value) or "sae_weights.safetensors" in str(e.value)


def test_a_topk_saelens_sae_without_k_is_refused(tmp_path: Path) -> None:
    write_saelens(tmp_path / "sae", "topk")
    with pytest.raises(UserError, match="a topk SAE needs k"):
        load_sae(tmp_path / "sae")


@pytest.mark.parametrize("damage,message", [
    (lambda w: w.pop("b_enc"), "no tensor b_enc"),
    (lambda w: w.update(W_dec=w["W_dec"][:, :-1].contiguous()), "W_dec has shape"),
    (lambda w: w["W_enc"].__setitem__((0, 0), float("nan")), "W_enc holds 1 non-finite"),
])
def test_damaged_weights_name_the_file_and_the_tensor(tmp_path: Path, damage, message: str) -> None:
    write_saelens(tmp_path / "sae")
    w = weights()
    damage(w)
    save_file(w, tmp_path / "sae" / "sae_weights.safetensors")
    with pytest.raises(UserError, match=message) as e:
        load_sae(tmp_path / "sae")
    assert "sae_weights.safetensors" in str(e.value)


def test_an_sae_for_another_layer_or_width_and_a_directory_in_no_format_are_refused(tmp_path: Path) -> None:
    write_saelens(tmp_path / "sae", hook="blocks.4.hook_resid_post")
    with pytest.raises(UserError, match="trained for layer='residuals_4' but 'residuals_1' is expected"):
        load_sae(tmp_path / "sae", expected_layer="residuals_1")
    with pytest.raises(UserError, match="d_in=24 but 896 is expected"):
        load_sae(tmp_path / "sae", expected_d_in=896)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="a SAELens directory .cfg.json \\+ sae_weights.safetensors."):
        load_sae(tmp_path / "empty")
    np.save(tmp_path / "sae.npy", np.zeros(3))
    with pytest.raises(UserError, match="must be .safetensors"):
        load_sae(tmp_path / "sae.npy", activation="relu")


def quality(layer: str, loss_recovered: float) -> LayerQuality:
    """A quality record as the quality stage writes one (only the loss recovered matters to the floor)."""
    return LayerQuality(layer=layer, n_tokens=100, n_predicted=90, fvu=0.2, fvu_content=0.2, fvu_suffix=0.2, l0=32.0,
                        dead_fraction=0.0, dense_fraction=0.0, ce_clean=2.0, ce_spliced=2.1, ce_mean=3.0,
                        loss_recovered=loss_recovered, kl_spliced=0.1, kl_mean=1.0)


def test_a_loaded_sae_that_recovers_too_little_of_the_loss_stops_the_analysis(caplog) -> None:
    """The loss-recovered floor judges loaded SAEs only (the run's own are judged, never refused), NaN included;
    `accept_weak_saes` analyses one anyway, with a warning. (On the tiny test models mean ablation barely moves the
    loss, so no SAE there falls below a floor: the rule is tested on the records the quality stage writes.)"""
    cfg = AnalysisConfig(saes={"residuals_1": PretrainedSAE("hub/sae")})
    check_loaded_saes([quality("residuals_0", 0.1), quality("residuals_1", 0.85)], cfg)  # residuals_0: the run's
    for weak in (0.5, float("nan")):
        with pytest.raises(UserError, match=r"the loaded SAE of residuals_1 \(hub/sae\) recovers .* below "
                                            r"analysis.loaded_sae_floor 0.8; .*--analysis.accept_weak_saes true"):
            check_loaded_saes([quality("residuals_1", weak)], cfg)
    check_loaded_saes([quality("residuals_1", 0.5)], AnalysisConfig(saes=cfg.saes, accept_weak_saes=True))
    assert "analysed anyway (accept_weak_saes)" in caplog.text
    with pytest.raises(UserError, match="analysis.loaded_sae_floor: 1.5"):
        AnalysisConfig(loaded_sae_floor=1.5)
