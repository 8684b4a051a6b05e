"""Training of one top-k SAE per hooked layer as a single LightningModule.

The SAEs are built in `configure_model`, once the activation cache is known: their layers default to
the cached layers, and `sae.d_in` must match the cache's d_model. At the end of training each SAE is
saved standalone (safetensors + cfg.json, no pickle) to `<default_root_dir>/saes/<layer>/`.

Every batch is a dict `{layer: (tokens, d_in) activations}` holding the same tokens for all layers, so
the activation cache is read once per step for every SAE. The SAEs themselves are
`refusal_sae.sae.SparseAutoencoder`; this module adds the optimiser and its schedule, the decoder-norm
steps around the optimiser step, each step's firing reported to the SAEs' dead-latent counters (the SAE
owns them, `record_firing`), checks for NaN, and logging under `sae/<layer>/<metric>` through torchmetrics.

Distributed training (`strategy: ddp`) and mixed precision (`precision: bf16-mixed`) need nothing
from the user: parameters stay fp32 (autocast only lowers the matmuls), gradients are averaged by DDP,
and each step all-reduces which latents fired on any rank and how many tokens all ranks saw before
recording them, so that every rank holds the same `tokens_since_fired` and all replicas stay identical.

Resuming (`fit --ckpt_path last`) restores weights, optimiser, schedule and dead-latent counters and
replays the same token order (the TokenStream's epoch follows the trainer's), so it ends with the SAEs
an uninterrupted run would have produced. `RunDirCheckpoint` keeps the checkpoints where `--ckpt_path
last` finds them.

Layers given a pretrained SAE (`pretrained`: SAELens, sparsify or raw weights, `refusal_sae.sae_io.load_sae`) are
loaded instead of built and never trained; they are exported to `saes/` beside the trained ones, so every later
stage reads them the same way. When every layer has one there is nothing to train: the first epoch ends at its
first batch (its epoch-end callbacks, the circuit analysis among them, still run once) and training stops.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from refusal_sae.errors import UserError
from refusal_sae.io import atomic_open
from refusal_sae.layout import RunLayout
from refusal_sae.sae import SAEConfig, SAEMeta, SparseAutoencoder
from refusal_sae.sae_io import PretrainedSAE, export_saes
from refusal_sae.validate import non_negative_int, positive_number

LOGGED = ("fvu", "mse", "cos_sim", "l0", "auxk_loss", "dead_fraction")
"""Metrics logged per layer as `sae/<layer>/<name>` (each step) and `sae/<layer>/<name>_epoch`."""
CHECKPOINT_KEY = "refusal_sae"
"""Entry of a Lightning checkpoint recording which SAEs it holds (checked before resuming)."""


def default_lr(width: int) -> float:
    """Adam learning rate that shrinks with the SAE width, 2e-4 / sqrt(width / 2**14) (sparsify's rule)."""
    return 2e-4 / math.sqrt(width / 2**14)


class FractionOfVarianceUnexplained(torchmetrics.Metric):
    """FVU pooled over every token seen (all batches of an epoch, all DDP ranks), not a mean of batch FVUs.

    Keeps float64 sums of the squared error, of x and of x squared, so that the total variance
    sum|x - mean|^2 = sum|x|^2 - |sum x|^2 / n is exact enough even when the mean is far from zero.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, d_in: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("sse", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(d_in, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_sq", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x: Tensor, reconstruction: Tensor) -> None:
        x = x.float().reshape(-1, x.shape[-1])
        self.sse += (x - reconstruction.float().reshape(x.shape)).pow(2).sum().double()
        self.sum_x += x.sum(0).double()
        self.sum_sq += x.pow(2).sum().double()
        self.n += x.shape[0]

    def compute(self) -> Tensor:
        total_variance = self.sum_sq - self.sum_x.pow(2).sum() / self.n
        return (self.sse / total_variance).float()


def layer_metrics(d_in: int) -> nn.ModuleDict:
    """The torchmetrics of one layer's SAE, one per logged name except dead_fraction (a state, not a mean)."""
    return nn.ModuleDict(
        {
            "fvu": FractionOfVarianceUnexplained(d_in),
            "mse": torchmetrics.MeanMetric(),
            "cos_sim": torchmetrics.MeanMetric(),
            "l0": torchmetrics.MeanMetric(),
            "auxk_loss": torchmetrics.MeanMetric(),
        }
    )


class RunDirCheckpoint(ModelCheckpoint):
    """A `ModelCheckpoint` that, without `dirpath`, writes to `<trainer.default_root_dir>/checkpoints`.

    Lightning's own default is the first logger's directory, which for W&B is a new run id every time,
    so `fit --ckpt_path last` would not find the previous run's `last.ckpt`; and a `dirpath:
    ${run_dir}/checkpoints` in a config file is resolved when the file is read, before `--run_dir` on
    the command line. `default_root_dir` is the run directory (the CLI links it to `run_dir`), so this
    callback always saves and finds checkpoints in `<run_dir>/checkpoints`. Every other option is
    ModelCheckpoint's (use `save_last: true` to resume with `--ckpt_path last`).
    """

    def _use_run_dir(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.realpath(RunLayout(trainer.default_root_dir).checkpoints)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._use_run_dir(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        self._use_run_dir(trainer)  # called for ckpt_path="last" before setup
        return super()._find_last_checkpoints(trainer)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """Lightning's save (a temporary file moved into place, so a failed write leaves no part of a checkpoint),
        with a full disk (or a file-size limit) as one line: the previous checkpoint, not yet replaced, resumes."""
        try:
            super()._save_checkpoint(trainer, filepath)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            kept = sorted(path for path in self._find_last_checkpoints(trainer) if os.path.exists(path))
            resume = (f"the previous checkpoint, {kept[0]}, is intact: free space and run the same command with "
                      "--ckpt_path last" if kept else "no earlier checkpoint exists: free space and run it again")
            raise UserError(f"writing checkpoint {filepath} failed ({e.strerror}) in epoch {trainer.current_epoch}; "
                            f"{resume}") from None


def saved_checkpoint(trainer: L.Trainer) -> str | None:
    """The checkpoint this fit saved last, if it is still on disk: what an interrupted run resumes from."""
    callback = trainer.checkpoint_callback
    saved = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    return saved if saved and os.path.exists(saved) else None


class SAEModule(L.LightningModule):
    """One top-k SAE per layer, trained together on the same token batches.

    Args:
        sae: shape and sparsity shared by every layer's SAE (`d_in` is the model's hidden size).
        layers: activation sites to train an SAE for, e.g. `[residuals_21, residuals_22]`; null: every
            layer of the activation cache.
        model_name: the LLM the activations come from; recorded in each SAE's cfg.json. Null: the
            activation cache's model name.
        lr: learning rate. Null: 2e-4 / sqrt(width / 2**14) for the default Adam, or the `optimizer`'s
            own `lr` when one is given; a value here overrides the optimizer's.
        warmup_steps: optimiser steps of linear learning-rate warm-up from lr / warmup_steps to lr (0: none).
        optimizer: the optimiser, e.g. `{class_path: torch.optim.AdamW, init_args: {weight_decay: 0}}`;
            null: Adam with torch's defaults, fused (`fused=True`: the same update in one kernel).
        lr_scheduler: a schedule for after the warm-up, stepped every optimiser step, e.g.
            `{class_path: torch.optim.lr_scheduler.CosineAnnealingLR, init_args: {T_max: 1000}}`;
            null: constant learning rate.
        save_all_ranks: also write every DDP rank's SAE state (weights and dead-latent counters) to
            `<default_root_dir>/saes_by_rank/rank<r>.safetensors` at the end of training, to check
            that the replicas agree. The SAEs in `saes/` come from rank 0 only.
        pretrained: SAEs loaded instead of trained, per layer, e.g. `{residuals_16: {path: sae_dir}}` (a
            SAELens, sparsify or refusal_sae directory, or a raw safetensors file with its `activation`).
    """

    def __init__(
        self,
        sae: SAEConfig,
        layers: list[str] | None = None,
        model_name: str | None = None,
        lr: float | None = None,
        warmup_steps: int = 100,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        save_all_ranks: bool = False,
        pretrained: dict[str, PretrainedSAE] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(sae, Mapping):  # hyper-parameters of a checkpoint (see on_save_checkpoint)
            sae = SAEConfig(**sae)
        if lr is not None:
            positive_number("model.lr", lr, 2e-4)
        non_negative_int("model.warmup_steps", warmup_steps, 100)
        self.save_hyperparameters()
        self.sae_cfg = sae
        self.layers = layers
        self.model_name = model_name
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.save_all_ranks = save_all_ranks
        self.pretrained = {layer: PretrainedSAE(**given) if isinstance(given, Mapping) else given
                           for layer, given in (pretrained or {}).items()}  # a checkpoint's are plain dicts
        self.saes: nn.ModuleDict | None = None
        self.metrics: nn.ModuleDict | None = None
        self._first_epoch_of_fit = False
        self._prompts: str | None = None
        """sha256 of the prompts the activation cache was built from (its manifest), once known: a checkpoint of
        SAEs trained on other prompts is not resumed."""

    # ----------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        """Build one SAE per layer, checked against the activation cache when the data module has one."""
        if self.saes is not None:
            return
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        cache = getattr(datamodule, "cache", None)
        layers = self.layers or (cache.layers if cache else None)
        if not layers and self._trainer is None:  # load_from_checkpoint: on_load_checkpoint builds the checkpoint's
            return
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
        unknown = [layer for layer in self.pretrained if layer not in layers]
        if unknown:
            raise UserError(f"model.pretrained: {unknown[0]} is not a layer of this run ({', '.join(layers)}); "
                            "name one of them, or add it to model.layers")
        model_name = self.model_name or (cache.model_name if cache else None)
        self._prompts = cache.manifest["config"].get("prompts_sha256") if cache else None
        self._build(list(layers), model_name)
        if not self.trained and self._trainer is not None and self.trainer.world_size > 1:
            raise UserError("model.pretrained gives every layer an SAE, so there is nothing to train and DDP has no "
                            "parameter to share; run this fit on one device (--trainer.devices 1)")

    def _build(self, layers: list[str], model_name: str | None) -> None:
        """The SAEs (those of `pretrained` layers loaded) and their metrics. The initial weights depend only on the global seed (torch's initial
        seed, which `seed_everything` sets), not on what consumed random numbers before, e.g. whether
        this run collected the activations or found them cached."""
        self.model_name = model_name
        device = torch.empty(0).device  # Lightning may make new tensors go straight to the accelerator
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(torch.initial_seed())
            self.saes = nn.ModuleDict(
                {layer: SparseAutoencoder(self.sae_cfg, SAEMeta(layer=layer, model=model_name)) for layer in layers}
            )
        self.metrics = nn.ModuleDict({layer: layer_metrics(self.sae_cfg.d_in) for layer in layers})
        for layer, given in self.pretrained.items():  # replacing the built ones leaves the others' weights as they were
            self.saes[layer] = given.load(layer, self.sae_cfg.d_in, model_name).requires_grad_(False)

    def _identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed by this module."""
        return {
            "layers": sorted(self.saes),
            "model": self.model_name,
            "d_in": self.sae_cfg.d_in,
            "num_latents": self.sae_cfg.width,
            "k": self.sae_cfg.k_active,
            "prompts_sha256": self._prompts,
            "pretrained": {layer: given.path for layer, given in sorted(self.pretrained.items())},
        }

    @property
    def trained(self) -> dict[str, SparseAutoencoder]:
        """The SAEs this module trains: every layer's but those loaded (`pretrained`)."""
        return {layer: sae for layer, sae in self.saes.items() if layer not in self.pretrained}

    # ----------------------------------------------------------------------------------- training
    def on_train_start(self) -> None:
        self._first_epoch_of_fit = True

    def on_train_epoch_start(self) -> None:
        """Give the token stream the trainer's epoch, so a resumed epoch replays the uninterrupted order.

        In the first epoch of a `fit`, Lightning has started the loader before this hook: it draws the
        first batch of an unsized (iterable) loader in advance, and DataLoader workers copy the stream
        when they start. A resumed run's stream then runs with the epoch it was created with (and a
        data module could not do better: while Lightning creates the loader, a trainer resumed from an
        epoch-end checkpoint still reports the finished epoch). So when the stream started with another
        epoch, it is restarted here, through Lightning's data fetcher (an internal of Lightning 2.x).
        """
        loaders = self.trainer.train_dataloader
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        started_stale = False
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            dataset = getattr(loader, "dataset", None)
            if callable(getattr(dataset, "set_epoch", None)):
                started_stale |= getattr(dataset, "epoch", self.current_epoch) != self.current_epoch
                dataset.set_epoch(self.current_epoch)
        if started_stale and self._first_epoch_of_fit:
            fetcher = getattr(self.trainer.fit_loop, "_data_fetcher", None)  # Lightning internals (2.x)
            if fetcher is None:
                raise RuntimeError("cannot restart the training data stream for the resumed epoch")
            iter(fetcher)  # a new iterator over the loader, i.e. the stream at the epoch just set
        self._first_epoch_of_fit = False

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Before the very first step (not on resume), centre each SAE's b_dec on that batch's tokens.

        Rank 0's batch decides and is broadcast, so every DDP replica starts from the same weights.
        """
        if not self.trained:  # nothing to train: this epoch ends here (Lightning's -1), its callbacks run, and fit stops
            self.trainer.should_stop = True
            return -1
        if self.global_step > 0 or batch_idx > 0:
            return
        for layer, sae in self.trained.items():
            sae.init_from_data(batch[layer])
            with torch.no_grad():
                sae.b_dec.copy_(self.trainer.strategy.broadcast(sae.b_dec.detach().clone(), src=0))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        outs, fired = {}, []
        for layer, sae in self.trained.items():
            outs[layer] = out = sae(batch[layer])
            fired.append(out.fired)  # (width,) bool, from the top-k indices: no (tokens, width) pass
        # One all-reduce for all layers: which latents fired on any rank, how many tokens all ranks saw,
        # and whether any rank's loss is not finite (so that every rank stops at the same step).
        n_local = out.indices.reshape(-1, out.indices.shape[-1]).shape[0]
        bad = [~torch.isfinite(out.loss) for out in outs.values()]
        parts = [*fired, torch.stack(bad), torch.tensor([n_local], device=self.device)]
        stats = torch.cat([part.long() for part in parts])
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        width, n_layers = self.sae_cfg.width, len(outs)
        bad_layers = stats[width * n_layers : -1].tolist()
        if any(bad_layers):
            layer = list(outs)[next(i for i, b in enumerate(bad_layers) if b)]
            self._stop(self.global_step, f"the loss of layer {layer} is {outs[layer].loss.item()} (not finite)")
        n_global = stats[-1]
        for i, (layer, sae) in enumerate(self.trained.items()):
            sae.record_firing(stats[i * width : (i + 1) * width] > 0, n_global)  # every rank's tokens
            self._log_step(layer, sae, batch[layer], outs[layer])
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return torch.stack([out.loss for out in outs.values()]).sum()

    def _log_step(self, layer: str, sae: SparseAutoencoder, x: Tensor, out: Any) -> None:
        """Step values (this rank's batch) as `sae/<layer>/<name>`; torchmetrics pool them over the epoch
        and over ranks into `sae/<layer>/<name>_epoch`."""
        metrics = self.metrics[layer]
        x = x.detach().float().reshape(-1, sae.cfg.d_in)
        reconstruction = out.reconstruction.detach().float().reshape(x.shape)
        n = x.shape[0]
        values = {
            "fvu": metrics["fvu"](x, reconstruction),
            "mse": metrics["mse"](out.mse.detach(), n),
            "cos_sim": metrics["cos_sim"](F.cosine_similarity(x, reconstruction, dim=-1)),
            "l0": metrics["l0"](out.l0.detach(), n),
            "auxk_loss": metrics["auxk_loss"](out.auxk_loss.detach()),
            "dead_fraction": sae.dead_latents().float().mean(),
        }
        for name, value in values.items():
            self.log(f"sae/{layer}/{name}", value, on_step=True, on_epoch=False, prog_bar=name == "fvu")
            if name in metrics:
                self.log(f"sae/{layer}/{name}_epoch", metrics[name], on_step=False, on_epoch=True)

    def on_train_epoch_end(self) -> None:
        for layer, sae in self.trained.items():
            # identical on every rank; sync_dist only keeps Lightning from asking for it
            self.log(f"sae/{layer}/dead_fraction_epoch", sae.dead_latents().float().mean(), sync_dist=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for sae in self.trained.values():
            sae.project_decoder_grad()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimiser step, then unit-norm decoder rows and a finiteness check, before any callback
        (a checkpoint) can see the weights."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finite = []
        for sae in self.trained.values():
            sae.renormalize_decoder()
            finite.append(torch.stack([p.isfinite().all() for p in sae.parameters()]).all())
        finite = torch.stack(finite).tolist()
        if not all(finite):
            layer = list(self.trained)[finite.index(False)]
            self._stop(self.global_step, f"the weights of layer {layer} became NaN/inf in the optimiser step")

    def _stop(self, step: int, what: str) -> None:
        """Raise before the bad step reaches the weights or a checkpoint, naming layer, step and the way out."""
        saved = saved_checkpoint(self.trainer)
        kept = (f"the last checkpoint, {saved}, holds the last good weights" if saved
                else "no checkpoint had been saved yet")
        raise UserError(
            f"training stopped at step {step} (epoch {self.current_epoch}): {what}; "
            f"lower model.lr or raise model.warmup_steps, or check the activations; {kept}"
        )

    def on_train_end(self) -> None:
        """Save every SAE standalone, loadable without Lightning: `<default_root_dir>/saes/<layer>/`, replacing
        the whole directory, so that an earlier run's SAEs of other layers do not stay beside these."""
        root = Path(self.trainer.default_root_dir)
        if self.trainer.is_global_zero:
            export_saes(self.saes, RunLayout(root).saes)
        if self.save_all_ranks:
            state = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
            with atomic_open(RunLayout(root).rank_state(self.global_rank), "wb") as f:
                f.write(safetensors_bytes(state))

    # ------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any] | None:
        if not self.trained:
            return None  # every layer's SAE is loaded (`pretrained`): no optimiser, nothing trained
        params = [p for sae in self.trained.values() for p in sae.parameters()]
        if self.optimizer_factory is None:
            # fused: one kernel per parameter instead of ~10 elementwise passes over it and its two
            # moments (on 2 CPU cores at width 7168: ~13 ms instead of ~75 ms of a ~700 ms step)
            optimizer = torch.optim.Adam(params, lr=self.lr or default_lr(self.sae_cfg.width), fused=True)
        else:
            optimizer = self.optimizer_factory(params)
            if self.lr is not None:
                for group in optimizer.param_groups:
                    group["lr"] = self.lr
        schedulers = []
        if self.warmup_steps > 0:
            warmup = self.warmup_steps
            schedulers.append(
                torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
            )
        if self.lr_scheduler_factory is not None:
            after = self.lr_scheduler_factory(optimizer)
            if isinstance(after, torch.optim.lr_scheduler.ReduceLROnPlateau):
                raise UserError(
                    "model.lr_scheduler: ReduceLROnPlateau needs a validation metric, which SAE training does "
                    "not have; use a step-based schedule such as CosineAnnealingLR"
                )
            schedulers.append(after)
        if not schedulers:
            return {"optimizer": optimizer}
        scheduler = schedulers[0] if len(schedulers) == 1 else torch.optim.lr_scheduler.SequentialLR(
            optimizer, schedulers, milestones=[self.warmup_steps]
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self._identity()
        # Plain data only, so that the checkpoint loads with torch.load(weights_only=True) (Lightning's
        # default). Under the CLI the hyper-parameters are already plain config values.
        hparams = checkpoint.get("hyper_parameters")
        if hparams:
            checkpoint["hyper_parameters"] = {key: _plain(value) for key, value in hparams.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of other SAEs before Lightning loads its tensors (a clear error instead of a
        state-dict mismatch, or worse, silently continuing another model's SAEs)."""
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        name = f"checkpoint {path}" if path else "the checkpoint"
        saved = checkpoint.get(CHECKPOINT_KEY)
        if not isinstance(saved, Mapping):
            raise UserError(
                f"{name} was not written by refusal_sae's SAE training (no '{CHECKPOINT_KEY}' entry); "
                "give a checkpoint from `fit`, or leave out --ckpt_path to start afresh"
            )
        if self.saes is None:  # SAEModule.load_from_checkpoint: no trainer called configure_model
            self._prompts = saved.get("prompts_sha256")  # no cache to compare with: the checkpoint's SAEs as they are
            self._build(list(saved["layers"]), saved.get("model"))
        current = self._identity()
        saved = {"pretrained": {}, **saved}  # checkpoints from before model.pretrained loaded none
        diffs = [f"{key} {saved.get(key)!r} (this run: {value!r})" for key, value in current.items()
                 if saved.get(key) != value and (key in saved or key != "prompts_sha256")]  # (older checkpoints)
        if any(d.startswith("prompts_sha256") for d in diffs):
            diffs.append("the activation cache holds other prompts than the SAEs were trained on")
        if diffs:
            raise UserError(
                f"{name} holds SAEs for another configuration: {'; '.join(diffs)}; resume with the config it "
                "was trained with, or leave out --ckpt_path (or use another run_dir) to start afresh"
            )


def _plain(value: Any) -> Any:
    """A hyper-parameter as plain data: dataclasses become dicts, other objects (callables) None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return None
