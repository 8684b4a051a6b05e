"""Top-k sparse autoencoders (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

One SAE reads one activation site (say the residual stream after layer 21) and rewrites it as

    f     = TopK(ReLU(W_enc (x - b_dec) + b_enc))      sparse features, k non-zeros per token
    x_hat = W_dec^T f + b_dec                         reconstruction
    error = x - x_hat                                 what the features miss

The circuit code splices `x_hat + error` back into the model: that is exactly `x`, so the model is
unchanged until a feature or the error term is ablated. Top-k fixes L0 = k directly instead of tuning an
L1 penalty, and does not shrink the activations it keeps.

The training recipe is the one shared by EleutherAI/sparsify, openai/sparse_autoencoder and
saprmarks/dictionary_learning: unit-norm decoder rows, encoder initialised as the decoder's transpose,
b_dec started at the data's geometric median, FVU as the reconstruction loss and an AuxK loss that
revives dead latents. The error term is float64 (see `exact_error`). Checkpoints use sparsify's
layout (`sae.safetensors` + `cfg.json`), so each library loads the other's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from refusal_sae.errors import UserError
from refusal_sae.io import atomic_open, write_json

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"
DEFAULT_K = 32


@dataclass
class SAEConfig:
    """Shape and sparsity of one SAE, plus its AuxK settings; every field can be a CLI option."""

    d_in: int
    """Width of the activations the SAE reads (the model's hidden size)."""
    expansion_factor: int = 32
    """Latents per input dimension; ignored when `num_latents` is set."""
    num_latents: int | None = None
    """Absolute number of latents (the SAE width); overrides `expansion_factor`."""
    k: int | None = None
    """Active latents per token; 32 when neither `k` nor `k_percent` is set."""
    k_percent: float | None = None
    """Active latents per token as a fraction of the width, in (0, 1] (0.01 means 1%); excludes `k`."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss; 1/32 as in Gao et al. (appendix A.2). 0 turns it off."""
    dead_tokens_threshold: int = 10_000_000
    """A latent that has not fired for this many training tokens is dead and gets the AuxK loss (sparsify's default)."""
    normalize_decoder: bool = True
    """Keep decoder rows at unit norm, so a feature's activation is the size of its contribution."""

    def __post_init__(self) -> None:
        for name in ("d_in", "expansion_factor", "num_latents", "k", "dead_tokens_threshold"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise UserError(f"SAE config {name}={value!r} must be a positive integer")
        if self.k is not None and self.k_percent is not None:
            raise UserError(f"SAE config sets both k={self.k} and k_percent={self.k_percent}; set only one")
        if self.k_percent is not None and not 0 < self.k_percent <= 1:
            raise UserError(
                f"SAE config k_percent={self.k_percent} must be in (0, 1]: a fraction of the width, e.g. 0.01 for 1%"
            )
        if self.k_active > self.width:
            raise UserError(
                f"SAE config k={self.k_active} is larger than the SAE width of {self.width} latents; "
                "lower k or raise num_latents/expansion_factor"
            )
        if not self.auxk_alpha >= 0:
            raise UserError(f"SAE config auxk_alpha={self.auxk_alpha} must be >= 0")

    @property
    def width(self) -> int:
        """Number of latents."""
        return self.num_latents if self.num_latents is not None else self.d_in * self.expansion_factor

    @property
    def k_active(self) -> int:
        """Active latents per token: `k`, or `k_percent` of the width rounded to the nearest integer (at least 1)."""
        if self.k is not None:
            return self.k
        if self.k_percent is not None:
            return max(1, round(self.k_percent * self.width))
        return DEFAULT_K


@dataclass
class SAEMeta:
    """Where an SAE belongs. Stored in cfg.json so that loading it for another model or layer fails loudly."""

    layer: str | None = None
    """Activation site, e.g. "residuals_21"."""
    model: str | None = None
    """The LLM the activations came from, e.g. a Hugging Face id."""
    normalisation: str | None = None
    """How activations were scaled before the SAE saw them (None: raw activations)."""


class SAEOutput(NamedTuple):
    """Everything one forward pass computes; the losses are fp32 scalars."""

    reconstruction: Tensor
    """decode(features), shape (..., d_in)."""
    features: Tensor
    """Sparse feature activations, shape (..., width), at most k non-zeros per token."""
    error: Tensor
    """x - reconstruction in float64, so that (reconstruction + error).to(x.dtype) == x exactly."""
    fvu: Tensor
    """Fraction of variance unexplained: sum of squared errors / sum of squared deviations from the batch mean
    (scale-free, so one number means the same at every layer; needs at least two distinct tokens)."""
    auxk_loss: Tensor
    """FVU of the dead latents' reconstruction of the error (0 outside training or with no dead latents)."""
    loss: Tensor
    """fvu + auxk_alpha * auxk_loss: what the optimiser minimises."""
    l0: Tensor
    """Mean number of non-zero features per token."""
    mse: Tensor
    """Mean squared error per element."""
    dead_fraction: Tensor
    """Fraction of latents that have not fired for `dead_tokens_threshold` training tokens."""


def exact_error(x: Tensor, reconstruction: Tensor) -> Tensor:
    """`x - reconstruction` in float64.

    In fp32 the subtraction rounds, and `reconstruction + error` misses `x` by an ulp in a fair share of
    entries (a fifth of them for a fresh SAE). Both operands have at most 24 mantissa bits, so float64
    holds their difference exactly unless one is over 2**29 times the other.
    """
    return x.double() - reconstruction.double()


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """Geometric median of the rows of `points` by Weiszfeld's iteration (a mean re-weighted by 1 / distance)."""
    median = points.mean(0)
    for _ in range(max_iter):
        weights = 1 / (points - median).norm(dim=1).clamp_min(1e-8)
        previous, median = median, (weights[:, None] * points).sum(0) / weights.sum()
        if (median - previous).norm() <= tol * median.norm().clamp_min(1):
            break
    return median


class SparseAutoencoder(nn.Module):
    """Top-k SAE with fp32 parameters; tensor names match EleutherAI/sparsify's `SparseCoder`."""

    tokens_since_fired: Tensor

    def __init__(self, cfg: SAEConfig, meta: SAEMeta | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.meta = meta or SAEMeta()
        width, d_in = cfg.width, cfg.d_in
        decoder = torch.randn(width, d_in)
        decoder /= decoder.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(decoder)
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        # Encoder = decoder transpose: every latent starts out reading the direction it writes, which
        # Gao et al. found leaves far fewer latents dead. Zero bias: b_dec already centres the input.
        self.encoder = nn.Linear(d_in, width)
        with torch.no_grad():
            self.encoder.weight.copy_(decoder)
            self.encoder.bias.zero_()
        # Persistent so a resumed Lightning run keeps its dead-latent bookkeeping; not in sae.safetensors.
        self.register_buffer("tokens_since_fired", torch.zeros(width, dtype=torch.long))

    def pre_activations(self, x: Tensor) -> Tensor:
        """ReLU(W_enc (x - b_dec) + b_enc), shape (..., width). Autocast may run the matmul in bf16."""
        if x.shape[-1] != self.cfg.d_in:
            raise UserError(
                f"SAE input has last dimension {x.shape[-1]} but this SAE reads d_in={self.cfg.d_in}; "
                "use an SAE trained on this model's activations"
            )
        return F.relu(self.encoder(x - self.b_dec))

    def select_topk(self, pre: Tensor) -> Tensor:
        """Keep the k largest pre-activations of each token, zero the rest (dense tensor)."""
        values, indices = pre.topk(self.cfg.k_active, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, values)

    def encode(self, x: Tensor) -> Tensor:
        """Sparse features of `x`, shape (..., width): exactly k non-zeros per token unless fewer than k
        pre-activations are positive."""
        return self.select_topk(self.pre_activations(x))

    def decode(self, features: Tensor) -> Tensor:
        """W_dec^T f + b_dec for any (e.g. patched) dense features; the matmul runs in the features' dtype
        (bf16 under autocast), the result is fp32 because b_dec is."""
        return features @ self.W_dec.to(features.dtype) + self.b_dec

    def error(self, x: Tensor) -> Tensor:
        """The SAE error term of `x` (float64): `(decode(encode(x)) + error(x)).to(x.dtype) == x`."""
        return exact_error(x, self.decode(self.encode(x)))

    def dead_latents(self) -> Tensor:
        """Boolean mask of latents that have not fired for `dead_tokens_threshold` training tokens."""
        return self.tokens_since_fired >= self.cfg.dead_tokens_threshold

    def forward(self, x: Tensor) -> SAEOutput:
        """Encode, decode and score `x` of shape (..., d_in); in training mode also count which latents fired."""
        pre = self.pre_activations(x)
        features = self.select_topk(pre)
        reconstruction = self.decode(features)
        error = exact_error(x, reconstruction)
        # Losses in fp32 whatever autocast did to the matmuls: bf16 sums of squares lose the small errors.
        d_in, width = self.cfg.d_in, self.cfg.width
        x_flat = x.float().reshape(-1, d_in)
        residual = x_flat - reconstruction.reshape(-1, d_in)
        total_variance = (x_flat - x_flat.mean(0)).pow(2).sum()
        fvu = residual.pow(2).sum() / total_variance
        use_auxk = self.training and self.cfg.auxk_alpha > 0
        auxk_loss = self._auxk_loss(pre.reshape(-1, width), residual) if use_auxk else fvu.new_zeros(())
        if self.training:
            self._count_firing(features.reshape(-1, width))
        return SAEOutput(
            reconstruction=reconstruction,
            features=features,
            error=error,
            fvu=fvu,
            auxk_loss=auxk_loss,
            loss=fvu + self.cfg.auxk_alpha * auxk_loss,
            l0=(features != 0).sum(-1).float().mean(),
            mse=residual.pow(2).mean(),
            dead_fraction=self.dead_latents().float().mean(),
        )

    def _auxk_loss(self, pre: Tensor, residual: Tensor) -> Tensor:
        """AuxK (Gao et al. appendix A.2): the top d_in/2 dead latents must reconstruct the live latents' error.

        Dead latents never get a gradient from the main loss because top-k never selects them; this gives
        them one that points at what the live latents miss, so they come back as useful features. It is
        normalised like FVU, by the variance of the error itself.
        """
        dead = self.dead_latents()
        num_dead = int(dead.sum())
        if num_dead == 0:
            return residual.new_zeros(())
        k_aux = min(max(1, self.cfg.d_in // 2), num_dead)
        values, indices = pre.masked_fill(~dead, -math.inf).topk(k_aux, dim=-1, sorted=False)
        aux_features = torch.zeros_like(pre).scatter(-1, indices, values)
        error_hat = (aux_features @ self.W_dec.to(aux_features.dtype)).float()  # no b_dec: it predicts an error
        target = residual.detach()
        variance = (target - target.mean(0)).pow(2).sum()
        return (error_hat - target).pow(2).sum() / variance

    @torch.no_grad()
    def _count_firing(self, features: Tensor) -> None:
        """Advance every latent's tokens-since-fired counter by the batch size and reset those that fired."""
        self.tokens_since_fired += features.shape[0]
        self.tokens_since_fired[(features != 0).any(0)] = 0

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Call between `backward()` and `optimizer.step()`: drop each decoder row's gradient along the row.

        The rows are renormalised after every step, so that component would only change their norm and be
        undone; removing it keeps the step (and Adam's moment estimates) on the direction. No-op when
        `normalize_decoder` is off, so a training loop may call it unconditionally.
        """
        grad = self.W_dec.grad
        if not self.cfg.normalize_decoder or grad is None:
            return
        w = self.W_dec
        grad -= ((grad * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True)) * w

    @torch.no_grad()
    def renormalize_decoder(self) -> None:
        """Call after `optimizer.step()`: rescale decoder rows to unit norm.

        Without it the SAE can shrink features and grow decoder rows for free, which makes activations
        incomparable across features. No-op when `normalize_decoder` is off.
        """
        if self.cfg.normalize_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def init_from_data(
        self, x_sample: Tensor, method: Literal["geometric_median", "mean"] = "geometric_median"
    ) -> None:
        """Set b_dec to the centre of a sample of activations (shape (..., d_in)) before training.

        The encoder then sees centred inputs from the first step instead of spending early steps (and
        latents) on the offset. The geometric median (Gao et al.) is the default because a few residual
        stream tokens (BOS, attention sinks) have norms far above the rest and drag the mean.
        """
        points = x_sample.float().reshape(-1, x_sample.shape[-1])
        if points.shape[-1] != self.cfg.d_in or len(points) == 0:
            raise UserError(
                f"init_from_data got a sample of shape {tuple(x_sample.shape)}; it needs at least one "
                f"token of width d_in={self.cfg.d_in}"
            )
        centre = geometric_median(points) if method == "geometric_median" else points.mean(0)
        self.b_dec.copy_(centre)

    def save(self, directory: str | Path) -> None:
        """Write `sae.safetensors` and `cfg.json` into `directory`, each atomically (sparsify's layout)."""
        directory = Path(directory)
        tensors = {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in self.named_parameters()}
        with atomic_open(directory / WEIGHTS_FILE, "wb") as f:
            f.write(safetensors_bytes(tensors))
        resolved = replace(self.cfg, num_latents=self.cfg.width, k=self.cfg.k_active, k_percent=None)
        write_json(directory / CONFIG_FILE, {**asdict(resolved), **asdict(self.meta)})

    @classmethod
    def load(
        cls,
        directory: str | Path,
        device: str | torch.device = "cpu",
        *,
        expected_layer: str | None = None,
        expected_model: str | None = None,
        expected_d_in: int | None = None,
    ) -> SparseAutoencoder:
        """Load a checkpoint written by `save` or by sparsify, without pickle.

        The `expected_*` arguments guard against an SAE from another layer or model: a mismatch with
        what cfg.json records raises UserError instead of producing meaningless features.
        """
        directory = Path(directory)
        cfg_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (cfg_path, weights_path):
            if not path.is_file():
                raise UserError(f"SAE checkpoint file {path} does not exist; point to a directory made by save()")
        cfg, meta = _read_cfg(cfg_path)
        for name, expected, actual in (
            ("layer", expected_layer, meta.layer),
            ("model", expected_model, meta.model),
            ("d_in", expected_d_in, cfg.d_in),
        ):
            if expected is not None and actual != expected:
                raise UserError(
                    f"{cfg_path}: this SAE was trained for {name}={actual!r} but {expected!r} is expected; "
                    f"use an SAE trained on {name} {expected!r}"
                )
        try:
            tensors = load_file(weights_path)
        except SafetensorError as e:
            raise UserError(f"{weights_path} is corrupted or truncated ({e}); save or download it again") from e
        sae = cls(cfg, meta)
        params = dict(sae.named_parameters())
        if tensors.keys() != params.keys():
            raise UserError(f"{weights_path} holds tensors {sorted(tensors)}; expected {sorted(params)}")
        with torch.no_grad():
            for name, param in params.items():
                if tensors[name].shape != param.shape:
                    raise UserError(
                        f"{weights_path}: {name} has shape {tuple(tensors[name].shape)} but {cfg_path} "
                        f"(d_in={cfg.d_in}, num_latents={cfg.width}) implies {tuple(param.shape)}; "
                        "the two files do not belong together"
                    )
                param.copy_(tensors[name])
        return sae.to(device)


def _read_cfg(path: Path) -> tuple[SAEConfig, SAEMeta]:
    """Parse cfg.json (ours or sparsify's) into config and metadata; UserError naming `path` if unusable."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); save the SAE again") from e
    if not isinstance(raw, dict) or "d_in" not in raw or "k" not in raw:
        raise UserError(f"{path} must be a JSON object with at least d_in and k; save the SAE again")
    # sparsify variants this module does not implement: transcoders, skip connections, group-max.
    if raw.get("activation", "topk") != "topk" or raw.get("transcode") or raw.get("skip_connection"):
        raise UserError(
            f"{path} describes activation={raw.get('activation')!r}, transcode={raw.get('transcode')!r}, "
            f"skip_connection={raw.get('skip_connection')!r}; only plain top-k SAEs are supported"
        )
    kwargs = {f.name: raw[f.name] for f in fields(SAEConfig) if f.name in raw}
    kwargs["num_latents"] = kwargs.get("num_latents") or None  # sparsify writes 0 for "use expansion_factor"
    try:
        cfg = SAEConfig(**kwargs)
    except UserError as e:
        raise UserError(f"{path}: {e}") from e
    meta = SAEMeta(**{f.name: raw.get(f.name) for f in fields(SAEMeta)})
    return cfg, meta
