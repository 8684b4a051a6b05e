"""Mean-ablation of nodes: the forward passes circuit evaluation is made of (spec section 5).

At every hooked layer the residual stream x is written as its SAE decomposition,

    x = W_dec^T f + b_dec + e,

and an ablation replaces some nodes, a latent f_i or the error e at one position class, by their
mean at that class (`refusal_sae.features.NodeMeans`): at every token of the class. Edits at several
layers compose in one forward pass, so a deeper SAE encodes the stream the shallower edits left.

A variant is {layer: Keep}, where Keep says per mean class which latents (and whether the error) stay;
a layer not in the variant is not edited. The shared template prefix is a mean class of its own per
position, kept unless a variant ablates it on purpose (the sanity check that doing so changes nothing).

Cost. The shared template prefix is never edited (with positional classes), so its keys and values are
the same in every variant and every prompt: they are computed once (`refusal_sae.prefix.SharedPrefix`) and
every forward pass runs only the positions after it. No variant edits anything before its shallowest
edited layer L, so the residual stream after L is the same in every variant that starts there: the
unedited stream at every SAE layer is computed once per prompt list (its SAE encoding at L too, once
a variant starts there), and a variant runs only the blocks after L on it
(`ModelWrapper.suffix_last_token_logits`), the head at the last position only. A model
whose cache cannot be continued (checked once per model against a plain forward) runs whole prompts; the
evaluation's prefix sanity check compares this path with whole prompts under an edit on every run.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from refusal_sae.circuits import NodeIndex
from refusal_sae.errors import UserError
from refusal_sae.features import NodeMeans
from refusal_sae.metric import RefusalMetric
from refusal_sae.model import LAYER_PREFIX, ModelWrapper
from refusal_sae.prefix import PromptBatch, SharedPrefix, in_given_order
from refusal_sae.sae import SparseAutoencoder
from refusal_sae.validate import positive_int


@dataclass(frozen=True)
class Keep:
    """One layer's edit: per mean class the latents that stay (True) and whether the error stays."""

    features: np.ndarray
    """(mean classes, width) bool."""
    errors: np.ndarray
    """(mean classes,) bool."""
    zero_errors: bool = False
    """An error that does not stay is set to 0, not to its mean: the SAE's reconstruction spliced in there."""

    @property
    def everything(self) -> bool:
        return bool(self.features.all()) and bool(self.errors.all())


Variant = Mapping[str, Keep]


