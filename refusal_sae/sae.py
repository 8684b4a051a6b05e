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

Training cost: the encoder matmul (tokens x d_in x width) cannot be avoided, since every latent is scored
for every token; everything after it only needs the k selected latents per token. So the training forward
and backward (`_SparseEncoder`, `_SparseDecoder`) never build or multiply a dense (tokens, width) feature
matrix: they gather and scatter k rows per token, O(tokens x k x d_in), instead of the two matmuls of the
encoder's size per dense product that autograd through a dense top-k would run.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from refusal_sae import cpu_kernels
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
    dead_fraction: Tensor
    """Fraction of latents that have not fired for `dead_tokens_threshold` training tokens."""
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


SPARSE_RATIO = 8
"""The sparse kernels (a gather or scatter of k rows per token) are used while k <= width / SPARSE_RATIO: on a
CPU a gathered row costs roughly ten times a row of a dense matmul, so for larger k the dense product over all
latents is the cheaper one. The same ratio decides between a dense block and k_aux rows per token for AuxK."""


def _topk(product: Tensor, bias: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row of the pre-activations `product + bias` as (ReLU'd values, indices), indices ascending.

    `product` is W_enc (x - b_dec) without b_enc: on the CPU in float32 the C kernel adds the bias while it
    scans for the top k (`cpu_kernels.topk_relu`), so the biased (tokens, width) matrix is never written;
    elsewhere `product + bias` is formed here. Both compute each pre-activation as the same float sum.
    ReLU after the selection gives the same features as selecting from ReLU(pre) (where fewer than k are
    positive, the extra entries are 0 either way) without a pass over the dense matrix. Ascending indices:
    the sparse decoder sums a token's rows in this order, the order in which `decode` finds them in dense
    features, so the training forward and decode(encode(x)) agree bit for bit.
    """
    bias = bias.to(product.dtype)
    if kernels := cpu_kernels.usable(product, bias):
        values, indices = kernels.topk_relu(product, bias, k)
        if torch.is_grad_enabled() and (product.requires_grad or bias.requires_grad):  # the same values, in the graph
            values = (product.gather(-1, indices) + bias[indices]).relu()
        return values, indices
    values, indices = (product + bias).topk(k, dim=-1, sorted=False)
    indices, order = indices.sort(dim=-1)
    return values.gather(-1, order).relu(), indices


def _fired(indices: Tensor, values: Tensor, width: int) -> Tensor:
    """Boolean (width,): latents with a non-zero value for some token (a scatter over the k entries per token)."""
    counts = torch.zeros(width, dtype=torch.int32, device=indices.device)
    return counts.index_add_(0, indices.reshape(-1), (values != 0).reshape(-1).to(torch.int32)) > 0


def _sparse_outer(latents: Tensor, tokens: Tensor, weights: Tensor, rows: Tensor, width: int) -> Tensor:
    """(width, d) matrix whose row j sums weights[e] * rows[tokens[e]] over the entries e with latents[e] == j.

    The gradient of a weight matrix of which each token used only a few rows (the encoder's k rows through
    top-k, the decoder's k rows). A dense matmul would cost tokens x width x d; as a sparse (width, tokens)
    matrix times `rows` it costs tokens x k x d. index_add_ of the weighted rows would first write all
    tokens x k x d products to memory (470 MB at 4096 tokens, k 32, d 896). On the CPU in float32,
    `cpu_kernels.sparse_outer` does the same sums in one pass, without CSR's argsort, zero fill and copy.
    """
    if kernels := cpu_kernels.usable(weights, rows):
        return kernels.sparse_outer(latents, tokens, weights, rows, width)[0]
    order = latents.argsort(stable=True)  # stable: ascending tokens within each row, as CSR prefers them
    crow = latents.new_zeros(width + 1)
    torch.cumsum(torch.bincount(latents, minlength=width), 0, out=crow[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": matmul with a dense matrix is all we use
        warnings.simplefilter("ignore")
        matrix = torch.sparse_csr_tensor(
            crow, tokens[order], weights[order].to(rows.dtype), (width, len(rows)), check_invariants=False
        )
    return matrix @ rows


class _SparseEncoder(torch.autograd.Function):
    """Encoder matmul and top-k (plus the AuxK candidates) with a backward pass that reads only selected entries.

    Autograd through a dense top-k would turn the k gradients per token into a dense (tokens, width) matrix
    and multiply it with the input and with W_enc: two more matmuls of the encoder's size, about two thirds
    of a training step. Here the weight gradient is a sparse-dense product (`_sparse_outer`), the bias
    gradient a scatter-add, the input gradient a gather of k encoder rows per token (only computed if `x`
    needs it), and the gradient of b_dec, which enters as x - b_dec, is -(bias gradient) @ W_enc: one
    vector-matrix product instead of a (tokens, d_in) matrix.

    Inputs: x (tokens, d_in), b_dec, W_enc, b_enc, k, the matmul dtype, and for AuxK the dead latents (or
    None), k_aux and whether to return the AuxK selection as k_aux (value, latent) pairs per token (`sparse_aux`)
    or as a dense (tokens, dead) block; last, an optional (tokens, width) tensor to hold the product W_enc (x - b_dec).
    Outputs: values and indices as `_topk`; aux values and aux latents (2-D pairs, or 1-D latents of the
    block's columns).
    """

    @staticmethod
    def forward(ctx, x, b_dec, weight, bias, k, dtype, dead, k_aux, sparse_aux, workspace):
        ctx.set_materialize_grads(False)
        centred = x - b_dec
        with torch.autocast(x.device.type, enabled=False):  # the product `_product` computes, maybe into `workspace`
            product = torch.mm(centred.to(dtype), weight.to(dtype).T, out=workspace)
        values, indices = _topk(product, bias, k)
        if dead is None or len(dead) == 0:
            aux_values, aux_latents = product.new_zeros(len(product), 0), indices.new_zeros(0)
        else:
            block = (product.index_select(1, dead) + bias.to(dtype)[dead]).relu_()
            if len(dead) <= k_aux:  # every dead latent is selected
                aux_values, aux_latents = block, dead.clone()
            else:
                top, position = block.topk(k_aux, dim=-1, sorted=False)
                if sparse_aux:  # latents ascending in each row, as _SparseDecoder's sparse matrices want them
                    position, order = position.sort(dim=-1)
                    aux_values, aux_latents = top.gather(-1, order), dead[position]
                else:
                    aux_values, aux_latents = torch.zeros_like(block).scatter_(1, position, top), dead.clone()
        ctx.save_for_backward(centred, weight, values, indices, aux_values, aux_latents)
        ctx.mark_non_differentiable(indices, aux_latents)
        ctx.x_dtype = x.dtype
        return values, indices, aux_values, aux_latents

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values, _grad_indices, grad_aux, _grad_aux_latents):
        centred, weight, values, indices, aux_values, aux_latents = ctx.saved_tensors
        need_x, need_b_dec, need_weight, need_bias = ctx.needs_input_grad[:4]
        n, width, dtype = len(centred), weight.shape[0], torch.promote_types(centred.dtype, weight.dtype)
        # Gradients w.r.t. the selected pre-activations, zero where the ReLU cut (as its derivative is there).
        latents, grads, block = [], [], None
        if grad_values is not None:
            latents.append(indices)
            grads.append(grad_values.to(dtype) * (values > 0))
        if grad_aux is not None and aux_values.numel() > 0:
            grad = grad_aux.to(dtype) * (aux_values > 0)
            if aux_latents.dim() == 2:
                latents.append(aux_latents)
                grads.append(grad)
            else:
                block = grad
        latents = torch.cat(latents, 1) if latents else indices[:, :0]
        grads = torch.cat(grads, 1) if grads else centred.new_zeros(n, 0, dtype=dtype)
        grad_x = grad_b_dec = grad_weight = grad_bias = None
        if need_weight:
            tokens = torch.arange(n, device=latents.device).repeat_interleave(latents.shape[1])
            grad_weight = _sparse_outer(latents.reshape(-1), tokens, grads.reshape(-1), centred.to(dtype), width)
            if block is not None:
                grad_weight.index_add_(0, aux_latents, block.T @ centred.to(dtype))
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias or need_b_dec:
            grad_bias = grads.new_zeros(width).index_add_(0, latents.reshape(-1), grads.reshape(-1))
            if block is not None:
                grad_bias.index_add_(0, aux_latents, block.sum(0))
            grad_b_dec = -(grad_bias @ weight.to(dtype)) if need_b_dec else None
        if need_x:
            grad_x = F.embedding_bag(latents, weight.to(dtype), per_sample_weights=grads, mode="sum")
            if block is not None:
                grad_x += block @ weight.index_select(0, aux_latents).to(dtype)
            grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, grad_b_dec, grad_weight, grad_bias, None, None, None, None, None, None


class _SparseDecoder(torch.autograd.Function):
    """W_dec^T f for features given as k (value, latent) pairs per token: values and indices, shape (tokens, k),
    latents ascending along each row.

    The forward pass sums k rows of W_dec per token (`embedding_bag`). The backward pass needs, per pair, the
    dot product of the output gradient with that row (a sampled matmul) and, per row of W_dec, the sum of
    the output gradients of the tokens using it (`_sparse_outer`): O(tokens x k x d_in) each, where the dense
    features' matmul and its two gradient matmuls are O(tokens x width x d_in). (embedding_bag's own backward
    computes the same, about a third slower on a CPU.) On the CPU in float32 one C pass computes both, reading
    each token's output gradient once for the two (`cpu_kernels.Kernels.sparse_outer` with `dot_with`).
    """

    @staticmethod
    def forward(ctx, indices, values, weight):
        ctx.save_for_backward(indices, values, weight)
        return F.embedding_bag(indices, weight, per_sample_weights=values.to(weight.dtype), mode="sum")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        indices, values, weight = ctx.saved_tensors
        n, k = indices.shape
        grad_out = grad_out.to(weight.dtype)
        grad_values = grad_weight = None
        tokens = torch.arange(n, device=indices.device).repeat_interleave(k)
        kernels = cpu_kernels.usable(grad_out, weight, values)
        if kernels and ctx.needs_input_grad[1] and ctx.needs_input_grad[2]:  # both from one pass over grad_out
            grad_weight, grad_values = kernels.sparse_outer(
                indices.reshape(-1), tokens, values.reshape(-1), grad_out, weight.shape[0], dot_with=weight
            )
            return None, grad_values.reshape(n, k), grad_weight
        if ctx.needs_input_grad[1]:
            crow = torch.arange(0, n * k + 1, k, device=indices.device)
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore")
                pattern = torch.sparse_csr_tensor(
                    crow, indices.reshape(-1), grad_out.new_zeros(n * k), (n, weight.shape[0]), check_invariants=False
                )
            grad_values = torch.sparse.sampled_addmm(pattern, grad_out, weight.T, beta=0.0).values()
            grad_values = grad_values.reshape(n, k).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_weight = _sparse_outer(indices.reshape(-1), tokens, values.reshape(-1), grad_out, weight.shape[0])
        return None, grad_values, grad_weight


class _DecodeFeatures(torch.autograd.Function):
    """W_dec^T f for dense `f` with few non-zeros, summing only the rows of the non-zero latents.

    It adds the same rows in the same order as the training forward's sparse decoder (latents ascending), so
    decode(encode(x)) equals forward's reconstruction bit for bit. The gradient w.r.t. `f` stays dense, as
    for a matmul: attribution needs it at every latent, not only the active ones.

    Inputs: features (tokens, width), W_dec, and the non-zeros of `features` as row and latent indices in
    row-major order (`nonzero()`).
    """

    @staticmethod
    def forward(ctx, features, weight, rows, latents):
        values = features[rows, latents].to(weight.dtype)
        offsets = torch.zeros(len(features), dtype=torch.long, device=features.device)
        torch.cumsum(torch.bincount(rows, minlength=len(features))[:-1], 0, out=offsets[1:])
        ctx.save_for_backward(weight, rows, latents, values)
        ctx.features_dtype = features.dtype
        return F.embedding_bag(latents, weight, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        weight, rows, latents, values = ctx.saved_tensors
        grad_features = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_features = (grad_out @ weight.T).to(ctx.features_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = _sparse_outer(latents, rows, values, grad_out.to(weight.dtype), weight.shape[0])
        return grad_features, grad_weight, None, None


def exact_error(x: Tensor, reconstruction: Tensor) -> Tensor:
    """`x - reconstruction` in float64.

    In fp32 the subtraction rounds, and `reconstruction + error` misses `x` by an ulp in a fair share of
    entries (a fifth of them for a fresh SAE). Both operands have at most 24 mantissa bits, so float64
    holds their difference exactly unless one is over 2**29 times the other.
    """
    return x.double() - reconstruction.double()


def _matmul_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the encoder matmul runs in: autocast's if it is on (bf16 under bf16-mixed), else the inputs'."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


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
        return self.cfg.k_active * SPARSE_RATIO <= self.cfg.width

    def _tokens(self, x: Tensor) -> Tensor:
        """`x` as (tokens, d_in), after checking its width."""
        if x.shape[-1] != self.cfg.d_in:
            raise UserError(
                f"SAE input has last dimension {x.shape[-1]} but this SAE reads d_in={self.cfg.d_in}; "
                "use an SAE trained on this model's activations"
            )
        return x.reshape(-1, self.cfg.d_in)

    def _product(self, x: Tensor) -> Tensor:
        """W_enc (x - b_dec), shape (tokens, width): the pre-activations before b_enc is added. The same
        product as in `_SparseEncoder`, so training and `encode` select from identical numbers."""
        centred = self._tokens(x) - self.b_dec
        dtype = _matmul_dtype(centred, self.encoder.weight)
        return torch.mm(centred.to(dtype), self.encoder.weight.to(dtype).T)

    def pre_activations(self, x: Tensor) -> Tensor:
        """ReLU(W_enc (x - b_dec) + b_enc), shape (..., width). Autocast may run the matmul in bf16."""
        product = self._product(x)
        return F.relu(product + self.encoder.bias.to(product.dtype)).reshape(*x.shape[:-1], self.cfg.width)

    def encode(self, x: Tensor) -> Tensor:
        """Sparse features of `x`, shape (..., width): exactly k non-zeros per token unless fewer than k
        pre-activations are positive."""
        product = self._product(x)
        values, indices = _topk(product, self.encoder.bias, self.cfg.k_active)
        return torch.zeros_like(product).scatter(-1, indices, values).reshape(*x.shape[:-1], self.cfg.width)

    def decode(self, features: Tensor) -> Tensor:
        """W_dec^T f + b_dec for any (e.g. patched) dense features; the result is fp32 because b_dec is.

        Features with few non-zeros (as from `encode`) are decoded from those rows of W_dec alone, in fp32,
        exactly as the training forward does; denser ones (e.g. patched with mean activations) by a matmul in
        the features' dtype (bf16 under autocast). Either way the gradient w.r.t. `features` is dense.
        """
        flat = features.reshape(-1, self.cfg.width)
        if self.uses_sparse_kernels and int(torch.count_nonzero(flat)) * SPARSE_RATIO <= flat.numel():
            rows, latents = flat.nonzero().unbind(1)
            decoded = _DecodeFeatures.apply(flat, self.W_dec, rows, latents)
            return (decoded + self.b_dec).reshape(*features.shape[:-1], self.cfg.d_in)
        return features @ self.W_dec.to(features.dtype) + self.b_dec

    def error(self, x: Tensor) -> Tensor:
        """The SAE error term of `x` (float64): `(decode(encode(x)) + error(x)).to(x.dtype) == x`."""
        return exact_error(x, self.decode(self.encode(x)))

    def dead_latents(self) -> Tensor:
        """Boolean mask of latents that have not fired for `dead_tokens_threshold` training tokens."""
        return self.tokens_since_fired >= self.cfg.dead_tokens_threshold

    def forward(self, x: Tensor) -> SAEOutput:
        """Encode, decode and score `x` of shape (..., d_in); in training mode also count which latents fired.

        With k <= width / SPARSE_RATIO (`uses_sparse_kernels`), nothing of size (tokens, width) is kept or
        multiplied beyond the encoder matmul: decoding reads k rows of W_dec per token and the backward pass
        touches only the selected entries (`_SparseEncoder`), so a training step costs the encoder matmul
        plus O(tokens x k x d_in). `features` is then only built when read.
        """
        tokens = self._tokens(x)
        width, d_in, k = self.cfg.width, self.cfg.d_in, self.cfg.k_active
        use_auxk = self.training and self.cfg.auxk_alpha > 0
        dead = self.dead_latents().nonzero().squeeze(1) if use_auxk else self.tokens_since_fired.new_zeros(0)
        k_aux = min(max(1, d_in // 2), len(dead))
        features = None
        if self.uses_sparse_kernels:
            dtype = _matmul_dtype(tokens, self.encoder.weight)
            # AuxK as k_aux (value, latent) pairs per token only when the dead latents far outnumber k_aux;
            # otherwise a dense (tokens, dead) block, whose matmuls beat gathering k_aux rows per token.
            sparse_aux = len(dead) > SPARSE_RATIO * k_aux
            values, indices, aux_values, aux_latents = _SparseEncoder.apply(
                tokens, self.b_dec, self.encoder.weight, self.encoder.bias, k, dtype, dead, k_aux, sparse_aux,
                self._workspace(len(tokens), dtype, tokens.device),
            )
            reconstruction = _SparseDecoder.apply(indices, values, self.W_dec) + self.b_dec
        else:
            product = self._product(tokens)
            values, indices = _topk(product, self.encoder.bias, k)
            features = torch.zeros_like(product).scatter(-1, indices, values)
            reconstruction = features @ self.W_dec.to(features.dtype) + self.b_dec
            bias = self.encoder.bias.to(product.dtype)
            aux_values, aux_latents = F.relu(product.index_select(1, dead) + bias[dead]), dead
            if len(dead) > k_aux:
                top, position = aux_values.topk(k_aux, dim=-1, sorted=False)
                aux_values = torch.zeros_like(aux_values).scatter(-1, position, top)
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
        fired = _fired(indices, values, width)
        if self.training:
            self._count_firing(fired, len(tokens))
        lead = x.shape[:-1]
        reconstruction = reconstruction.reshape(*lead, d_in)
        return SAEOutput(
            reconstruction=reconstruction,
            fvu=fvu,
            auxk_loss=auxk_loss,
            loss=fvu + self.cfg.auxk_alpha * auxk_loss,
            l0=(values != 0).sum(-1).float().mean(),
            mse=squared_error / x_flat.numel(),
            dead_fraction=self.dead_latents().float().mean(),
            values=values.reshape(*lead, k),
            indices=indices.reshape(*lead, k),
            fired=fired,
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
            error_hat = _SparseDecoder.apply(aux_latents, aux_values, self.W_dec)
        else:  # no b_dec: it predicts an error
            error_hat = (aux_values @ self.W_dec.index_select(0, aux_latents).to(aux_values.dtype)).float()
        variance = (error - error.mean(0)).pow(2).sum()
        return F.mse_loss(error_hat, error, reduction="sum") / variance

    @torch.no_grad()
    def _count_firing(self, fired: Tensor, tokens: int) -> None:
        """Advance every latent's tokens-since-fired counter by the batch size and reset those that fired."""
        self.tokens_since_fired += tokens
        self.tokens_since_fired[fired] = 0

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
