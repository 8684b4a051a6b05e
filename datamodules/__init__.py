"""LightningDataModules: thin glue that runs `refusal_sae` data stages at Lightning's hooks."""

from datamodules.refusal_datamodule import RefusalDataModule

__all__ = ["RefusalDataModule"]
