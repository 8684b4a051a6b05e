"""Mean-ablation of nodes: the forward passes circuit evaluation is made of (spec section 5).

At every hooked layer the residual stream x is written as its SAE decomposition,

    x = W_dec^T f + b_dec + e,

and an ablation replaces some nodes, a latent f_i or the error e at one position class, by their
mean at that class (`refusal_sae.features.NodeMeans`): at every token of the class. Edits at several
layers compose in one forward pass, so a deeper SAE encodes the stream the shallower edits left.

A variant is {layer: Keep}, where Keep says per mean class which latents (and whether the error) stay;
a layer not in the variant is not edited. The shared template prefix is a mean class of its own per
position, kept unless a variant ablates it on purpose (the sanity check that doing so changes nothing).

Cost. No variant edits anything before its shallowest edited layer L, so the residual stream after L
is the same in every variant that starts there. `Ablator` computes the unedited stream at every SAE
layer once per prompt list (one forward pass up to the deepest SAE layer), and a variant runs only the
blocks after L on it (`ModelWrapper.suffix_last_token_logits`), the head at the last position only:
a per-layer variant at the deepest SAE layer costs the blocks after it, the model itself costs no more.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from refusal_sae.errors import UserError
from refusal_sae.features import NodeMeans
from refusal_sae.metric import RefusalMetric
from refusal_sae.model import LAYER_PREFIX, ModelWrapper
from refusal_sae.sae import SparseAutoencoder


@dataclass(frozen=True)
class Keep:
    """One layer's edit: per mean class the latents that stay (True) and whether the error stays."""

    features: np.ndarray
    """(mean classes, width) bool."""
    errors: np.ndarray
    """(mean classes,) bool."""

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
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"evaluation.batch_size: {batch_size!r} must be an integer >= 1")
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
        self._cache: OrderedDict[tuple[str, ...], list[tuple[Tensor, Tensor, dict[str, Tensor]]]] = OrderedDict()
        self._classes: Tensor | None = None
        self.n_forward = 0
        """Variant batches run so far (for progress and benchmarks)."""

    @property
    def scheme(self):
        return self.means.scheme

    def width(self, layer: str) -> int:
        return self.saes[layer].cfg.width

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
        p = self.scheme.n_prefix
        for layer in layers or self.layers:
            mask = (kept[layer] if inside else ~kept[layer]) | ~candidates[layer]
            keep = self.keep_all(layer)
            keep.features[p:] = mask[:, :-1]
            keep.errors[p:] = mask[:, -1]
            out[layer] = keep
        return out

    def prefix_ablation(self) -> dict[str, Keep]:
        """Every latent and error at the shared prefix positions mean-ablated, nothing else (sanity check)."""
        out = {}
        for layer in self.layers:
            keep = self.keep_all(layer)
            keep.features[: self.scheme.n_prefix] = False
            keep.errors[: self.scheme.n_prefix] = False
            out[layer] = keep
        return out

    # ---------------------------------------------------------------------------------------------
    # forward passes

    def _edit(self, layer: str, keep: Keep) -> Callable[[Tensor], Tensor]:
        sae, mean_f, mean_e = self.saes[layer], self._mean_f[layer], self._mean_e[layer]
        device = mean_f.device
        keep_f = torch.as_tensor(keep.features, device=device)
        keep_e = torch.as_tensor(keep.errors, device=device)
        ablate_error = not bool(keep.errors.all())

        def edit(hidden: Tensor) -> Tensor:
            classes = self._classes
            x = hidden.float()
            f = sae.encode(x)
            patched = torch.where(keep_f[classes], f, mean_f[classes])
            error = x - sae.decode(f)
            if ablate_error:
                error = torch.where(keep_e[classes][..., None], error, mean_e[classes])
            return (sae.decode(patched) + error).to(hidden.dtype)

        return edit

    @torch.no_grad()
    def residuals(self, prompts: Sequence[str]) -> list[tuple[Tensor, Tensor, dict[str, Tensor]]]:
        """Per batch: (attention_mask, mean-class ids, {layer: unedited residual after it}), on the model's
        device; computed on the first call for this prompt list, then reused."""
        key = tuple(prompts)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        batches = []
        for start in range(0, len(key), self.batch_size):
            enc = self.wrapper.tokenize(key[start : start + self.batch_size], "right")
            mask = enc["attention_mask"].to(self.wrapper.device)
            lengths = mask.sum(1).tolist()
            classes = torch.as_tensor(self.scheme.batch_classes(lengths, mask.shape[1]), device=self.wrapper.device)
            hidden = self.wrapper.residuals(enc["input_ids"], mask, self.layers)
            batches.append((mask, classes, hidden))
        self._cache[key] = batches
        while len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)
        return batches

    @torch.no_grad()
    def scores(self, prompts: Sequence[str], variant: Variant | None = None) -> np.ndarray:
        """(n,) float64 refusal scores of `prompts` under `variant` (None or all-keeping: the model)."""
        edits = {layer: self._edit(layer, k) for layer, k in (variant or {}).items() if not k.everything}
        start = next((layer for layer in self.layers if layer in edits), self.layers[-1])
        first = edits.pop(start, None)
        out = []
        try:
            with self.wrapper.edit_residuals(edits):
                for mask, classes, hidden in self.residuals(prompts):
                    self._classes = classes
                    h = hidden[start] if first is None else first(hidden[start])
                    out.append(self.metric.score(self.wrapper.suffix_last_token_logits(h, mask, start)).double().cpu())
                    self.n_forward += 1
        finally:
            self._classes = None
        return torch.cat(out).numpy() if out else np.zeros(0)


__all__ = ["Ablator", "Keep", "Variant"]
