"""The SAE LightningModule trains every layer's SAE from one stream of token batches.

In-process Trainer runs on small synthetic data (sparse mixtures of a random dictionary): metrics,
mixed precision, the optimiser and its schedule, resuming, NaN handling and checkpoint checks. The real
command line, DDP included, is exercised in test_sae_training.py.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_modules import RunDirCheckpoint, SAEModule
from lightning_modules.sae_module import FractionOfVarianceUnexplained, default_lr
from refusal_sae.errors import UserError
from refusal_sae.sae import SAEConfig, SparseAutoencoder
from refusal_sae.sae_io import load_sae

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = ["residuals_1", "residuals_2"]


def sparse_mixtures(
    layers: list[str], n: int = 2048, d: int = 16, atoms: int = 32, active: int = 3
) -> dict[str, torch.Tensor]:
    """Per layer, n tokens that are sparse non-negative mixtures of a fixed random dictionary, plus an offset."""
    g = torch.Generator().manual_seed(0)
    data = {}
    for layer in layers:
        dictionary = torch.randn(atoms, d, generator=g)
        codes = torch.zeros(n, atoms)
        idx = torch.rand(n, atoms, generator=g).argsort(1)[:, :active]
        codes.scatter_(1, idx, torch.rand(n, active, generator=g) + 0.5)
        data[layer] = codes @ dictionary + 2
    return data


class SparseMixture(Dataset):
    """Map-style: one token of every layer per item."""

    def __init__(self, layers: list[str], **kwargs) -> None:
        self.data = sparse_mixtures(layers, **kwargs)

    def __len__(self) -> int:
        return len(next(iter(self.data.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {layer: x[i] for layer, x in self.data.items()}


class EpochStream(IterableDataset):
    """Like the TokenStream: batches of the same tokens for every layer, in an order fixed by (seed, epoch).

    `poison` = (layer, epoch): from that epoch on, that layer's activations are NaN.
    """

    def __init__(
        self, layers: list[str], n: int = 1024, batch_size: int = 128, poison: tuple[str, int] | None = None
    ) -> None:
        self.data = sparse_mixtures(layers, n=n)
        self.batch_size = batch_size
        self.poison = poison
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        n = len(next(iter(self.data.values())))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + self.epoch))
        for start in range(0, n - self.batch_size + 1, self.batch_size):
            rows = order[start : start + self.batch_size]
            batch = {layer: x[rows] for layer, x in self.data.items()}
            if self.poison and self.epoch >= self.poison[1]:
                batch[self.poison[0]] = torch.full_like(batch[self.poison[0]], math.nan)
            yield batch


def module(**kwargs) -> SAEModule:
    options = {"sae": SAEConfig(d_in=16, num_latents=64, k=4), "layers": LAYERS, "lr": 3e-3, "warmup_steps": 10}
    return SAEModule(**{**options, **kwargs})


def trainer(root: Path, epochs: int, **kwargs) -> L.Trainer:
    options = {"max_epochs": epochs, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": root}
    return L.Trainer(**{**options, **kwargs})


def checkpointing(root: Path, epochs: int, callbacks: tuple[Callback, ...] = (), **kwargs) -> L.Trainer:
    """A trainer that saves `<root>/checkpoints/last.ckpt` at every epoch end, as the default config does."""
    return trainer(root, epochs, enable_checkpointing=True, callbacks=[RunDirCheckpoint(save_last="link"), *callbacks],
                   **kwargs)


def fvu(sae: SparseAutoencoder, x: torch.Tensor) -> float:
    with torch.no_grad():
        return sae.eval()(x).fvu.item()


@pytest.mark.slow
def test_trains_one_sae_per_layer_and_logs_every_metric(tmp_path) -> None:
    L.seed_everything(0)
    sae_module = module()
    data = DataLoader(SparseMixture(LAYERS), batch_size=64, shuffle=True)
    sae_module.configure_model()
    before = {layer: fvu(sae_module.saes[layer], data.dataset.data[layer]) for layer in LAYERS}
    fit = trainer(tmp_path, 6)
    fit.fit(sae_module, data)
    for layer in LAYERS:
        sae = sae_module.saes[layer]
        after = fvu(sae, data.dataset.data[layer])
        assert after < 0.25 and after < before[layer] / 2, (layer, before[layer], after)
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
        assert sae.meta.layer == layer
        for metric in ("fvu", "mse", "cos_sim", "l0", "auxk_loss", "dead_fraction"):
            assert f"sae/{layer}/{metric}" in fit.logged_metrics  # last step
            assert f"sae/{layer}/{metric}_epoch" in fit.logged_metrics  # pooled over the last epoch
        # the last epoch's pooled FVU is that of the SAE that trained through it: close to the final one
        assert abs(fit.logged_metrics[f"sae/{layer}/fvu_epoch"].item() - after) < 0.1
        assert 0.9 < fit.logged_metrics[f"sae/{layer}/cos_sim_epoch"] <= 1
    assert fit.logged_metrics["sae/residuals_1/l0"] == 4
    assert fit.progress_bar_metrics.keys() >= {f"sae/{layer}/fvu" for layer in LAYERS}
    saved = load_sae(tmp_path / "saes" / "residuals_2", expected_layer="residuals_2")
    assert torch.equal(saved.W_dec, sae_module.saes["residuals_2"].W_dec)


def test_epoch_fvu_pools_every_token_not_the_batch_means() -> None:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=8, num_latents=32, k=3))
    batches = [torch.randn(50, 8) * scale + shift for scale, shift in ((1, 0), (5, 3), (0.5, -2))]
    metric = FractionOfVarianceUnexplained(8)
    with torch.no_grad():
        batch_values = [metric(x, sae.decode(sae.encode(x))) for x in batches]
        everything = torch.cat(batches)
        assert torch.allclose(batch_values[1], sae(batches[1]).fvu, rtol=1e-5)  # one batch: the SAE's own FVU
        assert torch.allclose(metric.compute(), sae(everything).fvu, rtol=1e-5)
    assert not torch.allclose(metric.compute(), torch.stack(batch_values).mean(), rtol=1e-2)


class DtypeProbe(Callback):
    """Records what mixed precision did: parameter and gradient dtypes before each optimiser step."""

    def __init__(self) -> None:
        self.param_dtypes, self.grad_dtypes = set(), set()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.param_dtypes |= {p.dtype for p in pl_module.parameters()}
        self.grad_dtypes |= {p.grad.dtype for p in pl_module.parameters() if p.grad is not None}


@pytest.mark.slow
def test_bf16_mixed_precision_keeps_fp32_parameters_and_learns(tmp_path) -> None:
    data = DataLoader(SparseMixture(LAYERS, n=1024), batch_size=64, shuffle=False)
    runs = {}
    for precision in ("bf16-mixed", "32-true"):
        L.seed_everything(0)
        sae_module, probe = module(), DtypeProbe()
        sae_module.configure_model()
        before = fvu(sae_module.saes["residuals_1"], data.dataset.data["residuals_1"])
        fit = trainer(tmp_path / precision, 4, precision=precision, callbacks=[probe])
        fit.fit(sae_module, data)
        runs[precision] = sae_module
        after = fvu(sae_module.saes["residuals_1"], data.dataset.data["residuals_1"])
        assert after < before / 2 and after < 0.35, (precision, before, after)
        assert probe.param_dtypes == probe.grad_dtypes == {torch.float32}, precision
        state = fit.optimizers[0].state_dict()["state"]
        assert {t.dtype for s in state.values() for k, t in s.items() if k != "step"} == {torch.float32}
    # the bf16 run really computed in bf16: same seed and data, different weights
    assert not torch.allclose(runs["bf16-mixed"].saes["residuals_1"].encoder.weight,
                              runs["32-true"].saes["residuals_1"].encoder.weight, atol=1e-4)


def lrs(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list[float]:
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_default_optimiser_is_adam_with_linear_warmup() -> None:
    sae_module = module(lr=None, warmup_steps=4)
    sae_module.configure_model()
    config = sae_module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert type(optimizer) is torch.optim.Adam and config["lr_scheduler"]["interval"] == "step"
    lr = default_lr(64)
    assert lrs(optimizer, scheduler, 6) == pytest.approx([lr / 4, lr / 2, 3 * lr / 4, lr, lr, lr])


def test_optimiser_and_schedule_after_the_warmup_are_configurable() -> None:
    sae_module = module(
        lr=0.1, warmup_steps=2,
        optimizer=functools.partial(torch.optim.AdamW, lr=0.5, weight_decay=0.3),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=4),
    )
    sae_module.configure_model()
    config = sae_module.configure_optimizers()
    optimizer = config["optimizer"]
    assert type(optimizer) is torch.optim.AdamW and optimizer.param_groups[0]["weight_decay"] == 0.3
    cosine = [0.1 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(5)]
    assert lrs(optimizer, config["lr_scheduler"]["scheduler"], 7) == pytest.approx([0.05, 0.1, *cosine])
    # no model.lr: the optimiser's own
    sae_module = module(lr=None, warmup_steps=0, optimizer=functools.partial(torch.optim.SGD, lr=0.7))
    sae_module.configure_model()
    config = sae_module.configure_optimizers()
    assert config["optimizer"].param_groups[0]["lr"] == 0.7 and "lr_scheduler" not in config


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": 0.0}, "model.lr: 0.0 is not a positive number"),
        ({"warmup_steps": -1}, "model.warmup_steps: -1 is not an integer >= 0"),
        ({"lr_scheduler": functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau)},
         "ReduceLROnPlateau needs a validation metric"),
    ],
)
def test_bad_optimisation_options_raise_user_error(options, message) -> None:
    with pytest.raises(UserError, match=message):
        sae_module = module(**options)
        sae_module.configure_model()
        sae_module.configure_optimizers()


class ResumeProbe(Callback):
    """What the resumed fit starts from: the module and optimiser right after restoring, and b_dec in the
    first resumed step, after the module's on_train_batch_start (where a fresh run sets b_dec)."""

    def __init__(self) -> None:
        self.start = None
        self.b_dec_first_step = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.exp_avg = {i: s["exp_avg"].clone() for i, s in trainer.optimizers[0].state_dict()["state"].items()}
        self.global_step = trainer.global_step

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.b_dec_first_step is None:
            self.b_dec_first_step = {layer: sae.b_dec.detach().clone() for layer, sae in pl_module.saes.items()}


