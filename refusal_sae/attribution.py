"""Causal node and edge scores by attribution patching (Marks et al. 2024, "Sparse Feature Circuits", §2).

Correlation (`refusal_sae.circuits`) finds SAE latents whose values go with refusal; it cannot tell a
latent the model USES from one that merely co-occurs with the cause. This module scores every node by
its indirect effect (IE) on the circuit's metric F, the quantity mean-ablation evaluation measures.

The metric. F is the circuit's `refusal_contrast` over its prompts, a weighted sum of per-prompt
refusal scores s_p (`RefusalMetric.score` of the last-token logits):

    F = sum_p w_p s_p,   w_p = +1/n_pos (positive prompt), -1/n_neg (other) for a circuit of group "all",
                         w_p = 1/n for a "toxic" or "safe" circuit (F = their mean score).

Being linear in the scores, F's gradient is the sum of per-batch gradients of sum_{p in batch} w_p s_p,
so one backward pass per batch of prompts gives dF for the whole set.

Nodes. At each hooked layer l the residual stream x (batch, seq, d_model) is written as

    x = W_dec^T f + b_dec + err,   f = encode(x) (width latents),   err = x - decode(f),

and a node is one latent f_i or the whole error vector err. Mean-ablating node a replaces its value at
every position by a_mean (the per-feature mean over the discovery tokens, or the mean error vector), as
`refusal_sae.ablation.Ablator` does. Its indirect effect IE(a) = F(a := a_mean) - F is estimated to first
order (attribution patching):

    IE(f_i) ~ sum_p sum_t dF/df_i[p,t] (mean_i - f_i[p,t])
    IE(err) ~ sum_p sum_t <dF/derr[p,t], mean_err - err[p,t]>      (dot product over d_model)

over the real (non-padding) positions t of each prompt.

Total effects (Marks et al.'s stop-gradient trick). The gradient must be the TOTAL effect of a node on F,
through every later layer, not the effect with later SAE nodes held fixed. In the forward hook of each SAE
layer, with x the residual as it arrives (attached to the graph of earlier layers),

    f   = encode(x).detach()               a leaf that requires grad
    err = (x - decode(f)).detach()         a leaf that requires grad
    y   = decode(f) + err                  equal to x
    x'  = x + (y - y.detach())             what the block emits: numerically x

so the forward pass is unchanged, x' passes gradient to x with the identity (earlier layers see the
total effect through this layer's residual), and the leaves receive dF/df = dF/dx' W_dec^T and
dF/derr = dF/dx'. One forward and one backward pass per batch score every node of every layer.

Integrated gradients (Marks et al. appendix; `method="ig"`). Where F is not linear in a node, one
gradient at the clean point can be far off. For each layer separately the whole layer's (f, err) is
moved along the straight line from the actual values towards the means, a(alpha) = a + alpha (mean - a)
at alpha_k = (k + 1/2)/steps (the midpoint rule), the other layers left clean, and

    IE_IG(a) = sum_p sum_t (1/steps sum_k dF/da(alpha_k)[p,t]) (mean - a[p,t]),

the midpoint-rule integral of the gradient along the path: exact when F is quadratic along it, and
summing to F(layer ablated) - F over the layer's nodes as steps grows (completeness of IG). It costs
`steps` forward and backward passes per layer and batch.

Edges (Marks et al. §2, eq. 3). For an upstream node u at hooked layer l and a downstream node d at the
next hooked layer l',

    IE(u -> d) ~ sum_p sum_t sum_t' dF/dd[p,t'] dd[p,t']/du[p,t] (mean_u - u[p,t]),

where d is the downstream SAE's latent (or error vector) computed from the ATTACHED residual at l', so
dd/du runs through the model's blocks between l and l' only, and dF/dd is d's total effect (above). It
is one vector-Jacobian product per downstream node: backpropagate v = sum_{p,t'} dF/dd[p,t'] . d[p,t']
(dF/dd held constant) to layer l's leaves, then weight by (mean_u - u) as for nodes. Through the
identity residual path an edge u -> d with d the same direction as u carries u's whole effect; through
the top-k encoder, dd/du is W_enc[d] . W_dec[u] while d is active and 0 while it is not. Because
decode(f(x)) + err(x) = x, the edges out of u into ALL nodes of l' (latents and error) add up to u's node
effect through l'. A latent that is exactly 0 sits at its ReLU kink (zero gradient), so to first order
the downstream error node, not the latent, takes up a change that would switch it on: expect large
u -> error edges where ablation turns latents on (e.g. safe prompts in which the latent is silent).

Memory. A batch keeps, per hooked layer, the features (batch, seq, width) and their gradient, plus the
model's activations for the backward pass; `edge_scores` also keeps the attached encoder graph
(batch, seq, width) of each downstream layer. Lower `batch_size` when that does not fit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from refusal_sae.ablation import contrast_weights
from refusal_sae.circuits import ERROR, Edge, Node, NodeScores, node_name
from refusal_sae.errors import UserError
from refusal_sae.metric import RefusalMetric
from refusal_sae.model import LAYER_PREFIX, ModelWrapper
from refusal_sae.sae import SparseAutoencoder

METHODS = ("patching", "ig")
GROUPS = ("all", "toxic", "safe")


# --------------------------------------------------------------------------------------------------
# checks and set-up


@dataclass
class _Setup:
    layers: list[str]
    """SAE layers in depth order."""
    saes: dict[str, SparseAutoencoder]
    mean_f: dict[str, Tensor]
    mean_err: dict[str, Tensor]
    weights: Tensor
    """(n,) per-prompt weights of F, on the model's device."""


