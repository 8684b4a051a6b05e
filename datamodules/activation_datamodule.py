"""The pipeline's data side as one LightningDataModule: prompts, then the activation cache.

`prepare_data` (once per node) runs the stages that write to disk: the prompts (load, analyse,
balance, split) and, when the cache is not complete for the current config, activation collection.
`setup` (every process) reads their outputs back, and `train_dataloader` streams token activations
of every hooked layer from the memory-mapped cache, a disjoint part per DDP rank; `prompt_dataset`
serves the same cache per prompt.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from refusal_sae.activations import (
    SPLITS,
    ActivationCache,
    ActivationConfig,
    InferencePipeline,
    PromptActivations,
    TokenStream,
    template_prefix,
)
from refusal_sae.data import PromptConfig, PromptSample, Split, build_prompts, read_splits
from refusal_sae.errors import UserError
from refusal_sae.io import hold_directory
from refusal_sae.layout import RunLayout
from refusal_sae.model import ModelConfig, ModelWrapper
from refusal_sae.validate import all_of, non_negative_int, positive_int


class ActivationDataModule(L.LightningDataModule):
    """OR-Bench prompts, balanced and split, and their residual-stream activations, cached on disk.

    Args:
        prompts: where prompts come from and how they are balanced and split.
        model: the LLM whose residual stream is recorded.
        activations: which layers to record, and how the cache is written.
        run_dir: the run's output directory (`<run_dir>/data`, `<run_dir>/activations`).
        batch_size: tokens per SAE training batch (per process).
        num_workers: DataLoader worker processes reading the cache.
        train_splits: prompt splits whose tokens the SAEs train on (SAE training is unsupervised).
        train_prefix: also train on the shared chat-template prefix (the system prompt and user header, the same
            hidden states in every prompt, which the analysis never edits): off by default, so the SAEs spend
            their latents on what varies.
    """

    def __init__(
        self,
        prompts: PromptConfig = PromptConfig(),
        model: ModelConfig = ModelConfig(),
        activations: ActivationConfig = ActivationConfig(layers=[-1]),
        run_dir: str = "runs/default",
        batch_size: int = 4096,
        num_workers: int = 0,
        train_splits: tuple[Split, ...] = ("discovery", "evaluation"),
        train_prefix: bool = False,
    ) -> None:
        super().__init__()
        positive_int("data.batch_size", batch_size, 4096)
        non_negative_int("data.num_workers", num_workers, 0)
        all_of("data.train_splits", train_splits, SPLITS)
        self.prompts = prompts
        self.model_cfg = model
        self.activations = activations
        self.run_dir = Path(run_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_splits = list(train_splits)
        self.train_prefix = train_prefix
        self.splits: dict[Split, list[PromptSample]] = {}
        self.cache: ActivationCache | None = None
        self._wrapper: ModelWrapper | None = None

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)

    @property
    def cache_dir(self) -> Path:
        return Path(self.activations.cache_dir) if self.activations.cache_dir else self.layout.activations

    def llm(self) -> ModelWrapper:
        """The model, loaded on first use and kept (collection, circuit evaluation and behaviour labels share it)."""
        if self._wrapper is None:
            self._wrapper = ModelWrapper(self.model_cfg)
        return self._wrapper

    def prepare_data(self) -> None:
        """Prompts, then activations. The prompts are built in memory and written only after they fit the
        model (`max_length`) and the cache is usable or to be rebuilt, so a refused run leaves the run
        directory's prompts and reports describing its existing cache. The run directory is locked first, for
        the rest of the process: a second `fit` on it stops before writing anything."""
        hold_directory(self.run_dir, "run directory", "--run_dir")
        prompts = build_prompts(self.prompts)
        prompts.check_lengths(self.llm().encode, self.model_cfg.max_length)
        pipeline = InferencePipeline(self.llm(), self.activations, self.cache_dir)
        pipeline.check(prompts.splits)
        prompts.write(self.layout.prompts_csv, self.layout.data_report, self.layout.balanced_report)
        pipeline.run(prompts.splits)

    def setup(self, stage: str) -> None:
        self.splits = read_splits(self.layout.prompts_csv)
        self.cache = ActivationCache(self.cache_dir, verify=self.activations.verify)

    def train_dataloader(self) -> DataLoader:
        """The cache's tokens in shuffled batches, refused when a data reader (a process, or a DataLoader worker
        of one) would get less than one batch: the SAEs would take no optimiser step, and be saved and
        analysed untrained."""
        stream = TokenStream(self.cache_dir, batch_size=self.batch_size, seed=self.prompts.seed,
                             splits=self.train_splits, min_position=0 if self.train_prefix else self.template_prefix(),
                             answers=self.activations.answer_tokens > 0)
        processes = self.trainer.world_size if self.trainer is not None else 1
        workers = max(self.num_workers, 1)
        tokens = stream.tokens_per_part(processes * workers)
        if tokens < self.batch_size:
            smaller = f"lower data.batch_size to at most {tokens}, or " if tokens else ""
            fewer = " or fewer data.num_workers" if workers > 1 else ""
            raise UserError(
                f"data.batch_size={self.batch_size} exceeds the {tokens} training tokens per data reader "
                f"({processes} process(es) x {workers} DataLoader worker(s)) in splits "
                f"{', '.join(self.train_splits)} of the activation cache {self.cache_dir}, so SAE training would take "
                f"no optimiser step; {smaller}give more prompts (data.prompts.n_per_category, data.prompts.balance: "
                f"use_all){fewer}"
            )
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers)

    def template_prefix(self) -> int:
        """The shared template prefix's length in tokens, as the cache recorded it (computed from the prompts for a
        cache written before it did)."""
        recorded = self.cache.manifest.get("template_prefix")
        if recorded is not None:
            return int(recorded)
        return template_prefix(self.llm(), [s for split in self.splits.values() for s in split])

    def prompt_dataset(self, split: Split) -> PromptActivations:
        """Every token of each prompt of `split`, per prompt (for circuit discovery and evaluation)."""
        return PromptActivations(self.cache, [split])