@pytest.mark.slow
def test_resume_restores_everything_and_ends_where_an_uninterrupted_run_does(tmp_path) -> None:
    L.seed_everything(0)
    straight = module(sae=SAEConfig(d_in=16, num_latents=64, k=4, dead_tokens_threshold=256))
    checkpointing(tmp_path / "straight", 4).fit(straight, DataLoader(EpochStream(LAYERS), batch_size=None))

    L.seed_everything(0)
    first = module(sae=SAEConfig(d_in=16, num_latents=64, k=4, dead_tokens_threshold=256))
    checkpointing(tmp_path / "halves", 2).fit(first, DataLoader(EpochStream(LAYERS), batch_size=None))
    checkpoint = torch.load(tmp_path / "halves" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 16

    L.seed_everything(1)  # a different seed: nothing but the checkpoint may decide the rest
    second, probe = module(sae=SAEConfig(d_in=16, num_latents=64, k=4, dead_tokens_threshold=256)), ResumeProbe()
    fit = checkpointing(tmp_path / "halves", 4, callbacks=(probe,))
    fit.fit(second, DataLoader(EpochStream(LAYERS), batch_size=None), ckpt_path="last")

    # restored: weights, dead-latent counters, optimiser moments, step
    assert probe.global_step == 16
    for name, tensor in checkpoint["state_dict"].items():
        assert torch.equal(probe.start[name], tensor), name
    assert any(checkpoint["state_dict"][f"saes.{layer}.tokens_since_fired"].max() > 0 for layer in LAYERS)
    for index, state in checkpoint["optimizer_states"][0]["state"].items():
        assert torch.equal(probe.exp_avg[index], state["exp_avg"])
    # b_dec was not re-initialised from the first resumed batch
    for layer in LAYERS:
        assert torch.equal(probe.b_dec_first_step[layer], checkpoint["state_dict"][f"saes.{layer}.b_dec"])
    # and the end is the uninterrupted run's, bit for bit
    for name, tensor in straight.state_dict().items():
        assert torch.equal(second.state_dict()[name], tensor), name


def test_checkpoints_stay_in_the_run_directory_whatever_the_logger(tmp_path) -> None:
    """Lightning's default puts them in the logger's versioned directory, where `ckpt_path="last"` of the
    next run (a new version) would not look."""
    data = DataLoader(EpochStream(LAYERS, n=256), batch_size=None)
    for epochs, ckpt_path in ((1, None), (2, "last")):
        L.seed_everything(0)
        fit = checkpointing(tmp_path, epochs, logger=CSVLogger(tmp_path / "logs"))
        fit.fit(module(), data, ckpt_path=ckpt_path)
        assert fit.ckpt_path == (str(tmp_path / "checkpoints" / "last.ckpt") if ckpt_path else None)
    assert sorted(p.name for p in (tmp_path / "logs" / "lightning_logs").iterdir()) == ["version_0", "version_1"]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1


def test_nan_loss_stops_naming_layer_and_step_and_keeps_the_last_good_checkpoint(tmp_path) -> None:
    L.seed_everything(0)
    sae_module = module()
    stream = EpochStream(LAYERS, poison=("residuals_2", 2))  # NaN activations from the third epoch on
    with pytest.raises(UserError) as error:
        checkpointing(tmp_path, 4).fit(sae_module, DataLoader(stream, batch_size=None))
    message = str(error.value)
    assert "\n" not in message
    assert "training stopped at step 16 (epoch 2): the loss of layer residuals_2 is nan" in message
    assert f"the last checkpoint, {tmp_path / 'checkpoints' / 'last.ckpt'}, holds the last good weights" in message
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 16
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())
    assert all(torch.isfinite(p).all() for p in sae_module.parameters())  # the bad step never reached the weights
    assert not (tmp_path / "saes").exists()


