"""Is the attribution estimate right? Both estimates checked against exact single-node ablation effects.

Attribution discovery ranks nodes by an estimate of their indirect effect IE(a) = F(a := its mean) - F
(`refusal_sae.attribution`): attribution patching (one gradient) or integrated gradients. Marks et al. use
integrated gradients where patching is poor; neither is exact where F is not linear in a node. The exact effect
costs one forward pass over the circuit's prompts per node, so it is measured on a sample: the `top` nodes of
largest |IE| by either estimate and `random` other candidates (where both estimates are small, which a
ranking must also get right). Reported per category: the Pearson and Spearman correlation of each estimate
with the exact effects over the sample, the share of nodes whose sign it gets right, and its largest error;
the estimate with the higher Spearman correlation over all categories is the better one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import pearsonr, spearmanr

from refusal_sae.ablation import Ablator
from refusal_sae.circuits import NodeScores, node_mask, ranked_nodes


@dataclass
class EstimateCheck:
    estimate: str
    pearson: float | None
    """None when either side is constant over the sample."""
    spearman: float | None
    sign_agreement: float
    """Share of sampled nodes with a nonzero exact effect whose estimate has its sign."""
    max_abs_error: float


@dataclass
class AttributionCheck:
    category: str
    nodes: list[str]
    exact: list[float]
    """F(M with the node mean-ablated) - F(M), per sampled node."""
    estimates: dict[str, list[float]]
    """Per estimate (patching, ig) its IE of each sampled node."""
    checks: list[EstimateCheck]


def sample_nodes(estimates: Mapping[str, NodeScores], candidates: Mapping[str, np.ndarray], top: int, random: int,
                 rng: np.random.Generator) -> list[tuple[str, int, int]]:
    """The `top` best-ranked nodes of each estimate (union, in rank order) and `random` other candidates."""
    chosen: dict[tuple[str, int, int], None] = {}
    rankings = [ranked_nodes(s, candidates) for s in estimates.values()]
    for ranking in rankings:
        chosen.update(dict.fromkeys(ranking[:top]))
    rest = [key for key in rankings[0] if key not in chosen]
    for i in rng.choice(len(rest), size=min(random, len(rest)), replace=False):
        chosen[rest[int(i)]] = None
    return list(chosen)


def _correlation(f, x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(f(x, y)[0])


def check_attribution(ablator: Ablator, prompts: Sequence[str], weights: np.ndarray, category: str,
                      estimates: Mapping[str, NodeScores], candidates: Mapping[str, np.ndarray], top: int,
                      random: int, rng: np.random.Generator) -> AttributionCheck:
    """Exact single-node mean-ablation effects on F = weights . scores of a node sample, against each estimate."""
    nodes = sample_nodes(estimates, candidates, top, random, rng)
    base = float(weights @ ablator.scores(prompts))
    shapes = {layer: m.shape for layer, m in candidates.items()}
    exact = np.array([float(weights @ ablator.scores(prompts, ablator.variant(node_mask([n], shapes), candidates,
                                                                                inside=False))) - base
                      for n in nodes])
    first = next(iter(estimates.values()))
    values = {name: np.array([s.signed[layer][pos, col] for layer, pos, col in nodes])
              for name, s in estimates.items()}
    checks = []
    moved = exact != 0
    for name, est in values.items():
        agree = float(np.mean(np.sign(est[moved]) == np.sign(exact[moved]))) if moved.any() else float("nan")
        checks.append(EstimateCheck(name, _correlation(pearsonr, est, exact), _correlation(spearmanr, est, exact),
                                    agree, float(np.abs(est - exact).max()) if len(nodes) else float("nan")))
    return AttributionCheck(category, [first.node(*n).name for n in nodes], exact.tolist(),
                            {k: v.tolist() for k, v in values.items()}, checks)


def better_estimate(checks: Sequence[AttributionCheck]) -> str | None:
    """The estimate with the higher mean Spearman correlation over the categories where both are defined."""
    names = [c.estimate for c in checks[0].checks] if checks else []
    means = {}
    for name in names:
        rs = [e.spearman for c in checks for e in c.checks if e.estimate == name and e.spearman is not None]
        if rs:
            means[name] = float(np.mean(rs))
    return max(means, key=means.get) if means else None


__all__ = ["AttributionCheck", "EstimateCheck", "better_estimate", "check_attribution", "sample_nodes"]
