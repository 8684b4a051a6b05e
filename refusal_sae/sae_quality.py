"""How good each SAE is, judged as SAELens and SAEBench judge one: by what splicing it into the model costs.

On held-out prompts, at the positions after the shared template prefix (the prefix is the same in every prompt,
so an SAE need not reconstruct it and the analysis never edits it), per SAE layer:

    fvu            sum |x - x_hat|^2 / sum |x - mean x|^2 over those positions (and apart, over the message
                   and over the template suffix, where the model decides)
    l0             active latents per token; dead: latents active on none of the tokens; dense: on more than
                   half of them
    ce_clean       next-token cross-entropy of the model (nats per predicted token) at those positions
    ce_spliced     the same with the layer's residual replaced by the SAE's reconstruction there
    ce_mean        the same with the residual replaced by its mean over those positions (the zero-information
                   baseline)
    loss_recovered (ce_mean - ce_spliced) / (ce_mean - ce_clean): 1 for a perfect SAE, 0 for one no better
                   than the mean
    kl_spliced     mean KL(clean || spliced) of the next-token distributions; kl_mean the same for the mean

A token is predicted at every scored position that has a next token in the prompt (the last position's next
token is the answer's first, unknown here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from refusal_sae.model import ModelWrapper
from refusal_sae.positions import PositionScheme
from refusal_sae.prefix import PromptBatch, SharedPrefix, expand
from refusal_sae.sae import SparseAutoencoder

DENSE = 0.5
"""A latent active on more than this share of the tokens is dense (always on)."""


@dataclass
class LayerQuality:
    layer: str
    n_tokens: int
    """Scored positions (after the template prefix)."""
    n_predicted: int
    """Of those, positions whose next token is in the prompt (the cross-entropy's tokens)."""
    fvu: float
    fvu_content: float
    fvu_suffix: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    ce_clean: float
    ce_spliced: float
    ce_mean: float
    loss_recovered: float
    kl_spliced: float
    kl_mean: float


class _Sums:
    """Running sums of one layer's statistics over batches."""

    def __init__(self, width: int, d: int) -> None:
        self.sq_err = {"all": 0.0, "content": 0.0, "suffix": 0.0}
        self.x_sum = {k: torch.zeros(d, dtype=torch.float64) for k in self.sq_err}
        self.x_sq = dict.fromkeys(self.sq_err, 0.0)
        self.n = dict.fromkeys(self.sq_err, 0)
        self.active = torch.zeros(width, dtype=torch.float64)
        self.l0 = 0.0
        self.ce = {"spliced": 0.0, "mean": 0.0}
        self.kl = {"spliced": 0.0, "mean": 0.0}

    def fvu(self, part: str) -> float:
        n = self.n[part]
        if n == 0:
            return float("nan")
        total = self.x_sq[part] - float((self.x_sum[part] ** 2).sum()) / n
        return self.sq_err[part] / total if total > 0 else float("nan")


def _next_token_losses(wrapper: ModelWrapper, hidden: Tensor, targets: Tensor, predicted: Tensor,
                       clean_logp: Tensor | None = None) -> tuple[float, float, Tensor]:
    """Summed cross-entropy of the next tokens `targets` at the `predicted` positions of final-norm outputs
    `hidden` (batch, seq, d_model), the head run at those positions only; the summed KL(clean || these) when
    `clean_logp` (an earlier call's log-probabilities) is given; and these log-probabilities."""
    logp = F.log_softmax(wrapper.unembed(hidden[predicted]).float(), dim=-1)
    ce = float(-logp.gather(-1, targets[predicted][:, None]).sum())
    kl = float((clean_logp.exp() * (clean_logp - logp)).sum()) if clean_logp is not None else 0.0
    return ce, kl, logp


@torch.no_grad()
def sae_quality(wrapper: ModelWrapper, saes: Mapping[str, SparseAutoencoder], prompts: Sequence[str],
                scheme: PositionScheme, batch_size: int = 8) -> list[LayerQuality]:
    """Every SAE's quality (module docstring) on `prompts` (held-out ones: the SAEs never trained on them).

    Nothing before `scheme.prefix` is scored or edited, so the template prefix's keys and values are computed
    once (`SharedPrefix`) and every pass runs only the positions after it; the head runs only where a next
    token is predicted."""
    layers = wrapper.resolve_layers(list(saes))
    engine = SharedPrefix(wrapper, "SAE quality", scheme.prefix)
    n_batches = -(-len(prompts) // batch_size)
    sums = {layer: _Sums(saes[layer].cfg.width, saes[layer].cfg.d_in) for layer in layers}

    def positions(pb: PromptBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(scored, suffix, predicted, targets) over the positions that run."""
        mask = pb.mask.bool()
        at = torch.arange(mask.shape[1], device=mask.device)
        length = mask.sum(1, keepdim=True)
        scored = (mask & (at >= scheme.prefix))[:, pb.offset:]
        suffix = scored & (at >= length - scheme.suffix)[:, pb.offset:]
        predicted = scored & (at < length - 1)[:, pb.offset:]  # the last token's next is the answer's, unknown
        targets = torch.cat([pb.input_ids[:, 1:], pb.input_ids[:, :1]], 1)[:, pb.offset:]
        return scored, suffix, predicted, targets

    # pass 1: each SAE on the residual (FVU, L0, dead and dense latents) and the residual's mean over the scored
    # positions (the mean-ablation baseline of pass 2)
    for pb in tqdm(engine.batches(prompts, batch_size, by_length=True), total=n_batches, desc="SAE quality: reconstructions",
                   unit="batch", leave=False):
        scored, suffix, _, _ = positions(pb)
        residuals = wrapper.residuals(pb.run_ids, pb.mask, layers, past=pb.past)
        for layer in layers:
            sae, s = saes[layer].to(wrapper.device), sums[layer]
            x = residuals[layer].float()
            f = sae.encode(x)
            err = ((x - sae.decode(f)) ** 2).sum(-1)
            for part, where in (("all", scored), ("content", scored & ~suffix), ("suffix", suffix)):
                s.sq_err[part] += float(err[where].sum())
                s.x_sum[part] += x[where].double().sum(0).cpu()
                s.x_sq[part] += float((x[where].double() ** 2).sum())
                s.n[part] += int(where.sum())
            active = f[scored] > 0
            s.active += active.double().sum(0).cpu()
            s.l0 += float(active.sum())
    means = {layer: (s.x_sum["all"] / max(s.n["all"], 1)).float().to(wrapper.device) for layer, s in sums.items()}
    # pass 2: the next-token losses, clean, with each SAE spliced in, and with the residual at its mean; an edited
    # pass runs only the blocks after its layer, on the clean residual edited there
    ce_clean, n_predicted = 0.0, 0
    for pb in tqdm(engine.batches(prompts, batch_size, by_length=True), total=n_batches, desc="SAE quality: spliced passes",
                   unit="batch", leave=False):
        scored, _, predicted, targets = positions(pb)
        residuals = wrapper.residuals(pb.run_ids, pb.mask, layers,
                                      past=None if pb.past is None else expand(engine.cache, len(pb.run_ids)))
        hidden = wrapper.final_hidden(pb.run_ids, pb.mask, past=pb.past)
        ce, _, clean_logp = _next_token_losses(wrapper, hidden, targets, predicted)
        ce_clean += ce
        n_predicted += int(predicted.sum())
        for layer in layers:
            sae, s, x = saes[layer], sums[layer], residuals[layer]
            for name in ("spliced", "mean"):
                new = sae.decode(sae.encode(x.float())) if name == "spliced" else means[layer].expand_as(x)
                edited = torch.where(scored[..., None], new.to(x.dtype), x)
                past = None if pb.past is None else expand(engine.cache, len(pb.run_ids))
                out = wrapper.suffix_final_hidden(edited, pb.mask, layer, past=past)
                ce, kl, _ = _next_token_losses(wrapper, out, targets, predicted, clean_logp)
                s.ce[name] += ce
                s.kl[name] += kl
    out = []
    for layer in layers:
        s = sums[layer]
        n = max(s.n["all"], 1)
        clean, spliced, mean = (ce_clean / max(n_predicted, 1), s.ce["spliced"] / max(n_predicted, 1),
                                s.ce["mean"] / max(n_predicted, 1))
        gap = mean - clean
        out.append(LayerQuality(layer, s.n["all"], n_predicted, s.fvu("all"), s.fvu("content"), s.fvu("suffix"),
                                s.l0 / n, float((s.active == 0).double().mean()),
                                float((s.active / n > DENSE).double().mean()), clean, spliced, mean,
                                (mean - spliced) / gap if gap > 0 else float("nan"),
                                s.kl["spliced"] / max(n_predicted, 1), s.kl["mean"] / max(n_predicted, 1)))
    return out


def quality_table(rows: Sequence[LayerQuality]) -> str:
    """A markdown table of `sae_quality`'s rows."""
    header = ("| layer | tokens | FVU (message / suffix) | L0 | dead | dense | CE clean / spliced / mean | loss "
              "recovered | KL spliced / mean |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r.layer} | {r.n_tokens} | {r.fvu:.3f} ({r.fvu_content:.3f} / {r.fvu_suffix:.3f}) | "
                     f"{r.l0:.1f} | {r.dead_fraction:.1%} | {r.dense_fraction:.1%} | {r.ce_clean:.3f} / "
                     f"{r.ce_spliced:.3f} / {r.ce_mean:.3f} | {r.loss_recovered:.3f} | {r.kl_spliced:.4f} / "
                     f"{r.kl_mean:.4f} |")
    return "\n".join(lines) + "\n"


__all__ = ["DENSE", "LayerQuality", "quality_table", "sae_quality"]
