"""The pipeline's data side as one LightningDataModule.

`prepare_data` (one process per node) runs the stages that write to disk; `setup` (every process)
reads their outputs back. Stages built so far: prompts (load, analyse, balance, split).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from refusal_sae.data import PromptConfig, PromptSample, Split, prepare_prompts, read_splits


class RefusalDataModule(L.LightningDataModule):
    """OR-Bench prompts, balanced and split into discovery and evaluation sets.

    Args:
        prompts: where prompts come from and how they are balanced and split.
        run_dir: the run's output directory; stage 1 writes into `<run_dir>/data`.
    """

    def __init__(self, prompts: PromptConfig = PromptConfig(), run_dir: str = "runs/default") -> None:
        super().__init__()
        self.prompts = prompts
        self.run_dir = Path(run_dir)
        self.splits: dict[Split, list[PromptSample]] = {}

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    def prepare_data(self) -> None:
        prepare_prompts(self.prompts, self.data_dir)

    def setup(self, stage: str) -> None:
        self.splits = read_splits(self.data_dir / "prompts.csv")
