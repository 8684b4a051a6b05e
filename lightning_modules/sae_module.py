"""Training of one top-k SAE per hooked layer as a single LightningModule.

The SAEs are built in `configure_model`, once the activation cache is known: their layers default to
the cached layers, and `sae.d_in` must match the cache's d_model. At the end of training each SAE is
saved standalone (safetensors + cfg.json, no pickle) to `<default_root_dir>/saes/<layer>/`.

Every batch is a dict `{layer: (tokens, d_in) activations}` holding the same tokens for all layers, so
the activation cache is read once per step for every SAE. The SAEs themselves are
`refusal_sae.sae.SparseAutoencoder`; this module only adds the optimiser, the decoder-norm steps
around it, and logging under `sae/<layer>/<metric>`.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from refusal_sae.errors import UserError
from refusal_sae.sae import SAEConfig, SAEMeta, SparseAutoencoder

LOGGED = ("fvu", "auxk_loss", "mse", "l0", "dead_fraction")


def default_lr(width: int) -> float:
    """Adam learning rate that shrinks with the SAE width, 2e-4 / sqrt(width / 2**14) (sparsify's rule)."""
    return 2e-4 / math.sqrt(width / 2**14)


class SAEModule(L.LightningModule):
    """One top-k SAE per layer, trained together on the same token batches.

    Args:
        sae: shape and sparsity shared by every layer's SAE (`d_in` is the model's hidden size).
        layers: activation sites to train an SAE for, e.g. `[residuals_21, residuals_22]`; null: every
            layer of the activation cache.
        model_name: the LLM the activations come from; recorded in each SAE's cfg.json.
        lr: Adam learning rate; null picks 2e-4 / sqrt(width / 2**14).
        warmup_steps: steps of linear learning-rate warm-up from 0.
    """

    def __init__(
        self,
        sae: SAEConfig,
        layers: list[str] | None = None,
        model_name: str | None = None,
        lr: float | None = None,
        warmup_steps: int = 100,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr if lr is not None else default_lr(sae.width)
        self.warmup_steps = warmup_steps
        self.sae_cfg = sae
        self.layers = layers
        self.model_name = model_name
        self.saes: nn.ModuleDict | None = None

    def configure_model(self) -> None:
        """Build one SAE per layer, checked against the activation cache when the data module has one."""
        if self.saes is not None:
            return
        cache = getattr(self._trainer.datamodule, "cache", None) if self._trainer else None
        layers = self.layers or (cache.layers if cache else None)
        if not layers:
            raise UserError("model.layers is null and there is no activation cache to take the layers from; list them")
        if cache is not None:
            missing = [layer for layer in layers if layer not in cache.layers]
            if missing:
                raise UserError(f"model.layers: {missing[0]} is not in the activation cache ({', '.join(cache.layers)})")
            if cache.d_model != self.sae_cfg.d_in:
                raise UserError(
                    f"model.sae.d_in={self.sae_cfg.d_in} but the activation cache {cache.dir} holds "
                    f"d_model={cache.d_model}; set model.sae.d_in: {cache.d_model}"
                )
        model_name = self.model_name or (cache.manifest["config"]["model"]["name"] if cache else None)
        self.saes = nn.ModuleDict(
            {layer: SparseAutoencoder(self.sae_cfg, SAEMeta(layer=layer, model=model_name)) for layer in layers}
        )

    def on_train_end(self) -> None:
        """Save every SAE standalone, loadable without Lightning: `<default_root_dir>/saes/<layer>/`."""
        if self.trainer.is_global_zero:
            for layer, sae in self.saes.items():
                sae.save(Path(self.trainer.default_root_dir) / "saes" / layer)

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Before the very first step (not on resume), centre each SAE's b_dec on that batch's tokens.

        Rank 0's batch decides and is broadcast, so every DDP replica starts from the same weights.
        """
        if self.global_step > 0 or batch_idx > 0:
            return
        for layer, sae in self.saes.items():
            sae.init_from_data(batch[layer])
            with torch.no_grad():
                sae.b_dec.copy_(self.trainer.strategy.broadcast(sae.b_dec.detach().clone(), src=0))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        losses = []
        for layer, sae in self.saes.items():
            out = sae(batch[layer])
            for name in LOGGED:
                self.log(f"sae/{layer}/{name}", getattr(out, name), prog_bar=name == "fvu")
            losses.append(out.loss)
        return torch.stack(losses).sum()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for sae in self.saes.values():
            sae.project_decoder_grad()

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        for sae in self.saes.values():
            sae.renormalize_decoder()

    def configure_optimizers(self) -> dict[str, object]:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        warmup = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / max(1, self.warmup_steps))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}
