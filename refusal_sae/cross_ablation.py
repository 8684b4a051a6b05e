"""The causal test of shared circuits: does category B's refusal need category A's circuit?

Node overlap (`refusal_sae.similarity`) says which features two category circuits share, not whether the
other category's refusal needs them: a shared refusal *output* overlaps as much as a shared mechanism.
So, per discovery method, category A's circuit of N nodes C_A (its N best-ranked candidate nodes, error
terms kept, as in the evaluation's "keep" curves) is mean-ablated on category B's held-out prompts:

    change(A -> B) = F_B(M \\ C_A) - F_B(M)          F_B: the evaluation's objective on B's prompts
    share(A -> B)  = change(A -> B) / change(B -> B)  null when change(B -> B)'s interval contains 0

with 95% paired bootstrap intervals over B's prompts (the same resamples for every A, so a share is formed
per resample). N is A's smallest size whose all-layer keep-mode faithfulness reaches 0.8 (its evaluation
record), or `n_nodes` when A has no such size (or no record), or `size` for every category when given.

A pair transfers when change(A -> B)'s interval lies below 0 and, with `random_circuits`, when ablating A's
circuit lowers F_B more than all but a share `significance` of random circuits of A's shape do (same nodes per
layer and position class, drawn from the candidates there; one-sided p = (1 + random circuits lowering F_B as
much) / (1 + random circuits)): the chance level of a cell, since any ablation of N nodes moves F somewhat.
Give every category one `size` to compare circuits of equal size. B is testable when its own circuit transfers
to itself. The mean share over the ordered pairs of distinct testable categories is the summary number:
near 1, each category's refusal needs the others' circuits (one mechanism); near 0, only its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from refusal_sae.ablation import Ablator
from refusal_sae.circuits import Circuit, NodeScores, candidate_mask, circuit_size, node_mask, ranked_nodes
from refusal_sae.data import PromptSample
from refusal_sae.errors import UserError
from refusal_sae.objective import objective
from refusal_sae.circuits import random_mask
from refusal_sae.stats import (
    Band,
    Effect,
    Interval,
    band,
    effect,
    interval,
    p_below,
    resample_weights,
    share,
    transfer_summary,
    transfers,
)
from refusal_sae.validate import non_negative_int, positive_int, statistics_options


@dataclass
class CrossAblationConfig:
    """The circuit cross-ablation stage's options (`analysis.cross_ablation`)."""

    enabled: bool = False
    """Run it with the other stages (the callback, `analyze --stage all`); `analyze --stage cross` runs it
    whatever this says. It runs the model 1 + categories times over every category's held-out prompts F reads."""
    size: int | None = None
    """Nodes of every category's circuit; null: each category's smallest size reaching faithfulness 0.8."""
    n_nodes: int = 100
    """Nodes of a category's circuit when `size` is null and its curve never reaches faithfulness 0.8."""
    random_circuits: int = 0
    """Random circuits of each category circuit's shape, each ablated on every category's prompts: each cell's
    chance level and p-value (0: none, no chance level)."""
    significance: float = 0.05
    """With random circuits, a cell transfers only at a p-value at or below this."""
    bootstrap: int = 2000
    """Bootstrap resamples of the held-out prompts (at least 100)."""
    confidence: float = 0.95
    """Coverage of the intervals."""
    batch_size: int = 8
    """Prompts per forward pass."""
    seed: int = 0
    """Seed of the bootstrap."""

    def __post_init__(self) -> None:
        if self.size is not None:
            positive_int("cross_ablation.size", self.size, 100)
        positive_int("cross_ablation.n_nodes", self.n_nodes, 100)
        non_negative_int("cross_ablation.random_circuits", self.random_circuits, 20)
        positive_int("cross_ablation.batch_size", self.batch_size, 8)
        statistics_options("cross_ablation", self)


# --------------------------------------------------------------------------------------------------
# records


@dataclass
class AblatedCircuit:
    """Category A's circuit as ablated: a row of the matrix."""

    category: str
    circuit: str
    n_nodes: int
    size_from: str
    """Why this size: faithfulness 0.8 reached there, the fallback n_nodes, or the configured size."""
    nodes_per_layer: dict[str, int]


@dataclass
class CrossAblationResult:
    method: str
    target: str
    config: dict[str, Any]
    categories: list[str]
    rows: list[AblatedCircuit]
    n_prompts: list[int]
    """Per category B, the held-out prompts F_B reads."""
    F_M: list[Interval]
    """Per category B, F_B(M)."""
    ablation: list[list[Effect]]
    """[A][B]: score = F_B(M \\ C_A), change = that - F_B(M), share = change / change(B -> B), p_value against A's
    random circuits (null without them)."""
    testable: list[str]
    n_pairs: int
    n_transfer: int
    mean_share: float | None
    explanation: str
    random: list[list[Band]] | None = None
    """[A][B]: the changes of F_B under A's random circuits (null without random circuits)."""
    significance: float | None = None
    """The p-value a transfer needs (null without random circuits)."""

    def transfers(self, a: int, b: int) -> bool:
        """Whether ablating category a's circuit measurably lowers category b's F (beyond chance, with random
        circuits)."""
        return transfers(self.ablation[a][b], self.significance)


