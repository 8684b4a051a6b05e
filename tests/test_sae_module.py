"""The SAE LightningModule trains every layer's SAE from one stream of token batches."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_modules import SAEModule
from refusal_sae.sae import SAEConfig, SparseAutoencoder

pytestmark = pytest.mark.usefixtures("one_thread")


class SparseMixture(Dataset):
    """Tokens that are sparse non-negative mixtures of a fixed random dictionary, per layer."""

    def __init__(self, layers: list[str], n: int = 2048, d: int = 16, atoms: int = 32, active: int = 3) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = {}
        for layer in layers:
            dictionary = torch.randn(atoms, d, generator=g)
            codes = torch.zeros(n, atoms)
            idx = torch.rand(n, atoms, generator=g).argsort(1)[:, :active]
            codes.scatter_(1, idx, torch.rand(n, active, generator=g) + 0.5)
            self.data[layer] = codes @ dictionary

    def __len__(self) -> int:
        return len(next(iter(self.data.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {layer: x[i] for layer, x in self.data.items()}


def test_trains_one_sae_per_layer(tmp_path) -> None:
    layers = ["residuals_1", "residuals_2"]
    L.seed_everything(0)
    module = SAEModule(SAEConfig(d_in=16, num_latents=64, k=4), layers, lr=3e-3, warmup_steps=10)
    data = DataLoader(SparseMixture(layers), batch_size=64, shuffle=True)
    module.configure_model()
    with torch.no_grad():
        before = {layer: module.saes[layer](data.dataset.data[layer]).fvu.item() for layer in layers}
    trainer = L.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    for layer in layers:
        sae = module.saes[layer]
        after = sae(data.dataset.data[layer]).fvu.item()
        assert after < 0.25 and after < before[layer] / 2, (layer, before[layer], after)
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
        assert sae.meta.layer == layer
        for metric in ("fvu", "l0", "dead_fraction", "auxk_loss", "mse"):
            assert f"sae/{layer}/{metric}" in trainer.logged_metrics
    assert trainer.logged_metrics["sae/residuals_1/l0"] == 4
    saved = SparseAutoencoder.load(tmp_path / "saes" / "residuals_2", expected_layer="residuals_2")
    assert torch.equal(saved.W_dec, module.saes["residuals_2"].W_dec)
