"""Circuit evaluation by mean-ablation (spec section 5; Marks et al. 2024, section 3).

At every hooked layer the residual stream x is rewritten as its SAE decomposition,

    x = W_dec^T f + b_dec + error,

and an ablation replaces some features f_i (and possibly the error term) by their mean over the
discovery split's tokens, at every position. All layers are edited in one forward pass, so a deeper
SAE encodes the stream the shallower edits produced. With C a circuit (a set of feature and error nodes):

    F(M)     no edit                                 the model
    F(C)     every node NOT in C mean-ablated        the circuit alone
    F(M\\C)   every node in C mean-ablated            the model without the circuit
    F(∅)     every node mean-ablated                 nothing left

    faithfulness = (F(C) - F(∅)) / (F(M) - F(∅))     1: the circuit suffices
    completeness = (F(M\\C) - F(∅)) / (F(M) - F(∅))   0: the circuit is necessary (Marks et al.)
    completeness_ratio = F(M\\C) / F(M)               the spec's ratio, reported as well

F is a function of the refusal scores of a set of held-out prompts (see `refusal_contrast`). With
`keep_errors` the error terms are never ablated (the spec's variant: only features are judged).
An edit that keeps every node is skipped, so the full circuit reproduces F(M) exactly.

Cost (`AblationConfig.prefix_cache`, on by default): no edit touches the blocks up to the first SAE
layer, so their output is the same in every variant of a sweep. `Ablator` computes it once per prompt
list (and batch), applies the first layer's edit to it, and runs only the later blocks, whose hooks
apply the deeper edits, then the final norm and the head at the last position
(`ModelWrapper.suffix_last_token_logits`). With SAEs at layers 12, 16, 20 of a 24-block model, a
sweep of 18 variants costs 13 + 18 x 11 blocks instead of 18 x 24 (`benchmarks/bench_ablation.py`).
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from refusal_sae.circuits import ERROR, Circuit, Node
from refusal_sae.errors import UserError
from refusal_sae.metric import RefusalMetric
from refusal_sae.model import LAYER_PREFIX, ModelWrapper
from refusal_sae.sae import SparseAutoencoder


@dataclass
class AblationConfig:
    """How circuits are judged."""

    keep_errors: bool = False
    """Never ablate SAE error terms (the spec's variant); false: an error node not in the circuit is
    mean-ablated like a feature (Marks et al.)."""
    batch_size: int = 8
    """Prompts per forward pass."""
    seed: int = 0
    """Seed of the random circuits of the baseline."""
    prefix_cache: bool = True
    """Run the blocks before the first SAE layer once per prompt list and keep their output: every
    ablated variant of a sweep (2 + 4 per sweep point) feeds the same prompts through those unedited
    blocks, so each variant then runs only the blocks after that layer and the head at the last
    position. Same scores up to float rounding; false runs the whole model for every variant."""


@dataclass(frozen=True)
class Keep:
    """What one layer's edit keeps: a boolean mask over the SAE's latents, and whether the error stays."""

    features: Tensor
    error: bool

    @property
    def everything(self) -> bool:
        return bool(self.features.all()) and self.error


class Ablator:
    """Refusal scores of prompts under mean-ablations at the SAE layers."""

    def __init__(
        self,
        wrapper: ModelWrapper,
        saes: Mapping[str, SparseAutoencoder],
        feature_means: Mapping[str, np.ndarray],
        error_means: Mapping[str, np.ndarray],
        metric: RefusalMetric,
        cfg: AblationConfig | None = None,
    ) -> None:
        missing = [layer for layer in saes if layer not in feature_means or layer not in error_means]
        if missing:
            raise UserError(f"no feature means for SAE layer(s) {missing}; run circuit discovery again")
        self.wrapper = wrapper
        self.cfg = cfg or AblationConfig()
        device = wrapper.device
        self.saes = {layer: sae.to(device).eval() for layer, sae in saes.items()}
        self.feature_means = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in feature_means.items()}
        self.error_means = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in error_means.items()}
        self.metric = metric
        depth = {layer: int(wrapper.resolve_layers([layer])[0].removeprefix(LAYER_PREFIX)) for layer in self.saes}
        self.first_layer: str | None = min(depth, key=depth.__getitem__) if depth else None
        """The shallowest SAE layer: with `prefix_cache`, the residual stream after it is cached."""
        self._prefix: OrderedDict[tuple[str, ...], list[tuple[Tensor, Tensor]]] = OrderedDict()

    PREFIX_CACHE_SIZE = 4
    """Prompt lists whose prefix residuals are kept (least recently used dropped first)."""

    @property
    def layers(self) -> list[str]:
        return list(self.saes)

    def _edit(self, layer: str, keep: Keep) -> Callable[[Tensor], Tensor]:
        sae, mean_f, mean_err = self.saes[layer], self.feature_means[layer], self.error_means[layer]
        mask = keep.features.to(mean_f.device)

        def edit(hidden: Tensor) -> Tensor:
            x = hidden.float()
            f = sae.encode(x)
            error = x - sae.decode(f) if keep.error else mean_err
            return (sae.decode(torch.where(mask, f, mean_f)) + error).to(hidden.dtype)

        return edit

    @torch.no_grad()
    def scores(self, prompts: Sequence[str], keep: Mapping[str, Keep] | None = None) -> Tensor:
        """(n,) refusal scores of `prompts` with the given per-layer edits (None or all-keeping: no edit).

        With `prefix_cache` the residual stream after the first SAE layer is computed once per prompt
        list (`prefix`); the first layer's edit is applied to it here and the deeper edits by hooks on
        the blocks that run after it (`ModelWrapper.suffix_last_token_logits`).
        """
        edits = {layer: self._edit(layer, k) for layer, k in (keep or {}).items() if not k.everything}
        out = []
        if self.cfg.prefix_cache and self.first_layer is not None:
            first_edit = edits.pop(self.first_layer, None)
            batches = self.prefix(prompts)
            with self.wrapper.edit_residuals(edits):
                for attention_mask, hidden in batches:
                    if first_edit is not None:
                        hidden = first_edit(hidden)
                    logits = self.wrapper.suffix_last_token_logits(hidden, attention_mask, self.first_layer)
                    out.append(self.metric.score(logits))
            return torch.cat(out).cpu() if out else torch.zeros(0)
        with self.wrapper.edit_residuals(edits):
            for start in range(0, len(prompts), self.cfg.batch_size):
                enc = self.wrapper.tokenize(prompts[start : start + self.cfg.batch_size], "right")
                out.append(self.metric.score(self.wrapper.last_token_logits(enc["input_ids"], enc["attention_mask"])))
        return torch.cat(out).cpu() if out else torch.zeros(0)

    @torch.no_grad()
    def prefix(self, prompts: Sequence[str]) -> list[tuple[Tensor, Tensor]]:
        """Per batch of `prompts`: (attention_mask, unedited residual stream after the first SAE layer),
        on the model's device; computed on the first call for this prompt list, then reused."""
        key = tuple(prompts)
        if key in self._prefix:
            self._prefix.move_to_end(key)
            return self._prefix[key]
        batches = []
        for start in range(0, len(key), self.cfg.batch_size):
            enc = self.wrapper.tokenize(key[start : start + self.cfg.batch_size], "right")
            mask = enc["attention_mask"].to(self.wrapper.device)
            hidden = self.wrapper.residuals(enc["input_ids"], mask, [self.first_layer])
            batches.append((mask, next(iter(hidden.values()))))
        self._prefix[key] = batches
        while len(self._prefix) > self.PREFIX_CACHE_SIZE:
            self._prefix.popitem(last=False)
        return batches

    def clear_prefix_cache(self) -> None:
        """Forget the cached prefix residuals (e.g. after changing the model's weights)."""
        self._prefix.clear()

    def keep_circuit(self, nodes: Sequence[Node]) -> dict[str, Keep]:
        """Edits for F(C): keep the nodes, mean-ablate the rest."""
        return {layer: self._keep(layer, nodes, inside=True) for layer in self.layers}

    def keep_complement(self, nodes: Sequence[Node]) -> dict[str, Keep]:
        """Edits for F(M\\C): mean-ablate the nodes, keep the rest."""
        return {layer: self._keep(layer, nodes, inside=False) for layer in self.layers}

    def _keep(self, layer: str, nodes: Sequence[Node], inside: bool) -> Keep:
        width = self.saes[layer].cfg.width
        device = self.feature_means[layer].device
        in_circuit = torch.zeros(width, dtype=torch.bool, device=device)
        features = [n.feature for n in nodes if n.layer == layer and n.feature != ERROR]
        in_circuit[features] = True
        error_in = any(n.layer == layer and n.feature == ERROR for n in nodes)
        keep_error = self.cfg.keep_errors or (error_in if inside else not error_in)
        return Keep(in_circuit if inside else ~in_circuit, keep_error)

    def keep_nothing(self) -> dict[str, Keep]:
        """Edits for F(∅)."""
        return self.keep_circuit([])


def contrast_weights(positive: np.ndarray, group: str) -> np.ndarray:
    """(n,) weights w that define F of a circuit's held-out prompts as sum_p w_p score_p.

    A circuit of a whole category ("all") must explain why the model refuses one kind of prompt and
    not the other: +1/n_pos for positive prompts (toxic, or refused), -1/n_neg for the others, so F =
    mean positive score - mean negative score. A toxic or safe circuit is judged on its own prompts
    only: 1/n each, F = their mean score. Attribution differentiates this same F.
    """
    positive = np.asarray(positive, dtype=bool)
    n = len(positive)
    if group != "all":
        return np.full(n, 1.0 / n)
    n_pos = int(positive.sum())
    return np.where(positive, 1.0 / n_pos, -1.0 / (n - n_pos))


def refusal_contrast(scores: Tensor, positive: np.ndarray, group: str) -> float:
    """F of a circuit's held-out prompts from their per-prompt refusal scores (`contrast_weights`)."""
    weights = torch.as_tensor(contrast_weights(positive, group), dtype=torch.float64)
    return float(weights @ scores.detach().cpu().double())


def normalised(f: float, f_model: float, f_empty: float) -> float | None:
    """(f - F(∅)) / (F(M) - F(∅)), or None when F(M) = F(∅) and the ratio is undefined."""
    span = f_model - f_empty
    if abs(span) <= 1e-6 * max(1.0, abs(f_model), abs(f_empty)):
        return None
    return (f - f_empty) / span


def random_nodes(circuit: Circuit, candidates: Mapping[str, np.ndarray], rng: np.random.Generator) -> list[Node]:
    """A random circuit with as many feature nodes per layer as `circuit` (drawn from `candidates`, the
    latents that fire on the discovery prompts) and the same error nodes."""
    nodes = [n for n in circuit.nodes if n.feature == ERROR]
    for layer in circuit.layers:
        k = len(circuit.features(layer))
        pool = candidates[layer]
        if k > len(pool):
            pool = np.arange(max(k, int(pool.max(initial=-1)) + 1))
        nodes += [Node(layer, int(i), 0.0) for i in rng.choice(pool, size=k, replace=False)]
    return nodes


def circuit_rng(seed: int, name: str, point: int) -> np.random.Generator:
    """Seeded per (seed, circuit, sweep point): the baseline does not depend on evaluation order."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), point])


def evaluate_sweep(
    ablator: Ablator,
    prompts: Sequence[str],
    positive: np.ndarray,
    circuit: Circuit,
    sweep: Sequence[Circuit],
    candidates: Mapping[str, np.ndarray],
) -> dict:
    """Faithfulness and completeness of each sweep point (and of a random circuit of equal size)."""
    if circuit.group == "all" and (positive.all() or not positive.any()):
        kind = "safe" if positive.all() else "toxic"
        raise UserError(
            f"evaluation split of category {circuit.category!r} has no {kind} prompts (positive labels "
            f"{int(positive.sum())} of {len(positive)}); raise data.prompts.eval_fraction or use more prompts"
        )

    def f(keep: Mapping[str, Keep] | None) -> float:
        return refusal_contrast(ablator.scores(prompts, keep), positive, circuit.group)

    f_model, f_empty = f(None), f(ablator.keep_nothing())
    result: dict = {
        "name": circuit.name, "category": circuit.category, "group": circuit.group, "method": circuit.method,
        "n_eval_prompts": len(prompts), "n_positive": int(positive.sum()),
        "F_M": f_model, "F_empty": f_empty, "points": [],
    }
    if normalised(f_model, f_model, f_empty) is None:
        result["note"] = (
            f"F(M) = {f_model:.4g} equals F(∅) = {f_empty:.4g}: faithfulness and completeness are undefined"
        )
    for i, point in enumerate(sweep):
        rand = random_nodes(point, candidates, circuit_rng(ablator.cfg.seed, circuit.name, i))
        record = {"threshold": point.threshold, "top_n": point.top_n, "max_nodes": point.max_nodes,
                  "n_nodes": len(point.nodes),
                  "n_features": sum(n.feature != ERROR for n in point.nodes)}
        for key, nodes in (("circuit", point.nodes), ("random", rand)):
            f_c, f_minus = f(ablator.keep_circuit(nodes)), f(ablator.keep_complement(nodes))
            record[key] = {
                "F_C": f_c, "F_M_minus_C": f_minus,
                "faithfulness": normalised(f_c, f_model, f_empty),
                "completeness": normalised(f_minus, f_model, f_empty),
                "completeness_ratio": f_minus / f_model if f_model else None,
            }
        result["points"].append(record)
    result["best"] = best_point(result["points"])
    return result


def best_point(points: Sequence[dict]) -> dict | None:
    """The sweep point with the largest faithfulness - completeness (sufficient and necessary at once)."""
    scored = [p for p in points if p["circuit"]["faithfulness"] is not None]
    if not scored:
        return None
    p = max(scored, key=lambda p: p["circuit"]["faithfulness"] - p["circuit"]["completeness"])
    return {"threshold": p["threshold"], "top_n": p["top_n"], "max_nodes": p["max_nodes"], "n_nodes": p["n_nodes"],
            "faithfulness": p["circuit"]["faithfulness"], "completeness": p["circuit"]["completeness"]}


__all__ = [
    "AblationConfig", "Ablator", "Keep", "best_point", "circuit_rng", "evaluate_sweep", "normalised",
    "contrast_weights", "random_nodes", "refusal_contrast",
]
