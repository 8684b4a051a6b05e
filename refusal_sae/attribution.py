"""Causal node and edge scores by attribution patching (Marks et al. 2024, "Sparse Feature Circuits", §2).

Correlation (`refusal_sae.circuits`) finds SAE latents whose values go with refusal; it cannot tell a
latent the model USES from one that merely co-occurs with the cause. This module scores every node by
its indirect effect (IE) on the circuit's metric F, the quantity mean-ablation evaluation measures.

The metric. F is the circuit's objective over its prompts (`refusal_sae.objective`), a weighted sum of
per-prompt refusal scores s_p (`RefusalMetric.score` of the last-token logits): F = sum_p w_p s_p.

Being linear in the scores, F's gradient is the sum of per-batch gradients of sum_{p in batch} w_p s_p,
so one backward pass per batch of prompts gives dF for the whole set.

Nodes. At each hooked layer l the residual stream x (batch, seq, d_model) is written as

    x = W_dec^T f + b_dec + err,   f = encode(x) (width latents),   err = x - decode(f),

and a node is one latent f_i or the whole error vector err at one position class c (`refusal_sae.positions`).
Mean-ablating node a replaces its value at every position of class c by its mean there, a_mean(c), as
`refusal_sae.ablation.Ablator` does. Its indirect effect IE(a) = F(a := a_mean) - F is estimated to first
order (attribution patching):

    IE(f_i, c) ~ sum_p sum_{t in c} dF/df_i[p,t] (mean_i(c) - f_i[p,t])
    IE(err, c) ~ sum_p sum_{t in c} <dF/derr[p,t], mean_err(c) - err[p,t]>      (dot product over d_model)

over the real (non-padding) positions t of class c of each prompt; the shared prefix is no node.

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
moved along the straight line from the actual values towards the means of their position classes,
a(alpha) = a + alpha (mean - a)
at alpha_k = (k + 1/2)/steps (the midpoint rule), the other layers left clean, and

    IE_IG(a) = sum_p sum_t (1/steps sum_k dF/da(alpha_k)[p,t]) (mean - a[p,t]),

the midpoint-rule integral of the gradient along the path: exact when F is quadratic along it, and
summing to F(layer ablated) - F over the layer's nodes as steps grows (completeness of IG). It costs
`steps` forward and backward passes per layer and batch.

Edges (Marks et al. §2, eq. 3). For an upstream node u at hooked layer l and a downstream node d at the
next hooked layer l',

    IE(u -> d) ~ sum_p sum_{t in c_u} sum_{t' in c_d} dF/dd[p,t'] dd[p,t']/du[p,t] (mean_u(c_u) - u[p,t]),

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
model's activations for the backward pass; `attribution_edges` also keeps the attached encoder graph
(batch, seq, width) of each downstream layer. Lower `batch_size` when that does not fit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from refusal_sae.circuits import ERROR, Edge, Node, NodeIndex, NodeScores
from refusal_sae.errors import UserError
from refusal_sae.features import NodeMeans
from refusal_sae.metric import RefusalMetric
from refusal_sae.model import LAYER_PREFIX, ModelWrapper
from refusal_sae.prefix import PromptBatch, SharedPrefix
from refusal_sae.sae import SparseAutoencoder
from refusal_sae.validate import (
    non_negative_int,
    non_negative_number,
    one_of,
    positive_int,
)

Estimate = Literal["patching", "ig"]
ESTIMATES: tuple[str, ...] = ("patching", "ig")


@dataclass
class AttributionConfig:
    """Attribution discovery's options."""

    node_threshold: float = 0.1
    """|indirect effect| on F (refusal-score units) a node needs to enter the circuit."""
    estimate: Estimate = "patching"
    """One gradient (patching) or integrated gradients over `ig_steps` steps."""
    ig_steps: int = 10
    """Interpolation steps of integrated gradients."""
    edge_nodes: int = 30
    """Edges are scored among the circuit's `edge_nodes` most important nodes only: every downstream node
    costs one backward pass through the blocks between two SAE layers."""
    edge_threshold: float = 0.01
    """|indirect effect| on F through an edge for it to be kept."""
    batch_size: int = 8
    """Prompts per forward and backward pass."""
    check_nodes: int = 0
    """Per category, check both estimates against exact single-node ablation effects on this many top nodes of
    each and as many random candidates (`refusal_sae.attribution_check`; 0: off). Costs one forward pass over the
    category's prompts per node, and the other estimate's scores."""

    def __post_init__(self) -> None:
        one_of("discovery.attribution.estimate", self.estimate, ESTIMATES)
        non_negative_int("discovery.attribution.check_nodes", self.check_nodes, 0)
        positive_int("discovery.attribution.ig_steps", self.ig_steps, 10)
        positive_int("discovery.attribution.batch_size", self.batch_size, 8)
        non_negative_int("discovery.attribution.edge_nodes", self.edge_nodes, 30)
        non_negative_number("discovery.attribution.node_threshold", self.node_threshold, 0.1)
        non_negative_number("discovery.attribution.edge_threshold", self.edge_threshold, 0.01)


