"""LightningModules: thin glue that trains the `refusal_sae` models."""

from lightning_modules.sae_module import RunDirCheckpoint, SAEModule

__all__ = ["RunDirCheckpoint", "SAEModule"]
