"""SAE features of the discovery prompts, per position class: what discovery scores and ablation replaces.

For each prompt and hooked layer, every token's residual x is encoded, f = encode(x), with error
e = x - decode(f). Tokens are sorted into position classes (`refusal_sae.positions`) and

    node value (prompt, class, latent) = mean of f over the prompt's tokens of that class
    node value (prompt, class, error)  = mean of |e| over those tokens

are what correlation discovery correlates with the label. The ablation value of a node is its mean
per class over the discovery tokens, balanced by label,

    mean(class) = (mean over toxic prompts' tokens + mean over safe prompts' tokens) / 2,

so that it removes what varies between prompts without leaning towards one label (toxic prompts are
shorter in some categories, so an unbalanced token mean would lean towards the safe ones). A latent is
live at a class when it fires on at least one discovery token of that class: only live latents are
candidate nodes (ablating a latent that is always 0 to its mean 0 changes nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save
from tqdm.auto import tqdm

from refusal_sae.activations import PromptActivations
from refusal_sae.circuits import NodeIndex
from refusal_sae.errors import UserError
from refusal_sae.io import atomic_open
from refusal_sae.positions import PositionScheme
from refusal_sae.sae import SparseAutoencoder


@dataclass
class NodeMeans:
    """Per layer the ablation value of every node at every mean class (prefix positions, then node classes)."""

    scheme: PositionScheme
    features: dict[str, np.ndarray]
    """{layer: (mean classes, width)}."""
    errors: dict[str, np.ndarray]
    """{layer: (mean classes, d_in)} mean error vector."""

    @property
    def layers(self) -> list[str]:
        return list(self.features)

    def live(self, layer: str) -> np.ndarray:
        """(node classes, width) latents that fired on a discovery token of each node class."""
        return self.features[layer][NodeIndex.of(self.scheme, self.features[layer].shape[1]).rows] > 0

    def write(self, path: Path) -> None:
        """One safetensors file; the position scheme and layer order in its metadata."""
        tensors = {**{f"features.{k}": v for k, v in self.features.items()},
                   **{f"errors.{k}": v for k, v in self.errors.items()}}
        meta = {k: str(v) for k, v in self.scheme.to_dict().items()} | {"layers": ",".join(self.layers)}
        with atomic_open(path, "wb") as f:
            f.write(save(tensors, metadata=meta))

    @classmethod
    def read(cls, path: Path) -> NodeMeans:
        try:
            with safe_open(path, framework="numpy") as f:
                meta = f.metadata() or {}
                scheme = PositionScheme(meta["mode"], int(meta["prefix"]), int(meta["suffix"]))
                layers = meta["layers"].split(",")
                return cls(scheme, {k: f.get_tensor(f"features.{k}") for k in layers},
                           {k: f.get_tensor(f"errors.{k}") for k in layers})
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"{path}: not a node-means file of this version ({e}); run discovery again") from e


@dataclass
class PromptFeatures:
    """Per-prompt node values of the discovery prompts, with their labels and the node means."""

    layers: list[str]
    values: dict[str, np.ndarray]
    """{layer: (prompts, node classes, width + 1)}: latents' mean per class, then the error's mean norm."""
    prompt_index: np.ndarray
    categories: np.ndarray
    labels: np.ndarray
    """The dataset's refusal_label (True = toxic)."""
    means: NodeMeans

    def __len__(self) -> int:
        return len(self.prompt_index)

    def subset(self, mask: np.ndarray) -> PromptFeatures:
        """The rows where `mask` holds (the means stay those of all discovery prompts)."""
        return PromptFeatures(self.layers, {k: v[mask] for k, v in self.values.items()}, self.prompt_index[mask],
                              self.categories[mask], self.labels[mask], self.means)


@torch.no_grad()
def encode_prompts(saes: Mapping[str, SparseAutoencoder], prompts: PromptActivations, scheme: PositionScheme
                   ) -> PromptFeatures:
    """Encode every token of every prompt; node values per prompt and class; label-balanced class means."""
    layers = list(saes)
    missing = [layer for layer in layers if layer not in prompts.layers]
    if missing:
        raise UserError(f"the activation cache has no layer {missing}; SAEs and cache must cover the same layers")
    n = len(prompts)
    if n == 0:
        raise UserError("circuit discovery: the discovery split holds no prompts")
    n_mean = len(scheme.mean_classes)
    index = {layer: NodeIndex.of(scheme, sae.cfg.width) for layer, sae in saes.items()}
    rows = NodeIndex.of(scheme, 0).rows
    values = {layer: np.zeros((n, *index[layer].shape), np.float32) for layer in saes}
    # per label (0 safe, 1 toxic): sums over tokens per mean class, and token counts
    f_sum = {layer: torch.zeros(2, n_mean, sae.cfg.width, dtype=torch.float64) for layer, sae in saes.items()}
    e_sum = {layer: torch.zeros(2, n_mean, sae.cfg.d_in, dtype=torch.float64) for layer, sae in saes.items()}
    counts = torch.zeros(2, n_mean, dtype=torch.float64)
    index, categories, labels = [], [], []
    for i in tqdm(range(n), desc="encoding prompts", unit="prompt", leave=False):
        item = prompts[i]
        index.append(item["prompt_index"])
        categories.append(item["category"])
        labels.append(item["refusal_label"])
        label = int(item["refusal_label"])
        length = len(next(iter(item["activations"].values())))
        cls = torch.from_numpy(scheme.classes(length))
        onehot = torch.nn.functional.one_hot(cls, n_mean).double()  # (tokens, mean classes)
        per_class = onehot.sum(0)
        counts[label] += per_class
        node_onehot = onehot[:, rows] / per_class[rows]  # averaging weights per node class
        for layer, sae in saes.items():
            x = item["activations"][layer].float()
            f = sae.encode(x).double()
            err = x.double() - sae.decode(f.float()).double()
            f_sum[layer][label] += onehot.T @ f
            e_sum[layer][label] += onehot.T @ err
            NodeIndex.latents(values[layer][i])[:] = (node_onehot.T @ f).numpy()
            NodeIndex.errors(values[layer][i])[:] = (node_onehot.T @ err.norm(dim=-1)).numpy()
    has = counts > 0
    if not has.any(0).all():
        raise UserError("circuit discovery: some position class has no discovery token; check the prompts")

    def balanced(sums: torch.Tensor) -> np.ndarray:
        per_label = sums / counts.clamp(min=1)[..., None]  # (2, classes, dim)
        weight = has.double() / has.sum(0, keepdim=True).double()  # average of the labels present
        return (per_label * weight[..., None]).sum(0).float().numpy()

    means = NodeMeans(scheme, {k: balanced(v) for k, v in f_sum.items()}, {k: balanced(v) for k, v in e_sum.items()})
    return PromptFeatures(layers, values, np.array(index), np.array(categories), np.array(labels, bool), means)


__all__ = ["NodeMeans", "PromptFeatures", "encode_prompts"]
