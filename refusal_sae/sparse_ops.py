"""The sparse kernels of a top-k SAE step: top-k selection and custom autograd that touch only selected latents.

The encoder matmul (tokens x d_in x width) cannot be avoided, since every latent is scored for every
token; everything after it only needs the k selected latents per token. So the training forward and
backward (`SparseEncoder`, `SparseDecoder`) never build or multiply a dense (tokens, width) feature
matrix: they gather and scatter k rows per token, O(tokens x k x d_in), instead of the two matmuls of the
encoder's size per dense product that autograd through a dense top-k would run. `DecodeFeatures` decodes
dense features with few non-zeros the same way. On the CPU in float32 the hot loops run in C
(`cpu_kernels`); elsewhere in PyTorch operators. `refusal_sae.sae` decides when these paths pay
(`sparse_enough`) and wires them into the SAE.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from refusal_sae import cpu_kernels

SPARSE_RATIO = 8
"""The sparse kernels (a gather or scatter of k rows per token) are used while k <= width / SPARSE_RATIO: on a
CPU a gathered row costs roughly ten times a row of a dense matmul, so for larger k the dense product over all
latents is the cheaper one. The same ratio decides between a dense block and k_aux rows per token for AuxK."""


def sparse_enough(nonzeros: int, total: int) -> bool:
    """Whether `nonzeros` of `total` entries are few enough for the sparse kernels (at most 1 in SPARSE_RATIO)."""
    return nonzeros * SPARSE_RATIO <= total


def matmul_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the encoder matmul runs in: autocast's if it is on (bf16 under bf16-mixed), else the inputs'."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


def encoder_product(centred: Tensor, weight: Tensor, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """W_enc (x - b_dec) in `dtype`, shape (tokens, width), maybe into `out`: the pre-activations before b_enc.

    The one place the training forward and `encode` both compute it, so they select from identical numbers.
    Autocast is off because `dtype` (`matmul_dtype`) already is the dtype it would pick.
    """
    with torch.autocast(centred.device.type, enabled=False):
        return torch.mm(centred.to(dtype), weight.to(dtype).T, out=out)


def auxk_candidates(product: Tensor, bias: Tensor, dead: Tensor, k_aux: int, pairs: bool) -> tuple[Tensor, Tensor]:
    """What AuxK reconstructs from: the top `k_aux` of the dead latents' ReLU'd pre-activations per token.

    `product` is W_enc (x - b_dec) (`encoder_product`), `dead` the dead latents' indices. With `pairs`, (tokens,
    k_aux) values and their latents, ascending in each row as `SparseDecoder` wants them; otherwise a dense
    (tokens, len(dead)) block, zero outside each token's top k_aux, and the 1-D latents of its columns.
    No dead latent: an empty (tokens, 0) block.
    """
    if len(dead) == 0:
        return product.new_zeros(len(product), 0), dead.new_zeros(0)
    block = (product.index_select(1, dead) + bias.to(product.dtype)[dead]).relu()
    if len(dead) <= k_aux:  # every dead latent is selected
        return block, dead.clone()
    top, position = block.topk(k_aux, dim=-1, sorted=False)
    if pairs:
        position, order = position.sort(dim=-1)
        return top.gather(-1, order), dead[position]
    return torch.zeros_like(block).scatter(1, position, top), dead.clone()


def select_topk(product: Tensor, bias: Tensor, k: int) -> tuple[Tensor, Tensor]:
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


def fired_latents(indices: Tensor, values: Tensor, width: int) -> Tensor:
    """Boolean (width,): latents with a non-zero value for some token (a scatter over the k entries per token)."""
    counts = torch.zeros(width, dtype=torch.int32, device=indices.device)
    return counts.index_add_(0, indices.reshape(-1), (values != 0).reshape(-1).to(torch.int32)) > 0


def sparse_outer(latents: Tensor, tokens: Tensor, weights: Tensor, rows: Tensor, width: int) -> Tensor:
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


class SparseEncoder(torch.autograd.Function):
    """Encoder matmul and top-k (plus the AuxK candidates) with a backward pass that reads only selected entries.

    Autograd through a dense top-k would turn the k gradients per token into a dense (tokens, width) matrix
    and multiply it with the input and with W_enc: two more matmuls of the encoder's size, about two thirds
    of a training step. Here the weight gradient is a sparse-dense product (`sparse_outer`), the bias
    gradient a scatter-add, the input gradient a gather of k encoder rows per token (only computed if `x`
    needs it), and the gradient of b_dec, which enters as x - b_dec, is -(bias gradient) @ W_enc: one
    vector-matrix product instead of a (tokens, d_in) matrix.

    Inputs: x (tokens, d_in), b_dec, W_enc, b_enc, k, the matmul dtype, and for AuxK the dead latents (maybe
    none), k_aux and whether to return the AuxK selection as (value, latent) pairs (`sparse_aux`, see
    `auxk_candidates`); last, an optional (tokens, width) tensor to hold the product W_enc (x - b_dec).
    Outputs: values and indices as `select_topk`; aux values and aux latents as `auxk_candidates`.
    """

    @staticmethod
    def forward(ctx, x, b_dec, weight, bias, k, dtype, dead, k_aux, sparse_aux, workspace):
        ctx.set_materialize_grads(False)
        centred = x - b_dec
        product = encoder_product(centred, weight, dtype, out=workspace)
        values, indices = select_topk(product, bias, k)
        aux_values, aux_latents = auxk_candidates(product, bias, dead, k_aux, sparse_aux)
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
            grad_weight = sparse_outer(latents.reshape(-1), tokens, grads.reshape(-1), centred.to(dtype), width)
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


class SparseDecoder(torch.autograd.Function):
    """W_dec^T f for features given as k (value, latent) pairs per token: values and indices, shape (tokens, k),
    latents ascending along each row.

    The forward pass sums k rows of W_dec per token (`embedding_bag`). The backward pass needs, per pair, the
    dot product of the output gradient with that row (a sampled matmul) and, per row of W_dec, the sum of
    the output gradients of the tokens using it (`sparse_outer`): O(tokens x k x d_in) each, where the dense
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
            grad_weight = sparse_outer(indices.reshape(-1), tokens, values.reshape(-1), grad_out, weight.shape[0])
        return None, grad_values, grad_weight


class DecodeFeatures(torch.autograd.Function):
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
            grad_weight = sparse_outer(latents, rows, values, grad_out.to(weight.dtype), weight.shape[0])
        return grad_features, grad_weight, None, None