# --------------------------------------------------------------------------------------------------
# set-up


@dataclass
class _Setup:
    layers: list[str]
    """SAE layers in depth order."""
    saes: dict[str, SparseAutoencoder]
    mean_f: dict[str, Tensor]
    """{layer: (mean classes, width)}."""
    mean_err: dict[str, Tensor]
    weights: Tensor
    """(n,) per-prompt weights of F, on the model's device."""
    means: NodeMeans


def _prepare(wrapper: ModelWrapper, saes: Mapping[str, SparseAutoencoder], means: NodeMeans,
             prompts: Sequence[str], weights: np.ndarray, batch_size: int) -> _Setup:
    """Check the inputs (one line per problem) and move SAEs and means to the model's device."""
    where = "attribution"
    if len(prompts) == 0:
        raise UserError(f"{where}: no prompts to attribute over; the circuit's discovery split is empty")
    positive_int(f"{where}: batch_size", batch_size, 8)
    weights = np.asarray(weights, dtype=np.float64).ravel()
    if len(weights) != len(prompts):
        raise UserError(f"{where}: {len(weights)} weights for {len(prompts)} prompts; give one per prompt")
    missing = [layer for layer in saes if layer not in means.features]
    if missing:
        raise UserError(f"{where}: no node means for SAE layer(s) {missing}; run circuit discovery again")
    order = wrapper.resolve_layers(list(saes))
    if set(order) != set(saes):
        raise UserError(f"{where}: SAE layers must be named like {LAYER_PREFIX}<i>, got {sorted(saes)}; rename them")
    device = wrapper.device
    mean_f, mean_err = {}, {}
    n_classes = len(means.scheme.mean_classes)
    for layer in order:
        sae = saes[layer].to(device).eval()
        mf = torch.as_tensor(np.asarray(means.features[layer]), dtype=torch.float32, device=device)
        me = torch.as_tensor(np.asarray(means.errors[layer]), dtype=torch.float32, device=device)
        if mf.shape != (n_classes, sae.cfg.width) or me.shape != (n_classes, sae.cfg.d_in):
            raise UserError(
                f"{where}: means of {layer} have shapes {tuple(mf.shape)} / {tuple(me.shape)} but its SAE has "
                f"{sae.cfg.width} latents over d_in={sae.cfg.d_in}; run circuit discovery again with these SAEs"
            )
        mean_f[layer], mean_err[layer] = mf, me
    w = torch.as_tensor(weights, dtype=torch.float32, device=device)
    return _Setup(order, {layer: saes[layer] for layer in order}, mean_f, mean_err, w, means)


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


@dataclass
class _Batch:
    prompts: PromptBatch
    classes: Tensor
    """(batch, positions that run) mean-class index of every token."""
    onehot: Tensor
    """(batch, positions that run, node classes) float: 1 where a real token belongs to that node class."""

    @property
    def rows(self) -> np.ndarray:
        return self.prompts.rows


def _batches(wrapper: ModelWrapper, prompts: Sequence[str], batch_size: int, means: NodeMeans) -> Iterator[_Batch]:
    """Right-padded batches on the model's device, with each token's position class.

    The shared template prefix holds no node and nothing after it can change it (causal attention), so its
    gradient is never needed: its keys and values are computed once, without gradient and outside the splice
    hooks (`SharedPrefix`), and every batch runs only the positions after it."""
    scheme = means.scheme
    index = NodeIndex.of(scheme, 0)
    for batch in SharedPrefix(wrapper, "attribution", scheme.prefix).batches(prompts, batch_size, scheme,
                                                                              by_length=True):
        classes = batch.run_classes
        node = index.node_class(classes)
        valid = (node >= 0) & batch.mask[:, batch.offset:].bool()
        onehot = torch.nn.functional.one_hot(node.clamp(min=0), index.classes).float() * valid[..., None]
        yield _Batch(batch, classes, onehot)


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


def _interpolate(sae: SparseAutoencoder, mean_f: Tensor, mean_err: Tensor, alpha: float, sites: dict[str, _Site],
                 layer: str) -> Callable[[Tensor], Tensor]:
    """Replace the layer's stream by decode(f_a) + err_a, a = actual + alpha (mean - actual); leaves f_a, err_a.
    `mean_f`, `mean_err` are per token (batch, seq, ...). The site records the ACTUAL values."""

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