# --------------------------------------------------------------------------------------------------
# the matrix


def cross_ablation(ablator: Ablator, samples: Sequence[PromptSample], refused: np.ndarray | None,
                   circuits: Sequence[tuple[Circuit, NodeScores]], sizes: Mapping[str, int | None],
                   cfg: CrossAblationConfig, target: str) -> CrossAblationResult:
    """The matrix of one method's category circuits (group "all") on the held-out `samples` (`refused`: the
    model's answers, for target behavior); `sizes` by circuit name give the default sizes (`circuit_size`)."""
    items = sorted(((c, s) for c, s in circuits if c.group == "all"), key=lambda item: item[0].category)
    if not items:
        raise UserError("cross_ablation: no category circuits of group 'all' to ablate; run discovery with "
                        "discovery.groups including all")
    method, categories = items[0][0].method, [c.category for c, _ in items]
    toxic = np.array([s.refusal_label for s in samples], dtype=bool)
    rng = np.random.default_rng(cfg.seed)
    chosen, weights, objectives, bounds = [], [], [], []
    for category in categories:
        rows = np.flatnonzero([s.category == category for s in samples])
        if len(rows) == 0:
            raise UserError(f"cross_ablation: the evaluation split has no prompts of category {category!r}; raise "
                            "data.prompts.eval_fraction")
        obj = objective(target, "all", toxic[rows], None if refused is None else refused[rows],
                        where=f"cross-ablation on category {category!r}")
        objectives.append(obj)
        weights.append(resample_weights(obj, cfg.bootstrap, rng))
        bounds.append(slice(len(chosen), len(chosen) + len(obj.rows)))
        chosen += [samples[i].prompt for i in rows[obj.rows]]

    candidates = candidate_mask({layer: ablator.means.live(layer) for layer in ablator.layers}, errors=False)
    shapes = {layer: m.shape for layer, m in candidates.items()}
    base = ablator.scores(chosen)
    ablated, randoms, sources = [], [], []
    random_rng = np.random.default_rng([cfg.seed, 1])
    for circuit, scores in tqdm(items, desc=f"cross-ablating {method} circuits", unit="circuit"):
        ranking = ranked_nodes(scores, candidates)
        n, why = circuit_size(circuit.name, sizes, cfg.n_nodes, "cross_ablation", cfg.size)
        kept = node_mask(ranking[:n], shapes)
        ablated.append(ablator.scores(chosen, ablator.variant(kept, candidates, inside=False)))
        randoms.append([ablator.scores(chosen, ablator.variant(random_mask(kept, candidates, random_rng), candidates,
                                                                inside=False)) for _ in range(cfg.random_circuits)])
        sources.append(AblatedCircuit(circuit.category, circuit.name, min(n, len(ranking)), why,
                                      {layer: int(m.sum()) for layer, m in kept.items()}))

    matrix: list[list[Effect]] = [[] for _ in categories]
    chance: list[list[Band]] = [[] for _ in categories]
    F_M = []
    for b, (obj, w, part) in enumerate(zip(objectives, weights, bounds)):
        F_M.append(interval(obj.value(base[part]), w @ base[part], cfg.confidence))
        measured = [effect(base[part], edited[part], w, cfg.confidence, obj.value) for edited in ablated]
        own, own_resampled = measured[b]
        for a, (e, resampled) in enumerate(measured):
            e.share = share(own.change, own_resampled, e.change, resampled, cfg.confidence)
            if cfg.random_circuits:
                moved = np.array([obj.value(r[part]) - obj.value(base[part]) for r in randoms[a]])
                e.p_value = p_below(e.change.value, moved)
                chance[a].append(band(moved))
            matrix[a].append(e)
    significance = cfg.significance if cfg.random_circuits else None
    summary = transfer_summary(matrix, significance)
    tested, pairs = summary.tested, summary.pairs
    if summary.mean_share is None:
        explanation = (f"Circuit cross-ablation ({method}): {len(tested)} of {len(categories)} categories' own "
                       "circuit measurably lowers their F when ablated, and a comparison needs two.")
    else:
        explanation = (f"Circuit cross-ablation ({method}): ablating one category's circuit removes on average "
                       f"{summary.mean_share:.0%} of another category's F drop under its own circuit, over the "
                       f"{len(pairs)} ordered pairs of the {len(tested)} categories whose own circuit measurably "
                       f"lowers their F; {summary.n_transfer} of {len(pairs)} pairs lower F measurably"
                       + (f" and beyond {cfg.random_circuits} random circuits of the ablated circuit's shape "
                          f"(p <= {cfg.significance})." if significance else "."))
    return CrossAblationResult(method, target, asdict(cfg), categories, sources, [len(o.rows) for o in objectives],
                               F_M, matrix, [categories[b] for b in tested], len(pairs), summary.n_transfer,
                               summary.mean_share, explanation, chance if cfg.random_circuits else None,
                               significance)


__all__ = ["AblatedCircuit", "CrossAblationConfig", "CrossAblationResult", "cross_ablation"]
