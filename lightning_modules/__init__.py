"""LightningModules: thin glue that trains the `refusal_sae` models."""

from lightning_modules.sae_module import SAEModule

__all__ = ["SAEModule"]