def _weighted_score(wrapper: ModelWrapper, metric: RefusalMetric, batch: _Batch, weights: Tensor) -> Tensor:
    """sum_p w_p s_p over the batch: this batch's share of F, differentiable."""
    run = batch.prompts
    return (metric.score(wrapper.last_token_logits_with_grad(run.run_ids, run.mask, run.past)) * weights).sum()


def _grads(objective: Tensor, leaves: Sequence[Tensor], retain: bool = False) -> list[Tensor]:
    """d objective / d leaf for each leaf (zeros where the objective does not depend on it)."""
    grads = torch.autograd.grad(objective, list(leaves), retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]


def _effects(g_f: Tensor, g_err: Tensor, f: Tensor, err: Tensor, mean_f: Tensor, mean_err: Tensor, onehot: Tensor
             ) -> tuple[Tensor, Tensor]:
    """(node classes, width) sum over each class's tokens of g_f (mean_f - f), and (node classes,) the same of
    <g_err, mean_err - err>; `mean_*` per token."""
    feat = torch.einsum("btc,btw->cw", onehot, (mean_f - f.detach()) * g_f)
    error = torch.einsum("btc,bt->c", onehot, ((mean_err - err.detach()) * g_err).sum(-1))
    return feat.double(), error.double()


# --------------------------------------------------------------------------------------------------
# nodes


def attribution_scores(wrapper: ModelWrapper, saes: Mapping[str, SparseAutoencoder], means: NodeMeans,
                       metric: RefusalMetric, prompts: Sequence[str], weights: np.ndarray, *,
                       estimate: str = "patching", steps: int = 10, batch_size: int = 8) -> NodeScores:
    """Indirect effect on F = sum_p weights_p s_p of mean-ablating each node (every latent and the error of
    every SAE layer at every node position class), by attribution patching (`estimate="patching"`) or
    integrated gradients (`"ig"`, `steps` interpolation points per layer); see the module docstring.

    Returns `NodeScores` of method "attribution": `signed[layer]` (node classes, width + 1) = IE
    (refusal-score units, negative when ablating the node lowers F), `importance` = |IE|; no p-values.
    """
    one_of("attribution: estimate", estimate, ESTIMATES)
    positive_int("attribution: ig steps", steps, 10)
    setup = _prepare(wrapper, saes, means, prompts, weights, batch_size)
    layers = setup.layers
    n_node = len(means.scheme.node_classes)
    ie_f = {layer: torch.zeros(n_node, setup.saes[layer].cfg.width, dtype=torch.float64) for layer in layers}
    ie_err = {layer: torch.zeros(n_node, dtype=torch.float64) for layer in layers}

    def add(layer: str, g_f: Tensor, g_err: Tensor, f: Tensor, err: Tensor, batch: _Batch) -> None:
        mf, me = setup.mean_f[layer][batch.classes], setup.mean_err[layer][batch.classes]
        feat, error = _effects(g_f, g_err, f, err, mf, me, batch.onehot)
        ie_f[layer] += feat.cpu()
        ie_err[layer] += error.cpu()

    with _frozen(setup.saes):
        for batch in _batches(wrapper, prompts, batch_size, means):
            w = setup.weights[batch.rows]
            if estimate == "patching":
                sites: dict[str, _Site] = {}
                edits = {layer: _splice(setup.saes[layer], sites, layer, attach=False) for layer in layers}
                with wrapper.edit_residuals(edits):
                    objective = _weighted_score(wrapper, metric, batch, w)
                grads = _grads(objective, [t for layer in layers for t in (sites[layer].f, sites[layer].err)])
                for i, layer in enumerate(layers):
                    add(layer, grads[2 * i], grads[2 * i + 1], sites[layer].f, sites[layer].err, batch)
                continue
            for layer in layers:  # integrated gradients, one layer at a time
                sum_f = sum_err = actual = None
                mf, me = setup.mean_f[layer][batch.classes], setup.mean_err[layer][batch.classes]
                for k in range(steps):
                    sites = {}
                    edit = _interpolate(setup.saes[layer], mf, me, (k + 0.5) / steps, sites, layer)
                    with wrapper.edit_residuals({layer: edit}):
                        objective = _weighted_score(wrapper, metric, batch, w)
                    g_f, g_err = _grads(objective, [sites[layer].f, sites[layer].err])
                    sum_f = g_f if sum_f is None else sum_f + g_f
                    sum_err = g_err if sum_err is None else sum_err + g_err
                    actual = sites[layer]
                add(layer, sum_f / steps, sum_err / steps, actual.f_attached, actual.err_attached, batch)

    signed = {layer: NodeIndex.join(ie_f[layer].numpy(), ie_err[layer].numpy()) for layer in layers}
    return NodeScores("attribution", layers, means.scheme.node_classes, {k: np.abs(v) for k, v in signed.items()},
                      signed, None, len(prompts))


