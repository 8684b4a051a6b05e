"""Top-k sparse autoencoders (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

One SAE reads one activation site (say the residual stream after layer 21) and rewrites it as

    f     = TopK(ReLU(W_enc (x - b_dec) + b_enc))      sparse features, k non-zeros per token
    x_hat = W_dec^T f + b_dec                         reconstruction
    error = x - x_hat                                 what the features miss

The circuit code splices `x_hat + error` back into the model: that is exactly `x`, so the model is
unchanged until a feature or the error term is ablated. Top-k fixes L0 = k directly instead of tuning an
L1 penalty, and does not shrink the activations it keeps.

A loaded standard SAE (SAELens' `standard` architecture, `refusal_sae.sae_io`) is the same module with
`activation: relu`: f = ReLU(W_enc (x - b_dec) + b_enc), every positive pre-activation kept; it is analysed,
never trained here.

The training recipe is the one shared by EleutherAI/sparsify, openai/sparse_autoencoder and
saprmarks/dictionary_learning: unit-norm decoder rows, encoder initialised as the decoder's transpose,
b_dec started at the data's geometric median, FVU as the reconstruction loss and an AuxK loss that
revives dead latents. The error term is float64 (see `exact_error`).

Training cost: while k is small against the width, the training forward and backward touch only the k
selected latents per token beyond the encoder matmul (`refusal_sae.sparse_ops`). Checkpoints on disk:
`refusal_sae.sae_io` (sparsify's layout, so each library loads the other's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refusal_sae.errors import UserError
from refusal_sae.sparse_ops import (
    SPARSE_RATIO,
    DecodeFeatures,
    SparseDecoder,
    SparseEncoder,
    auxk_candidates,
    encoder_product,
    fired_latents,
    matmul_dtype,
    select_topk,
    sparse_enough,
)
from refusal_sae.validate import fraction, non_negative_number, positive_int

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
    activation: Literal["topk", "relu"] = "topk"
    """topk: the k largest pre-activations of a token, ReLU'd (what `fit` trains); relu: every positive
    pre-activation, as a loaded standard SAE (SAELens' `standard` architecture) defines it: analysis only."""

    def __post_init__(self) -> None:
        for name, example in (("d_in", 896), ("expansion_factor", 32), ("num_latents", 28672), ("k", DEFAULT_K),
                              ("dead_tokens_threshold", 10_000_000)):
            if getattr(self, name) is not None or name not in ("num_latents", "k"):  # only these two may be null
                positive_int(f"model.sae.{name}", getattr(self, name), example)
        if self.k is not None and self.k_percent is not None:
            raise UserError(f"model.sae.k_percent: {self.k_percent!r} is set as well as k={self.k}; set only one")
        if self.k_percent is not None:
            fraction("model.sae.k_percent", self.k_percent, 0.01, include_one=True)
        if self.activation not in ("topk", "relu"):
            raise UserError(f"model.sae.activation: {self.activation!r} is not an SAE activation here; use topk "
                            "(or relu, for a loaded standard SAE)")
        if self.activation == "topk" and self.k_active > self.width:
            raise UserError(
                f"model.sae.k: {self.k_active!r} is larger than the SAE width of {self.width} latents; "
                "lower k or raise num_latents/expansion_factor"
            )
        non_negative_number("model.sae.auxk_alpha", self.auxk_alpha, 1 / 32)

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


@dataclass(eq=False)
class SAEOutput:
    """Everything one forward pass computes; the losses are fp32 scalars."""

    reconstruction: Tensor
    """decode(features), shape (..., d_in)."""
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
    values: Tensor
    """The k selected activations of each token, shape (..., k), ReLU'd (0 where fewer than k were positive)."""
    indices: Tensor
    """Their latents, shape (..., k), ascending along the last dimension."""
    fired: Tensor
    """Boolean (width,): which latents are non-zero for at least one token of the batch."""
    input: Tensor = field(repr=False)
    """The `x` that was encoded."""
    _features: Tensor | None = field(default=None, repr=False)
    _error: Tensor | None = field(default=None, repr=False)

    @property
    def features(self) -> Tensor:
        """Sparse feature activations, shape (..., width), at most k non-zeros per token.

        Built from `values` and `indices` on first use: training never reads this (tokens, width) tensor,
        and writing it would cost as much memory traffic as the rest of the step's sparse work.
        """
        if self._features is None:
            shape = (*self.values.shape[:-1], self.fired.shape[0])
            self._features = self.values.new_zeros(shape).scatter(-1, self.indices, self.values)
        return self._features

    @property
    def error(self) -> Tensor:
        """x - reconstruction in float64, so that (reconstruction + error).to(x.dtype) == x exactly.

        Computed on first use (from `input`, which must not have been modified in place since): training
        does not read it, and two float64 copies of the batch cost more than the losses.
        """
        if self._error is None:
            self._error = exact_error(self.input, self.reconstruction)
        return self._error


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
    """Top-k SAE (or a loaded ReLU one) with fp32 parameters; tensor names match EleutherAI/sparsify's `SparseCoder`."""

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
        self._pre_workspace: Tensor | None = None

    def _workspace(self, tokens: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """A (tokens, width) tensor kept from training step to training step for the encoder product (CPU only).

        glibc serves blocks this large (over 32 MB) by mmap and returns them on free, so a new one costs a
        page fault per 4 KiB on first write: 30 to 80 ms per step at 4096 tokens x 7168 latents, a tenth of
        the matmul. CUDA's caching allocator reuses its blocks anyway, and outside training the memory is
        not worth holding. Nothing keeps a reference past the forward pass (top-k copies what it selects),
        so reusing it is safe.
        """
        if device.type != "cpu" or not self.training:
            self._pre_workspace = None
            return None
        shape = (tokens, self.cfg.width)
        buffer = self._pre_workspace
        stale = buffer is None or buffer.shape != shape or buffer.dtype != dtype or buffer.device != device
        if stale or buffer.is_inference() != torch.is_inference_mode_enabled():  # see torch.inference_mode
            buffer = self._pre_workspace = torch.empty(shape, dtype=dtype, device=device)
        return buffer

    @property
    def uses_sparse_kernels(self) -> bool:
        """Whether forward and decode use the sparse kernels (k <= width / SPARSE_RATIO) or dense matmuls."""
        return sparse_enough(self.cfg.k_active, self.cfg.width)

    def _tokens(self, x: Tensor) -> Tensor:
        """`x` as (tokens, d_in), after checking its width."""
        if x.shape[-1] != self.cfg.d_in:
            raise UserError(
                f"SAE input has last dimension {x.shape[-1]} but this SAE reads d_in={self.cfg.d_in}; "
                "use an SAE trained on this model's activations"
            )
        return x.reshape(-1, self.cfg.d_in)

    def _product(self, x: Tensor) -> Tensor:
        """W_enc (x - b_dec), shape (tokens, width): the pre-activations before b_enc is added."""
        centred = self._tokens(x) - self.b_dec
        return encoder_product(centred, self.encoder.weight, matmul_dtype(centred, self.encoder.weight))

    def pre_activations(self, x: Tensor) -> Tensor:
        """ReLU(W_enc (x - b_dec) + b_enc), shape (..., width). Autocast may run the matmul in bf16."""
        product = self._product(x)
        return F.relu(product + self.encoder.bias.to(product.dtype)).reshape(*x.shape[:-1], self.cfg.width)

    def encode(self, x: Tensor) -> Tensor:
        """Sparse features of `x`, shape (..., width): exactly k non-zeros per token unless fewer than k
        pre-activations are positive."""
        return self.densify(*self.encode_topk(x))

    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """`encode(x)` as its k (values, indices) per token, each (..., k): k / width of the memory, for
        features that are kept (e.g. reused by many ablation variants). A ReLU SAE's k is the largest number of
        positive pre-activations of any token of `x` (the other tokens' extra entries are 0)."""
        product = self._product(x)
        k = self.cfg.k_active
        if self.cfg.activation == "relu":
            k = max(1, int((product + self.encoder.bias.to(product.dtype) > 0).sum(-1).max())) if len(product) else 1
        values, indices = select_topk(product, self.encoder.bias, k)
        return values.reshape(*x.shape[:-1], -1), indices.reshape(*x.shape[:-1], -1)

    def densify(self, values: Tensor, indices: Tensor) -> Tensor:
        """The (..., width) features of `encode_topk`'s values and indices."""
        return values.new_zeros(*values.shape[:-1], self.cfg.width).scatter(-1, indices, values)

    def decode(self, features: Tensor) -> Tensor:
        """W_dec^T f + b_dec for any (e.g. patched) dense features; the result is fp32 because b_dec is.

        Features with few non-zeros (as from `encode`) are decoded from those rows of W_dec alone, in fp32,
        exactly as the training forward does; denser ones (e.g. patched with mean activations) by a matmul in
        the features' dtype (bf16 under autocast). Either way the gradient w.r.t. `features` is dense.
        """
        flat = features.reshape(-1, self.cfg.width)
        if self.uses_sparse_kernels and sparse_enough(int(torch.count_nonzero(flat)), flat.numel()):
            rows, latents = flat.nonzero().unbind(1)
            decoded = DecodeFeatures.apply(flat, self.W_dec, rows, latents)
            return (decoded + self.b_dec).reshape(*features.shape[:-1], self.cfg.d_in)
        return features @ self.W_dec.to(features.dtype) + self.b_dec

    def error(self, x: Tensor) -> Tensor:
        """The SAE error term of `x` (float64): `(decode(encode(x)) + error(x)).to(x.dtype) == x`."""
        return exact_error(x, self.decode(self.encode(x)))

    def dead_latents(self) -> Tensor:
        """Boolean mask of latents that have not fired for `dead_tokens_threshold` training tokens."""
        return self.tokens_since_fired >= self.cfg.dead_tokens_threshold

    @torch.no_grad()
    def record_firing(self, fired: Tensor, tokens: int) -> None:
        """Count one training step: every latent's tokens-since-fired grows by `tokens`, those that fired restart.

        The training loop calls it after each forward pass with what the step saw (`SAEOutput.fired` and the
        batch's token count, or under DDP both summed over every rank, so all replicas count alike); the
        forward pass itself only reads the counter, for AuxK.
        """
        self.tokens_since_fired += tokens
        self.tokens_since_fired[fired] = 0

    def forward(self, x: Tensor) -> SAEOutput:
        """Encode, decode and score `x` of shape (..., d_in); in training mode with AuxK on the dead latents.

        With k <= width / SPARSE_RATIO (`uses_sparse_kernels`), nothing of size (tokens, width) is kept or
        multiplied beyond the encoder matmul: decoding reads k rows of W_dec per token and the backward pass
        touches only the selected entries (`SparseEncoder`), so a training step costs the encoder matmul
        plus O(tokens x k x d_in). `features` is then only built when read. Otherwise the dense features go
        through plain autograd. Either way the top-k and the AuxK candidates come from the same product.
        """
        if self.cfg.activation != "topk":
            raise UserError(f"model.sae.activation: {self.cfg.activation!r} SAEs are loaded for analysis, not trained "
                            "here; train top-k SAEs (activation: topk)")
        tokens = self._tokens(x)
        width, d_in, k = self.cfg.width, self.cfg.d_in, self.cfg.k_active
        use_auxk = self.training and self.cfg.auxk_alpha > 0
        dead = self.dead_latents().nonzero().squeeze(1) if use_auxk else self.tokens_since_fired.new_zeros(0)
        k_aux = min(max(1, d_in // 2), len(dead))
        features = None
        if self.uses_sparse_kernels:
            dtype = matmul_dtype(tokens, self.encoder.weight)
            # AuxK as k_aux (value, latent) pairs per token only when the dead latents far outnumber k_aux;
            # otherwise a dense (tokens, dead) block, whose matmuls beat gathering k_aux rows per token.
            sparse_aux = len(dead) > SPARSE_RATIO * k_aux
            values, indices, aux_values, aux_latents = SparseEncoder.apply(
                tokens, self.b_dec, self.encoder.weight, self.encoder.bias, k, dtype, dead, k_aux, sparse_aux,
                self._workspace(len(tokens), dtype, tokens.device),
            )
            reconstruction = SparseDecoder.apply(indices, values, self.W_dec) + self.b_dec
        else:
            product = self._product(tokens)
            values, indices = select_topk(product, self.encoder.bias, k)
            aux_values, aux_latents = auxk_candidates(product, self.encoder.bias, dead, k_aux, pairs=False)
            features = torch.zeros_like(product).scatter(-1, indices, values)
            reconstruction = features @ self.W_dec.to(features.dtype) + self.b_dec
        # Losses in fp32 whatever autocast did to the matmuls: bf16 sums of squares lose the small errors.
        # mse_loss: one fused pass each way, where (x - x_hat).pow(2).sum() makes three and two temporaries.
        x_flat = tokens.float()
        total_variance = (x_flat - x_flat.mean(0)).pow(2).sum()
        squared_error = F.mse_loss(reconstruction, x_flat, reduction="sum")
        fvu = squared_error / total_variance
        if use_auxk and aux_values.numel() > 0:
            auxk_loss = self._auxk_loss(aux_values, aux_latents, (x_flat - reconstruction).detach())
        else:
            auxk_loss = fvu.new_zeros(())
        lead = x.shape[:-1]
        reconstruction = reconstruction.reshape(*lead, d_in)
        return SAEOutput(
            reconstruction=reconstruction,
            fvu=fvu,
            auxk_loss=auxk_loss,
            loss=fvu + self.cfg.auxk_alpha * auxk_loss,
            l0=(values != 0).sum(-1).float().mean(),
            mse=squared_error / x_flat.numel(),
            values=values.reshape(*lead, k),
            indices=indices.reshape(*lead, k),
            fired=fired_latents(indices, values, width),
            input=x,
            _features=None if features is None else features.reshape(*lead, width),
        )

    def _auxk_loss(self, aux_values: Tensor, aux_latents: Tensor, error: Tensor) -> Tensor:
        """AuxK (Gao et al. appendix A.2): the top d_in/2 dead latents must reconstruct the live latents' error.

        Dead latents never get a gradient from the main loss because top-k never selects them; this gives
        them one that points at what the live latents miss, so they come back as useful features. It is
        normalised like FVU, by the variance of the error itself. `aux_values` holds the selected dead
        latents' activations, either as (value, latent) pairs per token (2-D `aux_latents`) or as a dense
        (tokens, dead) block whose columns are the latents `aux_latents`. `error` is x - x_hat, without gradient.
        """
        if aux_latents.dim() == 2:
            error_hat = SparseDecoder.apply(aux_latents, aux_values, self.W_dec)
        else:  # no b_dec: it predicts an error
            error_hat = (aux_values @ self.W_dec.index_select(0, aux_latents).to(aux_values.dtype)).float()
        variance = (error - error.mean(0)).pow(2).sum()
        return F.mse_loss(error_hat, error, reduction="sum") / variance

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
        grad.addcmul_(w, ((grad * w).sum(1) / w.norm(dim=1).square()).unsqueeze(1), value=-1)  # in place

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