def _prepare(
    wrapper: ModelWrapper,
    saes: Mapping[str, SparseAutoencoder],
    feature_means: Mapping[str, np.ndarray],
    error_means: Mapping[str, np.ndarray],
    prompts: Sequence[str],
    positive: np.ndarray,
    group: str,
    batch_size: int,
) -> _Setup:
    where = "attribution"
    if len(prompts) == 0:
        raise UserError(f"{where}: no prompts given; the circuit's prompt set is empty")
    if not saes:
        raise UserError(f"{where}: no SAEs given; train or load at least one SAE layer")
    if group not in GROUPS:
        raise UserError(f"{where}: unknown group {group!r}; use one of {', '.join(GROUPS)}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise UserError(f"{where}: batch_size {batch_size!r} is not a positive integer; give e.g. 8")
    positive = np.asarray(positive, dtype=bool).ravel()
    if len(positive) != len(prompts):
        raise UserError(f"{where}: {len(positive)} positive labels for {len(prompts)} prompts; give one per prompt")
    if group == "all" and (positive.all() or not positive.any()):
        kind = "negative (safe)" if positive.all() else "positive (toxic)"
        raise UserError(
            f"{where}: a circuit of group 'all' contrasts positive and negative prompts, but these {len(prompts)} "
            f"prompts have no {kind} one; use group 'toxic'/'safe' or add prompts"
        )
    missing = [layer for layer in saes if layer not in feature_means or layer not in error_means]
    if missing:
        raise UserError(f"{where}: no feature means for SAE layer(s) {missing}; run circuit discovery again")
    order = wrapper.resolve_layers(list(saes))
    if set(order) != set(saes):
        raise UserError(
            f"{where}: SAE layers must be named like {LAYER_PREFIX}<i>, got {sorted(saes)}; rename them"
        )
    device = wrapper.device
    mean_f, mean_err = {}, {}
    for layer in order:
        sae = saes[layer].to(device).eval()
        mf = torch.as_tensor(np.asarray(feature_means[layer]), dtype=torch.float32, device=device)
        me = torch.as_tensor(np.asarray(error_means[layer]), dtype=torch.float32, device=device)
        if mf.shape != (sae.cfg.width,) or me.shape != (sae.cfg.d_in,):
            raise UserError(
                f"{where}: means of {layer} have shapes {tuple(mf.shape)} / {tuple(me.shape)} but its SAE has "
                f"{sae.cfg.width} latents over d_in={sae.cfg.d_in}; run circuit discovery again with these SAEs"
            )
        mean_f[layer], mean_err[layer] = mf, me
    weights = torch.as_tensor(contrast_weights(positive, group), dtype=torch.float32, device=device)
    return _Setup(order, {layer: saes[layer] for layer in order}, mean_f, mean_err, weights)


@contextlib.contextmanager
def _frozen(saes: Mapping[str, SparseAutoencoder]) -> Iterator[None]:
    """SAE parameters need no gradient here (backward would compute W_dec's for nothing); restored after."""
    saved = [(p, p.requires_grad) for sae in saes.values() for p in sae.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _batches(wrapper: ModelWrapper, prompts: Sequence[str], batch_size: int) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """(rows, input_ids, attention_mask) per batch, right-padded, on the model's device."""
    for start in range(0, len(prompts), batch_size):
        rows = slice(start, min(start + batch_size, len(prompts)))
        enc = wrapper.tokenize(prompts[rows], "right")
        yield rows, enc["input_ids"].to(wrapper.device), enc["attention_mask"].to(wrapper.device)


# --------------------------------------------------------------------------------------------------
# hooks


@dataclass
class _Site:
    """One SAE layer's nodes in one batch: leaves f (batch, seq, width) and err (batch, seq, d_in) that the
    gradient is taken with respect to; `*_attached`: for edges, the same values attached to the graph of
    earlier layers; for integrated gradients, the actual (un-interpolated) values."""

    f: Tensor
    err: Tensor
    f_attached: Tensor | None = None
    err_attached: Tensor | None = None


def _splice(sae: SparseAutoencoder, sites: dict[str, _Site], layer: str, attach: bool) -> Callable[[Tensor], Tensor]:
    """The stop-gradient splice x -> x + (y - y.detach()), y = decode(f) + err over leaves f, err (see module doc)."""

    def edit(hidden: Tensor) -> Tensor:
        x = hidden.float()
        if attach:
            f_att = sae.encode(x)
            err_att = x - sae.decode(f_att)
            f, err = f_att.detach().requires_grad_(), err_att.detach().requires_grad_()
        else:
            with torch.no_grad():
                f = sae.encode(x)
                err = x - sae.decode(f)
            f_att = err_att = None
            f.requires_grad_()
            err.requires_grad_()
        sites[layer] = _Site(f, err, f_att, err_att)
        y = sae.decode(f) + err
        return (x + (y - y.detach())).to(hidden.dtype)

    return edit


def _interpolate(
    sae: SparseAutoencoder, mean_f: Tensor, mean_err: Tensor, alpha: float, sites: dict[str, _Site], layer: str
) -> Callable[[Tensor], Tensor]:
    """Replace the layer's stream by decode(f_a) + err_a, a = actual + alpha (mean - actual); leaves f_a, err_a.
    The site records the ACTUAL values (as leaves' siblings) for the (mean - actual) factor."""

    def edit(hidden: Tensor) -> Tensor:
        with torch.no_grad():
            x = hidden.float()
            f = sae.encode(x)
            err = x - sae.decode(f)
            f_a = (f + alpha * (mean_f - f)).requires_grad_()
            err_a = (err + alpha * (mean_err - err)).requires_grad_()
        sites[layer] = _Site(f_a, err_a, f, err)
        return (sae.decode(f_a) + err_a).to(hidden.dtype)

    return edit


def _weighted_score(
    wrapper: ModelWrapper, metric: RefusalMetric, input_ids: Tensor, mask: Tensor, weights: Tensor
) -> Tensor:
    """sum_p w_p s_p over the batch: this batch's share of F, differentiable."""
    return (metric.score(wrapper.last_token_logits_with_grad(input_ids, mask)) * weights).sum()


def _grads(objective: Tensor, leaves: Sequence[Tensor], retain: bool = False) -> list[Tensor]:
    """d objective / d leaf for each leaf (zeros where the objective does not depend on it)."""
    grads = torch.autograd.grad(objective, list(leaves), retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]


def _effects(
    g_f: Tensor, g_err: Tensor, f: Tensor, err: Tensor, mean_f: Tensor, mean_err: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """(width,) sum_{p,t} g_f (mean_f - f) and the scalar sum_{p,t} <g_err, mean_err - err>, real positions only."""
    m = mask.to(g_f.dtype)
    feat = ((mean_f - f.detach()) * g_f * m[..., None]).sum((0, 1))
    error = (((mean_err - err.detach()) * g_err).sum(-1) * m).sum()
    return feat.double(), error.double()


# --------------------------------------------------------------------------------------------------
# nodes


def attribution_scores(
    wrapper: ModelWrapper,
    saes: Mapping[str, SparseAutoencoder],
    feature_means: Mapping[str, np.ndarray],
    error_means: Mapping[str, np.ndarray],
    metric: RefusalMetric,
    prompts: Sequence[str],
    positive: np.ndarray,
    group: str,
    *,
    method: str = "patching",
    steps: int = 10,
    batch_size: int = 8,
    include_errors: bool = True,
) -> NodeScores:
    """Indirect effect on F of mean-ablating each node (every latent of every SAE layer, and each layer's
    error node), by attribution patching (`method="patching"`) or integrated gradients (`"ig"`, `steps`
    interpolation points per layer); see the module docstring for the maths.

    `positive` (one bool per prompt) and `group` define F as `refusal_contrast` does. Returns a
    `NodeScores` of method "attribution": `signed[layer]` = IE (refusal-score units, negative when
    ablating the node lowers F), `importance` = |IE|, one entry per latent then the error node's when
    `include_errors`; no p-values.
    """
    if method not in METHODS:
        raise UserError(f"attribution: unknown method {method!r}; use 'patching' or 'ig'")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise UserError(f"attribution: ig steps {steps!r} must be a positive integer; give e.g. 10")
    setup = _prepare(wrapper, saes, feature_means, error_means, prompts, positive, group, batch_size)
    layers = setup.layers
    ie_f = {layer: torch.zeros(setup.saes[layer].cfg.width, dtype=torch.float64) for layer in layers}
    ie_err = {layer: torch.zeros((), dtype=torch.float64) for layer in layers}

    def add(layer: str, g_f: Tensor, g_err: Tensor, f: Tensor, err: Tensor, mask: Tensor) -> None:
        feat, error = _effects(g_f, g_err, f, err, setup.mean_f[layer], setup.mean_err[layer], mask)
        ie_f[layer] += feat.cpu()
        ie_err[layer] += error.cpu()

    with _frozen(setup.saes):
        for rows, input_ids, mask in _batches(wrapper, prompts, batch_size):
            w = setup.weights[rows]
            if method == "patching":
                sites: dict[str, _Site] = {}
                edits = {layer: _splice(setup.saes[layer], sites, layer, attach=False) for layer in layers}
                with wrapper.edit_residuals(edits):
                    objective = _weighted_score(wrapper, metric, input_ids, mask, w)
                grads = _grads(objective, [t for layer in layers for t in (sites[layer].f, sites[layer].err)])
                for i, layer in enumerate(layers):
                    add(layer, grads[2 * i], grads[2 * i + 1], sites[layer].f, sites[layer].err, mask)
                continue
            for layer in layers:  # integrated gradients, one layer at a time
                sum_f = sum_err = actual = None
                for k in range(steps):
                    sites = {}
                    edit = _interpolate(setup.saes[layer], setup.mean_f[layer], setup.mean_err[layer],
                                        (k + 0.5) / steps, sites, layer)
                    with wrapper.edit_residuals({layer: edit}):
                        objective = _weighted_score(wrapper, metric, input_ids, mask, w)
                    g_f, g_err = _grads(objective, [sites[layer].f, sites[layer].err])
                    sum_f = g_f if sum_f is None else sum_f + g_f
                    sum_err = g_err if sum_err is None else sum_err + g_err
                    actual = sites[layer]
                add(layer, sum_f / steps, sum_err / steps, actual.f_attached, actual.err_attached, mask)

    importance, signed = {}, {}
    for layer in layers:
        values = ie_f[layer].numpy()
        if include_errors:
            values = np.append(values, ie_err[layer].item())
        signed[layer] = values
        importance[layer] = np.abs(values)
    return NodeScores("attribution", layers, importance, signed, None, len(prompts))


# --------------------------------------------------------------------------------------------------
# edges


def edge_scores(
    wrapper: ModelWrapper,
    saes: Mapping[str, SparseAutoencoder],
    feature_means: Mapping[str, np.ndarray],
    error_means: Mapping[str, np.ndarray],
    metric: RefusalMetric,
    prompts: Sequence[str],
    positive: np.ndarray,
    group: str,
    nodes: Sequence[Node],
    *,
    batch_size: int = 8,
) -> list[Edge]:
    """Attribution-patching effects of the edges between `nodes` of adjacent hooked layers (in depth
    order), one vector-Jacobian product per downstream node and batch; see the module docstring.

    Returns Edge(source=u.name, target=d.name, weight=|effect|, score=effect) for every pair whose effect
    is non-zero, upstream layer by layer, in the order of `nodes`.
    """
    setup = _prepare(wrapper, saes, feature_means, error_means, prompts, positive, group, batch_size)
    layers = setup.layers
    by_layer: dict[str, list[Node]] = {layer: [] for layer in layers}
    seen: set[tuple[str, int]] = set()
    for n in nodes:
        if n.layer not in by_layer:
            raise UserError(f"edge attribution: node {n.name} is in a layer with no SAE ({', '.join(layers)})")
        width = setup.saes[n.layer].cfg.width
        if n.feature != ERROR and not 0 <= n.feature < width:
            raise UserError(f"edge attribution: node {n.name} is no latent of its SAE (width {width})")
        if (n.layer, n.feature) not in seen:
            seen.add((n.layer, n.feature))
            by_layer[n.layer].append(n)
    pairs = [(up, down) for up, down in zip(layers, layers[1:]) if by_layer[up] and by_layer[down]]
    if not pairs:
        return []
    downstream = {down for _, down in pairs}
    effects = {(up, down): torch.zeros(len(by_layer[up]), len(by_layer[down]), dtype=torch.float64)
               for up, down in pairs}

    with _frozen(setup.saes):
        for rows, input_ids, mask in _batches(wrapper, prompts, batch_size):
            m = mask.to(torch.float32)
            sites: dict[str, _Site] = {}
            edits = {layer: _splice(setup.saes[layer], sites, layer, attach=layer in downstream) for layer in layers}
            with wrapper.edit_residuals(edits):
                objective = _weighted_score(wrapper, metric, input_ids, mask, setup.weights[rows])
            down_layers = sorted(downstream, key=layers.index)
            grads = _grads(objective, [t for layer in down_layers for t in (sites[layer].f, sites[layer].err)],
                           retain=True)
            total = {layer: (grads[2 * i], grads[2 * i + 1]) for i, layer in enumerate(down_layers)}  # dF/dd
            for up, down in pairs:
                u_site, d_site = sites[up], sites[down]
                u_feats = [n.feature for n in by_layer[up] if n.feature != ERROR]
                u_error = [i for i, n in enumerate(by_layer[up]) if n.feature == ERROR]
                u_cols = [i for i, n in enumerate(by_layer[up]) if n.feature != ERROR]
                delta_f = (setup.mean_f[up][u_feats] - u_site.f.detach()[..., u_feats]) * m[..., None]
                delta_err = (setup.mean_err[up] - u_site.err.detach()) * m[..., None]
                total_f, total_err = total[down]
                for j, d in enumerate(by_layer[down]):
                    if d.feature == ERROR:
                        v = (total_err * d_site.err_attached).sum(-1)
                    else:
                        v = total_f[..., d.feature] * d_site.f_attached[..., d.feature]
                    v = (v * m).sum()
                    if not v.requires_grad:
                        continue
                    g_f, g_err = _grads(v, [u_site.f, u_site.err], retain=True)
                    col = effects[(up, down)][:, j]
                    if u_cols:
                        col[u_cols] += (g_f[..., u_feats] * delta_f).sum((0, 1)).double().cpu()
                    if u_error:
                        col[u_error] += (g_err * delta_err).sum().double().cpu()
            del objective, grads, total, sites

    edges = []
    for up, down in pairs:
        e = effects[(up, down)].numpy()
        for i, u in enumerate(by_layer[up]):
            for j, d in enumerate(by_layer[down]):
                if e[i, j] != 0:
                    edges.append(Edge(node_name(up, u.feature), node_name(down, d.feature), float(abs(e[i, j])),
                                      float(e[i, j])))
    return edges


__all__ = ["METHODS", "attribution_scores", "edge_scores"]