# --------------------------------------------------------------------------------------------------
# edges


def attribution_edges(wrapper: ModelWrapper, saes: Mapping[str, SparseAutoencoder], means: NodeMeans,
                      metric: RefusalMetric, prompts: Sequence[str], weights: np.ndarray, nodes: Sequence[Node], *,
                      batch_size: int = 8) -> list[Edge]:
    """Attribution-patching effects of the edges between `nodes` of adjacent hooked layers (in depth
    order), one vector-Jacobian product per downstream node and batch; see the module docstring.

    Returns Edge(source=u.name, target=d.name, weight=|effect|, score=effect) for every pair whose effect
    is non-zero, upstream layer by layer, in the order of `nodes`.
    """
    setup = _prepare(wrapper, saes, means, prompts, weights, batch_size)
    layers = setup.layers
    position = {p: i for i, p in enumerate(means.scheme.node_classes)}
    by_layer: dict[str, list[Node]] = {layer: [] for layer in layers}
    seen: set[str] = set()
    for n in nodes:
        if n.layer not in by_layer:
            raise UserError(f"edge attribution: node {n.name} is in a layer with no SAE ({', '.join(layers)})")
        width = setup.saes[n.layer].cfg.width
        if (n.feature != ERROR and not 0 <= n.feature < width) or n.position not in position:
            raise UserError(f"edge attribution: node {n.name} is no node of its SAE (width {width}, positions "
                            f"{list(position)})")
        if n.name not in seen:
            seen.add(n.name)
            by_layer[n.layer].append(n)
    pairs = [(up, down) for up, down in zip(layers, layers[1:]) if by_layer[up] and by_layer[down]]
    if not pairs:
        return []
    downstream = {down for _, down in pairs}
    effects = {(up, down): torch.zeros(len(by_layer[up]), len(by_layer[down]), dtype=torch.float64)
               for up, down in pairs}

    with _frozen(setup.saes):
        for batch in _batches(wrapper, prompts, batch_size, means):
            sites: dict[str, _Site] = {}
            edits = {layer: _splice(setup.saes[layer], sites, layer, attach=layer in downstream) for layer in layers}
            with wrapper.edit_residuals(edits):
                objective = _weighted_score(wrapper, metric, batch, setup.weights[batch.rows])
            down_layers = sorted(downstream, key=layers.index)
            grads = _grads(objective, [t for layer in down_layers for t in (sites[layer].f, sites[layer].err)],
                           retain=True)
            total = {layer: (grads[2 * i], grads[2 * i + 1]) for i, layer in enumerate(down_layers)}  # dF/dd
            for up, down in pairs:
                u_site, d_site = sites[up], sites[down]
                delta_f = setup.mean_f[up][batch.classes] - u_site.f.detach()
                delta_err = setup.mean_err[up][batch.classes] - u_site.err.detach()
                total_f, total_err = total[down]
                for j, d in enumerate(by_layer[down]):
                    where = batch.onehot[..., position[d.position]]
                    if d.feature == ERROR:
                        v = (total_err * d_site.err_attached).sum(-1)
                    else:
                        v = total_f[..., d.feature] * d_site.f_attached[..., d.feature]
                    v = (v * where).sum()
                    if not v.requires_grad:
                        continue
                    g_f, g_err = _grads(v, [u_site.f, u_site.err], retain=True)
                    col = effects[(up, down)][:, j]
                    for i, u in enumerate(by_layer[up]):
                        at = batch.onehot[..., position[u.position]]
                        if u.feature == ERROR:
                            col[i] += float(((g_err * delta_err).sum(-1) * at).sum())
                        else:
                            col[i] += float((g_f[..., u.feature] * delta_f[..., u.feature] * at).sum())
            del objective, grads, total, sites

    edges = []
    for up, down in pairs:
        e = effects[(up, down)].numpy()
        for i, u in enumerate(by_layer[up]):
            for j, d in enumerate(by_layer[down]):
                if e[i, j] != 0:
                    edges.append(Edge(u.name, d.name, float(abs(e[i, j])), float(e[i, j])))
    return edges


__all__ = ["AttributionConfig", "attribution_edges", "attribution_scores"]
