"""SAE quality as the field judges it (FVU, L0, dead and dense latents, loss recovered, KL) on the planted template
model, whose exact SAEs reconstruct the residual perfectly and whose degraded ones do not."""

from __future__ import annotations

import math

import pytest
import torch

from refusal_sae.data import PromptSample
from refusal_sae.model import ModelConfig, ModelWrapper
from refusal_sae.positions import position_scheme
from refusal_sae.sae import SAEConfig, SAEMeta, SparseAutoencoder
from refusal_sae.sae_quality import quality_table, sae_quality
from tests.conftest import first_prompts, requires_embedded, single_thread
from tests.planted import LAYERS, exact_saes, planted_prompts, template_wrapper

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("quality")
    with single_thread():
        wrapper = template_wrapper(root)
    splits = planted_prompts(12, categories=("alpha",))
    samples = splits["discovery"] + splits["evaluation"]
    return wrapper, [s.prompt for s in splits["evaluation"]], position_scheme(wrapper, samples, "positional")


def test_an_exact_sae_recovers_all_the_loss_and_a_degraded_one_does_not(planted) -> None:
    wrapper, prompts, scheme = planted
    with single_thread():
        exact = sae_quality(wrapper, exact_saes(), prompts, scheme, batch_size=4)
    assert [q.layer for q in exact] == LAYERS
    n_tokens = sum(len(ids) - scheme.prefix for ids in wrapper.encode(prompts))
    for q in exact:
        assert q.n_tokens == n_tokens and q.n_predicted == n_tokens - len(prompts)  # no next token after the last
        assert q.fvu < 1e-10 and q.ce_spliced == pytest.approx(q.ce_clean, abs=1e-5) and q.kl_spliced < 1e-6
        assert q.kl_mean > 0 and 0 < q.l0 <= 32 and 0 <= q.dead_fraction < 1
        # the random planted model predicts no better than its mean residual: no loss to recover, so undefined
        assert q.ce_mean <= q.ce_clean and math.isnan(q.loss_recovered)
    lossy = exact_saes()
    with torch.no_grad():
        lossy[LAYERS[0]].W_dec[:16] *= 0.5  # half of the directions come back at half their size
    with single_thread():
        worse = sae_quality(wrapper, lossy, prompts, scheme, batch_size=4)
    assert worse[0].fvu > 0.01 and worse[0].kl_spliced > 1e-4 and worse[1].fvu < 1e-10  # the other layer untouched
    table = quality_table(worse)
    assert table.count("\n") == 2 + len(LAYERS) and f"| {LAYERS[0]} |" in table


@pytest.mark.slow
@requires_embedded
def test_on_the_embedded_model_an_exact_sae_recovers_all_the_loss_and_a_noisy_one_part(orbench_dir) -> None:
    """The real model predicts its prompts' next tokens far better than from its mean residual: an SAE that
    reconstructs layer 12 exactly (latents +e_j and -e_j) recovers all the loss, one with its decoder perturbed a
    part of it, between 0 and 1."""
    torch.set_num_threads(2)
    wrapper = ModelWrapper(ModelConfig(name="embedded"))
    prompts = first_prompts(orbench_dir / "or-bench-hard-1k.csv", 3)
    scheme = position_scheme(wrapper, [PromptSample(p, "x", False, "hard", "t") for p in prompts], "positional")
    d = wrapper.d_model
    saes = {}
    for name, noise in (("exact", 0.0), ("noisy", 0.5)):
        sae = SparseAutoencoder(SAEConfig(d_in=d, num_latents=2 * d, k=d), SAEMeta(layer="residuals_12"))
        with torch.no_grad():
            eye = torch.cat([torch.eye(d), -torch.eye(d)])
            sae.encoder.weight.copy_(eye)
            sae.encoder.bias.zero_()
            sae.b_dec.zero_()
            sae.W_dec.copy_(eye + noise * torch.randn(2 * d, d, generator=torch.Generator().manual_seed(0)) / d ** 0.5)
        saes[name] = sae.eval()
    exact, noisy = (sae_quality(wrapper, {"residuals_12": saes[n]}, prompts, scheme, 3)[0] for n in ("exact", "noisy"))
    assert exact.ce_mean > exact.ce_clean + 1.0  # the mean residual loses the prompt
    assert exact.loss_recovered == pytest.approx(1.0, abs=1e-3) and exact.fvu < 1e-6
    assert 0.0 < noisy.loss_recovered < 1.0 and noisy.kl_spliced > exact.kl_spliced
