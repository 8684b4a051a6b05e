"""LightningDataModules: thin glue that runs `refusal_sae` data stages at Lightning's hooks."""

from datamodules.activation_datamodule import ActivationDataModule

__all__ = ["ActivationDataModule"]