class Ablator:
    """Per-prompt refusal scores under mean-ablations of nodes at the SAE layers."""

    CACHE_SIZE = 4
    """Prompt lists whose unedited residuals are kept (least recently used dropped first)."""

    def __init__(self, wrapper: ModelWrapper, saes: Mapping[str, SparseAutoencoder], means: NodeMeans,
                 metric: RefusalMetric, batch_size: int = 8) -> None:
        missing = [layer for layer in saes if layer not in means.features]
        if missing:
            raise UserError(f"no node means for SAE layer(s) {missing}; run circuit discovery again")
        positive_int("evaluation.batch_size", batch_size, 8)
        self.wrapper, self.means, self.metric, self.batch_size = wrapper, means, metric, batch_size
        device = wrapper.device
        order = wrapper.resolve_layers(list(saes))
        if set(order) != set(saes):
            raise UserError(f"SAE layers must be named like {LAYER_PREFIX}<i>, got {sorted(saes)}; rename them")
        self.layers = order
        """SAE layers in depth order."""
        self.saes = {layer: saes[layer].to(device).eval() for layer in order}
        for layer, sae in self.saes.items():
            shapes = (means.features[layer].shape, means.errors[layer].shape)
            expected = ((len(means.scheme.mean_classes), sae.cfg.width), (len(means.scheme.mean_classes), sae.cfg.d_in))
            if shapes != expected:
                raise UserError(f"node means of {layer} have shapes {shapes}, its SAE needs {expected}; "
                                "run circuit discovery again with these SAEs")
        self._mean_f = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in means.features.items()}
        self._mean_e = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in means.errors.items()}
        self._cache: OrderedDict[tuple[str, ...], list[_Batch]] = OrderedDict()
        self._prefix = SharedPrefix(wrapper, "evaluation", means.scheme.prefix)
        self.n_forward = 0
        """Variant batches run so far (for progress and benchmarks)."""

    @property
    def scheme(self):
        return self.means.scheme

    @property
    def reuses_prefix(self) -> bool:
        """Whether variants run only the positions after the shared prefix (its keys and values computed once)."""
        return self._prefix.reused

    def width(self, layer: str) -> int:
        return self.saes[layer].cfg.width

    def node_index(self, layer: str) -> NodeIndex:
        return NodeIndex.of(self.scheme, self.width(layer))

    # ---------------------------------------------------------------------------------------------
    # variants

    def keep_all(self, layer: str) -> Keep:
        n = len(self.scheme.mean_classes)
        return Keep(np.ones((n, self.width(layer)), bool), np.ones(n, bool))

    def variant(self, kept: Mapping[str, np.ndarray], candidates: Mapping[str, np.ndarray],
                layers: Sequence[str] | None = None, inside: bool = True) -> dict[str, Keep]:
        """The edit of every layer in `layers` (default all) from node masks, each (node classes, width + 1),
        the last column the error node.

        Only candidate nodes are ever ablated: with `inside` the `kept` candidates stay and every other
        candidate is mean-ablated (F(C)); otherwise the `kept` candidates are ablated and the rest stays
        (F(M \\ C)). A node that is no candidate (a latent silent on the discovery prompts, or the error
        term when error terms are kept) always stays, and so do the prefix classes.
        """
        out = {}
        for layer in layers or self.layers:
            mask = (kept[layer] if inside else ~kept[layer]) | ~candidates[layer]
            keep = self.keep_all(layer)
            rows = self.node_index(layer).rows
            keep.features[rows] = NodeIndex.latents(mask)
            keep.errors[rows] = NodeIndex.errors(mask)
            out[layer] = keep
        return out

    def splice(self, layer: str) -> dict[str, Keep]:
        """`layer`'s SAE reconstruction in place of its residual after the shared prefix (its error set to 0),
        nothing else edited: how much of the score the dictionary misses (sanity check)."""
        keep = self.keep_all(layer)
        keep.errors[self.node_index(layer).rows] = False
        return {layer: Keep(keep.features, keep.errors, zero_errors=True)}

    def prefix_ablation(self) -> dict[str, Keep]:
        """Every latent and error at the shared prefix positions mean-ablated, nothing else (sanity check)."""
        out = {}
        for layer in self.layers:
            keep = self.keep_all(layer)
            rows = self.node_index(layer).prefix_rows
            keep.features[rows] = False
            keep.errors[rows] = False
            out[layer] = keep
        return out

    # ---------------------------------------------------------------------------------------------
    # forward passes

    def edit(self, layer: str, keep: Keep, values: tuple[Tensor, Tensor] | None = None) -> Callable[..., Tensor]:
        """`edit(hidden, classes, f=None)`: the residual `hidden` (batch, seq, d) after `layer`, each position of
        mean class `classes` (batch, seq), with the nodes `keep` does not keep set to their mean there, or to
        `values` ((latents, errors) tables indexed by `classes` as the means are, e.g. `prompt_values`)."""
        sae, mean_f, mean_e = self.saes[layer], self._mean_f[layer], self._mean_e[layer]
        if values is not None:
            mean_f, mean_e = values
        device = mean_f.device
        keep_f = torch.as_tensor(keep.features, device=device)
        keep_e = torch.as_tensor(keep.errors, device=device)
        ablate_error = not bool(keep.errors.all())
        per_prompt = values is not None  # classes c + i * C: prompt i's class c; which nodes stay depends on c

        def edit(hidden: Tensor, classes: Tensor, f: Tensor | None = None) -> Tensor:
            # decode(patched) + error = x + (patched - f) W_dec (the decoder is affine): one matmul, and
            # a token whose nodes are all kept comes back exactly as it went in. `f`: encode(hidden), when
            # the caller has it (the unedited first layer's, the same in every variant)
            x = hidden.float()
            f = sae.encode(x) if f is None else f
            kept = classes % len(keep_f) if per_prompt else classes
            out = x + torch.where(keep_f[kept], 0.0, mean_f[classes] - f) @ sae.W_dec
            if ablate_error:  # the error term x - decode(f) replaced by its mean (or 0) where ablated
                swap = (0.0 if keep.zero_errors else mean_e[classes]) - (x - sae.decode(f))
                out = out + torch.where(keep_e[kept][..., None], 0.0, swap)
            return out.to(hidden.dtype)

        return edit

    def scale(self, layer: str, nodes: np.ndarray, strength: float) -> Callable[..., Tensor]:
        """`edit(hidden, classes)` like `edit`, but the latents of `nodes` ((node classes, width + 1) bool; error
        nodes ignored) multiplied by `strength` where they fire (steering: 0 zero-ablates them, 1 changes
        nothing, above 1 amplifies)."""
        sae = self.saes[layer]
        index = self.node_index(layer)
        chosen = np.zeros((len(self.scheme.mean_classes), index.width), bool)
        chosen[index.rows] = NodeIndex.latents(nodes)
        chosen_t = torch.as_tensor(chosen, device=self.wrapper.device)

        def edit(hidden: Tensor, classes: Tensor) -> Tensor:
            x = hidden.float()
            f = sae.encode(x)
            return (x + torch.where(chosen_t[classes], (strength - 1.0) * f, 0.0) @ sae.W_dec).to(hidden.dtype)

        return edit

    @torch.no_grad()
    def prompt_values(self, prompts: Sequence[str]) -> dict[str, tuple[Tensor, Tensor]]:
        """{layer: (latents (n * C, width), errors (n * C, d_in))}: each prompt's node values per mean class (its
        mean over the prompt's tokens of that class; row i * C + c), the values counterfactual patching sets nodes
        to: class c of prompt i is `classes + i * C` (`refusal_sae.generation`'s `class_offsets`). A class the
        prompt has no token of (the prefix, when its keys and values are reused) holds the node means."""
        n_class = len(self.scheme.mean_classes)
        out = {}
        for layer in self.layers:
            sae, parts_f, parts_e = self.saes[layer], [], []
            for cached in self.residuals(prompts):
                batch = cached.prompts
                x = cached.hidden[layer].float()
                f = sae.encode(x)
                err = x - sae.decode(f)
                real = batch.mask[:, batch.offset:].bool()
                onehot = torch.nn.functional.one_hot(batch.run_classes, n_class).float() * real[..., None]
                counts = onehot.sum(1)[..., None]  # (batch, C, 1)
                have = counts > 0
                parts_f.append(torch.where(have, torch.einsum("bsc,bsw->bcw", onehot, f) / counts.clamp(min=1),
                                           self._mean_f[layer]))
                parts_e.append(torch.where(have, torch.einsum("bsc,bsd->bcd", onehot, err) / counts.clamp(min=1),
                                           self._mean_e[layer]))
            rows = [cached.prompts.rows for cached in self.residuals(prompts)]
            out[layer] = (in_given_order(rows, parts_f).flatten(0, 1), in_given_order(rows, parts_e).flatten(0, 1))
        return out

    @torch.no_grad()
    def residuals(self, prompts: Sequence[str]) -> list[_Batch]:
        """Per batch of `prompts`: masks, classes and the unedited residual at every SAE layer (after the
        shared prefix when its keys and values are reused); computed once per prompt list, then reused."""
        key = tuple(prompts)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        batches = [_Batch(b, self.wrapper.residuals(b.run_ids, b.mask, self.layers, past=b.past))
                   for b in self._prefix.batches(key, self.batch_size, self.scheme, by_length=True)]
        self._cache[key] = batches
        while len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)
        return batches

    @torch.no_grad()
    def scores(self, prompts: Sequence[str], variant: Variant | None = None) -> np.ndarray:
        """(n,) float64 refusal scores of `prompts` under `variant` (None or all-keeping: the model)."""
        variant = {layer: k for layer, k in (variant or {}).items() if not k.everything}
        edits = {layer: self.edit(layer, k) for layer, k in variant.items()}
        rows = {layer: self.node_index(layer).prefix_rows for layer in variant}
        prefix_edited = any(not (k.features[rows[layer]].all() and k.errors[rows[layer]].all())
                            for layer, k in variant.items())
        start = next((layer for layer in self.layers if layer in edits), self.layers[-1])
        out, rows = [], []
        for cached in self.residuals(prompts):
            batch = cached.prompts
            if prefix_edited and batch.past is not None:  # the prefix itself is edited: run it too
                with self.wrapper.edit_residuals(at(edits, batch.classes)):
                    logits = self.wrapper.last_token_logits(batch.input_ids, batch.mask)
            else:
                classes = batch.run_classes
                later = {layer: e for layer, e in edits.items() if layer != start}
                h = cached.hidden[start]
                if start in edits:
                    h = edits[start](h, classes, self.saes[start].densify(*cached.features(start, self.saes[start])))
                with self.wrapper.edit_residuals(at(later, classes)):
                    logits = self.wrapper.suffix_last_token_logits(h, batch.mask, start, past=batch.past)
            out.append(self.metric.score(logits).double().cpu())
            rows.append(batch.rows)
            self.n_forward += 1
        return in_given_order(rows, out).numpy() if out else np.zeros(0)


def at(edits: Mapping[str, Callable[..., Tensor]], classes: Tensor) -> dict[str, Callable[[Tensor], Tensor]]:
    """`Ablator.edit`s bound to the mean classes of the positions a forward pass runs (`edit_residuals`' hooks)."""
    return {layer: functools.partial(e, classes=classes) for layer, e in edits.items()}


@dataclass
class _Batch:
    prompts: PromptBatch
    hidden: dict[str, Tensor]
    """Unedited residual after each SAE layer: the positions after the prefix (with `past`) or all."""
    encoded: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def features(self, layer: str, sae: SparseAutoencoder) -> tuple[Tensor, Tensor]:
        """The SAE's top-k (values, indices) of the unedited residual at `layer`: encoded once, reused by
        every variant whose first edit is there."""
        if layer not in self.encoded:
            self.encoded[layer] = sae.encode_topk(self.hidden[layer].float())
        return self.encoded[layer]


__all__ = ["Ablator", "Keep", "Variant"]
