"""Top-k SAE: sparsity, exact error term, decoder constraints, training, AuxK, checkpoints, autocast."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from refusal_sae.errors import UserError
from refusal_sae.sae import SAEConfig, SAEMeta, SparseAutoencoder
from refusal_sae.sae_io import load_sae, save_sae


def sparse_data(
    n: int, dictionary: torch.Tensor, active: int, gen: torch.Generator, offset: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """n points, each a positive combination of `active` random rows of `dictionary`, plus an offset."""
    chosen = torch.rand(n, dictionary.shape[0], generator=gen).argsort(1)[:, :active]
    coefs = torch.zeros(n, dictionary.shape[0]).scatter(1, chosen, torch.rand(n, active, generator=gen) + 0.5)
    return coefs @ dictionary + offset


def unit_rows(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    rows = torch.randn(n, d, generator=gen)
    return rows / rows.norm(dim=1, keepdim=True)


def train(sae: SparseAutoencoder, batches, lr: float = 1e-2) -> None:
    """The training step the Lightning module performs: loss, firing recorded, projected grad, Adam step,
    renormalise."""
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sae.train()
    for x in batches:
        out = sae(x)
        out.loss.backward()
        sae.record_firing(out.fired, len(x))
        sae.project_decoder_grad()
        opt.step()
        opt.zero_grad()
        sae.renormalize_decoder()
    sae.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def sae() -> SparseAutoencoder:
    torch.manual_seed(0)
    return SparseAutoencoder(SAEConfig(d_in=16, num_latents=64, k=5))


def test_encode_keeps_exactly_the_k_largest_preactivations(sae):
    x = torch.randn(200, 16)
    pre = sae.pre_activations(x)
    assert ((pre > 0).sum(-1) >= 5).all()  # enough positive candidates for k non-zeros
    features = sae.encode(x)
    assert ((features != 0).sum(-1) == 5).all()
    kept = features != 0
    assert torch.equal(features[kept], pre[kept])
    smallest_kept = pre.masked_fill(~kept, torch.inf).min(-1).values
    largest_dropped = pre.masked_fill(kept, -torch.inf).max(-1).values
    assert (smallest_kept >= largest_dropped).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_plus_error_is_exactly_the_input(sae, dtype):
    x = (3 * torch.randn(300, 16) + 1).to(dtype)
    error = sae.error(x)
    assert torch.equal((sae.decode(sae.encode(x)) + error).to(dtype), x)
    out = sae(x)
    assert torch.equal((out.reconstruction + out.error).to(dtype), x)
    assert torch.equal(out.error, error)
    assert out.error.abs().max() > 0.1  # a fresh SAE reconstructs badly: the error term carries real signal


def test_decoder_rows_stay_unit_norm_after_an_optimiser_step(sae):
    sae(torch.randn(64, 16)).loss.backward()
    sae.project_decoder_grad()
    w, grad = sae.W_dec.detach(), sae.W_dec.grad
    assert grad.abs().max() > 1e-4
    torch.testing.assert_close((grad * w).sum(1), torch.zeros(64), atol=1e-7, rtol=0)
    torch.optim.SGD(sae.parameters(), lr=10.0).step()
    assert ((sae.W_dec.norm(dim=1) - 1).abs() > 1e-3).any()  # the step alone does leave the sphere
    sae.renormalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6, rtol=0)


def test_training_on_sparse_synthetic_data_reaches_low_fvu():
    gen = torch.Generator().manual_seed(1)
    dictionary, offset = unit_rows(32, 32, gen), 3.0
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=32, num_latents=128, k=8))
    sae.init_from_data(sparse_data(1024, dictionary, 3, gen, offset))
    fresh_fvu = sae(sparse_data(2048, dictionary, 3, gen, offset)).fvu.item()
    train(sae, (sparse_data(256, dictionary, 3, gen, offset) for _ in range(250)))
    with torch.no_grad():
        out = sae(sparse_data(2048, dictionary, 3, gen, offset))
    assert fresh_fvu > 0.5
    assert out.fvu.item() < 0.1
    assert 3 <= out.l0.item() <= 8


def test_auxk_leaves_fewer_dead_latents():
    """With b_dec left at zero and a large data offset, half the latents point away from the data and die.

    The main loss never reaches them; AuxK does.
    """
    gen = torch.Generator().manual_seed(5)
    dictionary = unit_rows(128, 16, gen)
    offset = 3.0 * unit_rows(1, 16, gen)[0]
    data = [sparse_data(256, dictionary, 2, gen, offset) for _ in range(100)]
    dead = {}
    for alpha in (0.0, 1 / 32):
        torch.manual_seed(0)
        sae = SparseAutoencoder(SAEConfig(d_in=16, num_latents=64, k=4, auxk_alpha=alpha, dead_tokens_threshold=512))
        train(sae, data)
        dead[alpha] = int(sae.dead_latents().sum())
    assert dead[0.0] >= 15
    assert dead[1 / 32] <= 0.75 * dead[0.0]


def test_tokens_since_fired_counts_recorded_training_tokens_only(sae):
    sae.train()
    features = []
    for x in (torch.randn(3, 16), torch.randn(2, 16)):
        out = sae(x)
        sae.record_firing(out.fired, len(x))
        features.append(out.features)
    fired_first, fired_second = ((f != 0).any(0) for f in features)
    expected = torch.full((64,), 5).masked_fill(fired_first, 2).masked_fill(fired_second, 0)
    assert torch.equal(sae.tokens_since_fired, expected)
    assert (expected == 5).any() and (expected == 2).any()
    sae(torch.randn(100, 16))  # a forward pass alone, in training mode or not, leaves the counter alone
    sae.eval()
    sae(torch.randn(100, 16))
    assert torch.equal(sae.tokens_since_fired, expected)


@pytest.mark.parametrize(
    ("cfg", "width", "k"),
    [
        (SAEConfig(d_in=16, expansion_factor=4, k_percent=0.25), 64, 16),
        (SAEConfig(d_in=10, num_latents=100, k_percent=0.05), 100, 5),
        (SAEConfig(d_in=10, num_latents=100, k_percent=0.004), 100, 1),
        (SAEConfig(d_in=8, num_latents=30, k_percent=1.0), 30, 30),
        (SAEConfig(d_in=8, expansion_factor=8), 64, 32),
    ],
)
def test_k_percent_and_expansion_factor_resolve(cfg, width, k):
    assert (cfg.width, cfg.k_active) == (width, k)
    features = SparseAutoencoder(cfg).encode(torch.randn(4, cfg.d_in))
    assert features.shape == (4, width)
    assert ((features != 0).sum(-1) <= k).all()


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    gen = torch.Generator().manual_seed(2)
    dictionary = unit_rows(32, 16, gen)
    torch.manual_seed(0)
    meta = SAEMeta(layer="residuals_21", model="google/gemma-2-2b", normalisation="unit_mean_norm")
    sae = SparseAutoencoder(SAEConfig(d_in=16, expansion_factor=4, k_percent=0.1, auxk_alpha=0.05), meta)
    sae.init_from_data(sparse_data(256, dictionary, 2, gen))
    train(sae, (sparse_data(64, dictionary, 2, gen) for _ in range(5)))
    save_sae(sae, tmp_path / "sae")

    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae.safetensors"]
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["d_in"] == 16 and cfg["num_latents"] == 64 and cfg["k"] == 6 and cfg["normalize_decoder"] is True
    assert (cfg["layer"], cfg["model"], cfg["normalisation"]) == ("residuals_21", "google/gemma-2-2b", "unit_mean_norm")

    loaded = load_sae(
        tmp_path / "sae", expected_layer="residuals_21", expected_model="google/gemma-2-2b", expected_d_in=16
    )
    assert loaded.meta == meta
    assert (loaded.cfg.width, loaded.cfg.k_active, loaded.cfg.auxk_alpha) == (64, 6, 0.05)
    x = sparse_data(100, dictionary, 2, gen)
    with torch.no_grad():
        a, b = sae(x), loaded(x)
    for field in ("features", "reconstruction", "error", "fvu"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


@pytest.mark.parametrize(
    ("kwargs", "offending"),
    [
        ({"num_latents": 64, "k": 65}, "model.sae.k: 65"),
        ({"expansion_factor": 2, "k": 40}, "model.sae.k: 40"),
        ({"num_latents": 64, "k_percent": 0}, "model.sae.k_percent: 0"),
        ({"num_latents": 64, "k_percent": 1.5}, "model.sae.k_percent: 1.5"),
        ({"num_latents": 64, "k": 4, "k_percent": 0.1}, "model.sae.k_percent: 0.1"),
        ({"num_latents": -3}, "model.sae.num_latents: -3"),
        ({"expansion_factor": 0}, "model.sae.expansion_factor: 0"),
        ({"k": 0}, "model.sae.k: 0"),
        ({"num_latents": 64, "auxk_alpha": -1.0}, "model.sae.auxk_alpha: -1.0"),
    ],
)
def test_bad_config_raises_user_error_naming_the_value(kwargs, offending):
    with pytest.raises(UserError, match=re.escape(offending)):
        SAEConfig(d_in=16, **kwargs)


def test_bad_d_in_raises_user_error():
    with pytest.raises(UserError, match="model.sae.d_in: 0 is not a positive integer"):
        SAEConfig(d_in=0)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    meta = SAEMeta(layer="residuals_21", model="google/gemma-2-2b")
    save_sae(SparseAutoencoder(SAEConfig(d_in=16, num_latents=64, k=5), meta), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_load_rejects_truncated_and_garbage_weights(checkpoint):
    weights = checkpoint / "sae.safetensors"
    data = weights.read_bytes()
    for broken in (data[: len(data) // 2], b"not a safetensors file"):
        weights.write_bytes(broken)
        with pytest.raises(UserError, match=re.escape(str(weights))):
            load_sae(checkpoint)


def test_load_rejects_missing_files(checkpoint, tmp_path):
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "nowhere" / "cfg.json"))):
        load_sae(tmp_path / "nowhere")
    (checkpoint / "sae.safetensors").unlink()
    with pytest.raises(UserError, match=re.escape(str(checkpoint / "sae.safetensors"))):
        load_sae(checkpoint)


def test_load_rejects_shapes_that_disagree_with_cfg_json(checkpoint):
    cfg_path = checkpoint / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_latents"] = 32
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"has shape \(64, 16\) but .*cfg\.json.*num_latents=32.*implies \(32, 16\)"):
        load_sae(checkpoint)


def test_load_rejects_invalid_cfg_json(checkpoint):
    (checkpoint / "cfg.json").write_text("{ truncated")
    with pytest.raises(UserError, match=re.escape(str(checkpoint / "cfg.json"))):
        load_sae(checkpoint)


@pytest.mark.parametrize(
    ("expected", "offending"),
    [
        ({"expected_layer": "residuals_12"}, "'residuals_21'"),
        ({"expected_model": "meta-llama/Llama-3.1-8B"}, "'google/gemma-2-2b'"),
        ({"expected_d_in": 4096}, "d_in=16"),
    ],
)
def test_load_rejects_checkpoint_from_another_layer_or_model(checkpoint, expected, offending):
    with pytest.raises(UserError, match=re.escape(offending)) as info:
        load_sae(checkpoint, **expected)
    assert str(next(iter(expected.values()))) in str(info.value)


def test_input_of_the_wrong_width_raises_user_error(sae):
    with pytest.raises(UserError, match="last dimension 32"):
        sae.encode(torch.randn(3, 32))


def test_geometric_median_init_ignores_outlier_tokens():
    """A few huge-norm tokens (like BOS in a residual stream) drag the mean but not the median."""
    centre = torch.full((16,), 2.0)
    x = centre + 0.1 * torch.randn(500, 16)
    x[:10] += 500.0
    sae = SparseAutoencoder(SAEConfig(d_in=16, num_latents=32, k=4))
    sae.init_from_data(x)
    assert (sae.b_dec - centre).norm() < 0.1
    sae.init_from_data(x, method="mean")
    assert (sae.b_dec - centre).norm() > 10


def test_bf16_autocast_forward_keeps_fp32_parameters_and_loss(sae):
    x = torch.randn(128, 16)
    sae.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x.bfloat16())
    assert out.features.dtype == torch.bfloat16  # the matmuls did run in bf16
    assert out.loss.dtype == out.fvu.dtype == torch.float32
    out.loss.backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in sae.parameters())
    assert torch.equal((out.reconstruction + out.error).bfloat16(), x.bfloat16())
    with torch.no_grad():
        fp32_fvu = sae(x.bfloat16().float()).fvu
    assert out.fvu.item() == pytest.approx(fp32_fvu.item(), rel=0.05)


def test_checkpoints_are_interchangeable_with_eleutherai_sparsify(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(0)
    ours = SparseAutoencoder(SAEConfig(d_in=16, num_latents=64, k=5), SAEMeta(layer="residuals_21"))
    ours.init_from_data(torch.randn(256, 16) + 1)
    save_sae(ours, tmp_path / "ours")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "ours")
    x = torch.randn(50, 16)
    with torch.no_grad():
        mine, other = ours(x), theirs(x)
    torch.testing.assert_close(other.sae_out, mine.reconstruction, atol=1e-5, rtol=1e-5)
    assert torch.equal(other.latent_indices.sort(-1).values, mine.features.nonzero()[:, 1].view(50, 5))

    theirs.save_to_disk(tmp_path / "theirs")
    reloaded = load_sae(tmp_path / "theirs")
    with torch.no_grad():
        assert torch.equal(reloaded(x).reconstruction, mine.reconstruction)


def dense_reference_loss(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor):
    """The training loss written the straightforward way: dense pre-activations, dense top-k features, dense
    matmuls; autograd differentiates all of it. What the sparse kernels must reproduce."""
    cfg = sae.cfg
    tokens = x.reshape(-1, cfg.d_in)
    pre = torch.relu((tokens - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias)
    values, indices = pre.topk(cfg.k_active, dim=-1)
    features = torch.zeros_like(pre).scatter(-1, indices, values)
    reconstruction = features @ sae.W_dec + sae.b_dec
    residual = tokens - reconstruction
    fvu = residual.pow(2).sum() / (tokens - tokens.mean(0)).pow(2).sum()
    auxk = fvu.new_zeros(())
    if dead.any():
        k_aux = min(cfg.d_in // 2, int(dead.sum()))
        aux_values, aux_indices = pre.masked_fill(~dead, -torch.inf).topk(k_aux, dim=-1)
        aux_features = torch.zeros_like(pre).scatter(-1, aux_indices, aux_values)
        target = residual.detach()
        auxk = (aux_features @ sae.W_dec - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
    return fvu + cfg.auxk_alpha * auxk, features, reconstruction


@pytest.mark.parametrize(
    ("d_in", "k", "n_dead"),
    [
        (16, 4, 0),  # sparse kernels, no AuxK
        (16, 4, 6),  # AuxK over every dead latent (n_dead <= k_aux = 8): dense (tokens, dead) block
        (16, 4, 40),  # top k_aux of the dead latents, as a block
        (8, 4, 100),  # dead latents far outnumber k_aux = 4: AuxK as k_aux (value, latent) pairs per token
        (16, 32, 20),  # k > width / SPARSE_RATIO: the dense path
    ],
)
def test_training_gradients_equal_those_of_the_dense_computation(d_in, k, n_dead):
    from refusal_sae.sparse_ops import SPARSE_RATIO

    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, num_latents=128, k=k, auxk_alpha=0.5, dead_tokens_threshold=10))
    with torch.no_grad():  # a trained-looking SAE: b_dec off zero, and negative biases, which leave tokens
        sae.b_dec.normal_()  # near b_dec with fewer than k positive pre-activations (the ReLU's mask matters)
        sae.encoder.bias.normal_(-1.0, 0.5)
        sae.W_dec.add_(0.3 * torch.randn_like(sae.W_dec))
    dead = torch.zeros(128, dtype=torch.bool)
    dead[torch.randperm(128)[:n_dead]] = True
    sae.tokens_since_fired[dead] = 10
    x = torch.randn(4, 15, d_in) + 0.5
    x[0, :5] = sae.b_dec.detach() + 0.1 * torch.randn(5, d_in)  # pre-activations close to the biases
    x.requires_grad_()
    params = dict(sae.named_parameters())
    sae.train()

    expected_loss, expected_features, expected_reconstruction = dense_reference_loss(sae, x, dead)
    expected = torch.autograd.grad(expected_loss, [x, *params.values()])
    out = sae(x)
    got = torch.autograd.grad(out.loss, [x, *params.values()])

    k_aux = min(d_in // 2, n_dead)
    assert sae.uses_sparse_kernels == (k * SPARSE_RATIO <= 128)
    assert (n_dead > SPARSE_RATIO * k_aux) == (n_dead == 100)  # the case list covers both AuxK layouts
    assert ((expected_features > 0).sum(-1) < k).any()  # some tokens have fewer than k positive features
    assert torch.equal(out.features.reshape(-1, 128), expected_features)
    torch.testing.assert_close(out.reconstruction.reshape(-1, d_in), expected_reconstruction, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, expected_loss, rtol=1e-5, atol=1e-7)
    for name, g, e in zip(["x", *params], got, expected):
        assert e.abs().max() > 1e-4, name  # every gradient is really exercised
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_forward_reports_topk_values_indices_and_fired_latents(sae):
    out = sae.train()(torch.randn(7, 3, 16))
    assert out.values.shape == out.indices.shape == (7, 3, 5)
    assert (out.indices.diff(dim=-1) > 0).all()  # ascending
    assert torch.equal(out.features.gather(-1, out.indices), out.values)
    assert torch.equal(out.fired, (out.features != 0).reshape(-1, 64).any(0))
    assert out.l0.item() == (out.features != 0).sum(-1).float().mean().item()


def test_decode_of_sparse_features_has_the_dense_gradient(sae):
    """decode() sums only the active rows, but attribution needs d(output)/d(feature) for every latent."""
    features = sae.encode(torch.randn(20, 16)).detach()
    assert (features == 0).float().mean() > 0.9
    features.requires_grad_()
    weight = torch.randn(20, 16)
    (sae.decode(features) * weight).sum().backward()
    torch.testing.assert_close(features.grad, weight @ sae.W_dec.detach().T)
    torch.testing.assert_close(sae.W_dec.grad, features.detach().T @ weight)
    torch.testing.assert_close(sae.b_dec.grad, weight.sum(0))
    with torch.no_grad():  # and dense (e.g. mean-patched) features still decode as a matmul
        dense = torch.rand(20, 64)
        torch.testing.assert_close(sae.decode(dense), dense @ sae.W_dec + sae.b_dec)


def test_bf16_autocast_gradients_are_close_to_the_fp32_ones():
    """The sparse backward under autocast: fp32 gradients for fp32 parameters, equal to fp32's up to bf16 rounding."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=32, num_latents=256, k=8, auxk_alpha=0.5, dead_tokens_threshold=10))
    x = torch.randn(256, 32) + 1
    grads = {}
    for autocast in (False, True):
        sae.zero_grad()
        sae.tokens_since_fired.zero_()[:40] = 10  # the same 40 dead latents: AuxK takes part
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = sae(x)
        out.loss.backward()
        grads[autocast] = {name: p.grad.clone() for name, p in sae.named_parameters()}
        assert all(g.dtype == torch.float32 for g in grads[autocast].values())
    for name, fp32 in grads[False].items():
        relative = (grads[True][name] - fp32).norm() / fp32.norm()
        assert relative < 0.1, (name, relative.item())  # about 0.03 here: bf16 picks a few other latents
