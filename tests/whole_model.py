"""The whole-model path of an ablation, built from the maths alone: what `Ablator.scores` must equal.

Every variant runs the whole model, its edits hooked at their layers by `ModelWrapper.edit_residuals`:
encode the residual, put every latent that is not kept at its mean of the token's class, the error
likewise, decode. The tests compare `Ablator` with it; the ablation benchmark times it. `node_means`
gives both the means to ablate to, as discovery computes them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from refusal_sae.ablation import Ablator, Keep, Variant
from refusal_sae.activations import ActivationConfig, InferencePipeline, PromptActivations
from refusal_sae.data import PromptSample
from refusal_sae.features import NodeMeans, encode_prompts
from refusal_sae.model import ModelWrapper
from refusal_sae.positions import PositionMode, position_scheme
from refusal_sae.sae import SparseAutoencoder


def node_means(wrapper: ModelWrapper, saes: Mapping[str, SparseAutoencoder], prompts: Sequence[str],
               mode: PositionMode, root: Path) -> NodeMeans:
    """The ablation means of `saes` over `prompts` (half of them labelled toxic), as discovery computes them."""
    samples = [PromptSample(p, "c", i % 2 == 0, "toxic" if i % 2 == 0 else "hard", "test") for i, p in
               enumerate(prompts)]
    cache = InferencePipeline(wrapper, ActivationConfig(layers=list(saes), shard_size=64), root).run(
        {"discovery": samples})
    scheme = position_scheme(wrapper, samples, mode)
    return encode_prompts(saes, PromptActivations(cache, ["discovery"]), scheme).means


def hooked_edit(sae: SparseAutoencoder, means: NodeMeans, layer: str, keep: Keep, classes: torch.Tensor
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """One layer's edit for a batch whose tokens have mean classes `classes`."""
    device = classes.device
    mean_f = torch.as_tensor(means.features[layer], device=device)[classes]
    mean_e = torch.as_tensor(means.errors[layer], device=device)[classes]
    keep_f = torch.as_tensor(keep.features, device=device)[classes]
    keep_e = torch.as_tensor(keep.errors, device=device)[classes][..., None]

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.float()
        f = sae.encode(x)
        error = x - sae.decode(f)
        return (sae.decode(torch.where(keep_f, f, mean_f)) + torch.where(keep_e, error, mean_e)).to(hidden.dtype)

    return edit


@torch.no_grad()
def whole_model_scores(abl: Ablator, prompts: Sequence[str], variant: Variant | None) -> np.ndarray:
    """Per-prompt scores (float64) of the whole model with the variant's edits hooked, in `abl`'s batches."""
    wrapper, scheme = abl.wrapper, abl.means.scheme
    out = []
    for start in range(0, len(prompts), abl.batch_size):
        enc = wrapper.tokenize(prompts[start : start + abl.batch_size], "right")
        mask = enc["attention_mask"].to(wrapper.device)
        classes = torch.as_tensor(scheme.batch_classes(mask.sum(1).tolist(), mask.shape[1]), device=wrapper.device)
        edits = {layer: hooked_edit(abl.saes[layer], abl.means, layer, keep, classes)
                 for layer, keep in (variant or {}).items()}
        with wrapper.edit_residuals(edits):
            out.append(abl.metric.score(wrapper.last_token_logits(enc["input_ids"], mask)).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


__all__ = ["hooked_edit", "node_means", "whole_model_scores"]