def test_an_optimiser_step_that_breaks_the_weights_stops_training(tmp_path) -> None:
    L.seed_everything(0)
    sae_module = module(lr=None, warmup_steps=0, optimizer=functools.partial(torch.optim.SGD, lr=math.inf))
    with pytest.raises(UserError, match=r"training stopped at step 0 \(epoch 0\): the weights of layer residuals_1 "
                                        r"became NaN/inf in the optimiser step; .*; no checkpoint had been saved yet"):
        checkpointing(tmp_path, 1).fit(sae_module, DataLoader(EpochStream(LAYERS, n=256), batch_size=None))


@pytest.mark.parametrize(
    ("options", "difference"),
    [
        ({"layers": ["residuals_1", "residuals_3"]},
         "layers ['residuals_1', 'residuals_2'] (this run: ['residuals_1', 'residuals_3'])"),
        ({"model_name": "other/model"}, "model 'tiny/model' (this run: 'other/model')"),
        ({"sae": SAEConfig(d_in=16, num_latents=128, k=4)}, "num_latents 64 (this run: 128)"),
    ],
)
def test_resuming_a_checkpoint_of_other_saes_is_refused(tmp_path, options, difference) -> None:
    L.seed_everything(0)
    data = DataLoader(EpochStream(LAYERS, n=256), batch_size=None)
    checkpointing(tmp_path, 1).fit(module(model_name="tiny/model"), data)
    path = tmp_path / "checkpoints" / "last.ckpt"
    other = module(**{"model_name": "tiny/model", **options})
    data = DataLoader(EpochStream(other.layers, n=256), batch_size=None)
    with pytest.raises(UserError) as error:
        checkpointing(tmp_path, 2).fit(other, data, ckpt_path=path)
    assert f"checkpoint {path} holds SAEs for another configuration: {difference}" in str(error.value)


def test_a_checkpoint_not_written_by_sae_training_is_refused(tmp_path) -> None:
    L.seed_everything(0)
    data = DataLoader(EpochStream(LAYERS, n=256), batch_size=None)
    checkpointing(tmp_path, 1).fit(module(), data)
    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["refusal_sae"]
    torch.save(checkpoint, tmp_path / "foreign.ckpt")
    with pytest.raises(UserError, match="foreign.ckpt was not written by refusal_sae's SAE training"):
        checkpointing(tmp_path, 2).fit(module(), data, ckpt_path=tmp_path / "foreign.ckpt")


def test_load_from_checkpoint_rebuilds_the_saes(tmp_path) -> None:
    L.seed_everything(0)
    trained = module()
    checkpointing(tmp_path, 1).fit(trained, DataLoader(EpochStream(LAYERS, n=256), batch_size=None))
    loaded = SAEModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")  # torch.load(weights_only=True)
    assert loaded.sae_cfg == trained.sae_cfg and list(loaded.saes) == LAYERS
    for name, tensor in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
