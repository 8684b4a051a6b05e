"""An SAE-free second opinion on "one refusal or many": refusal directions per category (Arditi et al. 2024).

Arditi et al. ("Refusal in language models is mediated by a single direction") find that the difference of
the mean residuals of harmful and harmless prompts at the post-instruction positions is a direction whose
ablation removes refusal and whose addition induces it. Built per category, the same construction asks the
project's question without SAEs or circuits: if ablating category A's direction removes category B's
refusal too, A and B refuse through one mechanism.

Directions
    For every candidate layer l (a cached residual site) and post-instruction position j (the chat template's
    shared suffix "-S" ... "-1", `refusal_sae.positions`), with x_p the cached residual of discovery prompt p:

        r_c[l, j] = mean_{p toxic, category c} x_p[l, j] - mean_{p safe, category c} x_p[l, j]
        r[l, j]   = mean_{p toxic} x_p[l, j] - mean_{p safe} x_p[l, j]                      (global)

Interventions (forward hooks, at every position of the prompt)
    ablation of r:       x <- x - (x . u) u with u = r / |r|, on the embeddings' output and on every decoder
                         block's output, so no block reads u from the stream it is given (Arditi et al. also
                         project u out of each attention and MLP output inside a block; hooking whole blocks
                         works for every model family the project loads);
    addition of r at l:  x <- x + r on block l's output (r at its own norm).
    The refusal score s is `refusal_sae.metric.RefusalMetric`'s log-odds at the generation position.

Choosing the layer and position
    A selection subset is held out of the discovery split: in every category and label ceil(selection_fraction
    * n) prompts, leaving at least one. For every candidate (l, j) the global direction of the remaining
    discovery prompts is ablated on the subset's toxic prompts (bypass: the mean change of s, lower is better)
    and added on its safe ones (induce: the mean change of s). The chosen (l, j) has the lowest bypass among
    candidates with induce > 0 (among all candidates, with a note, when none has). The directions used and
    saved are then those of the whole discovery split at (l, j). Arditi et al. also drop candidates that
    change the harmless prompts' next-token distribution (KL) or lie in the last 20% of the layers: not done.

Effects, on the evaluation split, per category B, with paired bootstrap intervals over B's prompts
    change(A -> B) = mean over B's toxic prompts of s(r_A ablated) - s      A: the global direction or a category
    added(A -> B)  = mean over B's safe prompts of s(r_A added at l) - s
    share(A -> B)  = change(A -> B) / change(B -> B): the part of B's own direction's effect that A's direction
                     has (per resample, from the same prompts; null when change(B -> B)'s interval contains 0)
    random         K isotropic random directions ablated the same way: change(k -> B), the chance level of an
                   ablation (which reads only a direction's unit vector, so any norm is "the same norm").
    permuted       with `permuted_directions`, P more null directions from the data: the difference of means of
                   the discovery prompts at the chosen site with the labels shuffled within each category, each
                   ablated the same way (a direction of the residuals' own spread, unlike an isotropic one).
    orthogonal     each category's direction minus its projection on the global one, s_c = r_c - (r_c . g) g
                   (g = r / |r|), ablated on every category's toxic prompts: what a category's own part does,
                   without the shared part that every category direction contains. The shared part can make
                   every category direction remove every category's refusal (a monolithic share) while the own
                   parts act only on their own category (modular in what is specific).

Verdict
    p(A -> B) = (1 + #{k: change(k -> B) <= change(A -> B)}) / (1 + K): how many random directions lower B's
    refusal as much. A pair transfers when change(A -> B)'s interval lies below 0 and p(A -> B) <= significance.
    B is testable when its own direction transfers to itself (B -> B). Over the ordered pairs (A, B) of distinct
    testable categories, S = mean share(A -> B), with a bootstrap interval (the pairs' shares per resample, B's
    prompts resampled); each random direction k gives S_k = mean over those pairs of change(k -> B) /
    change(B -> B), and p = (1 + #{k: S_k >= S}) / (1 + K); with permuted-label directions the same p over them,
    and the verdict's p is the larger of the two. The label is
        undetermined  fewer than two testable categories, or p > significance while S > modular_below
                      (random directions remove as much: nothing to tell);
        modular       S <= modular_below: a category's direction leaves the other categories' refusal;
        monolithic    S >= monolithic_above (and p <= significance): any category's direction removes most
                      of every other category's refusal;
        hybrid        in between.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from refusal_sae.activations import ActivationCache, PromptActivations
from refusal_sae.data import PromptSample, Split
from refusal_sae.errors import UserError
from refusal_sae.metric import RefusalMetric, RefusalMetricConfig, refusal_scores
from refusal_sae.model import ModelWrapper
from refusal_sae.objective import objective
from refusal_sae.positions import PositionScheme
from refusal_sae.stats import (
    Band,
    Effect,
    Interval,
    band,
    effect,
    interval,
    p_above,
    p_below,
    resample_weights,
    share,
    transfer_summary,
    transfers,
)
from refusal_sae.validate import (
    fraction,
    non_negative_int,
    positive_int,
    statistics_options,
)

log = logging.getLogger(__name__)

GLOBAL = "global"
FIT, SELECT = 0, 1
"""Parts of the discovery split: the prompts the directions are chosen with, and the selection subset."""
LABELS = ("safe", "toxic")


@dataclass
class DirectionsConfig:
    """The refusal-direction stage's options (`analysis.directions`)."""

    enabled: bool = False
    """Run it with the other stages (the callback, `analyze --stage all`); `analyze --stage directions` runs it
    whatever this says. It runs the model 4 + 2 x categories + random_directions times over the toxic or the
    safe half of the held-out prompts, and 2 + 2 x candidates (layers x suffix positions) times over a half of
    the selection subset."""
    layers: list[str] | None = None
    """Candidate layers, cached residual sites such as residuals_16; null: every cached layer."""
    selection_fraction: float = 0.1
    """Share of each category's toxic and of its safe discovery prompts held out to choose the layer and position."""
    random_directions: int = 20
    """Random directions ablated for the chance level; a p-value is at least 1 / (1 + this)."""
    permuted_directions: int = 0
    """Null directions from the discovery prompts with the labels shuffled within each category, ablated like the
    random ones: a second chance level, from the residuals' own spread (0: none)."""
    significance: float = 0.05
    """p-value level of a pair's transfer and of the verdict against the random directions."""
    monolithic_above: float = 0.5
    """Mean cross-category share at or above which refusal counts as one mechanism."""
    modular_below: float = 0.2
    """Mean cross-category share at or below which each category counts as refusing through its own direction."""
    bootstrap: int = 2000
    """Bootstrap resamples of the held-out prompts (at least 100)."""
    confidence: float = 0.95
    """Coverage of the intervals."""
    batch_size: int = 8
    """Prompts per forward pass."""
    seed: int = 0
    """Seed of the selection subset, the random directions and the bootstrap."""

    def __post_init__(self) -> None:
        if self.layers is not None and (isinstance(self.layers, str) or not self.layers):
            raise UserError(f"directions.layers: {self.layers!r} is not a non-empty list; give e.g. [residuals_16] "
                            "or null for every cached layer")
        fraction("directions.selection_fraction", self.selection_fraction, 0.1)
        positive_int("directions.random_directions", self.random_directions, 20)
        non_negative_int("directions.permuted_directions", self.permuted_directions, 19)
        if self.permuted_directions and 1 / (1 + self.permuted_directions) > self.significance:
            raise UserError(f"directions.permuted_directions: {self.permuted_directions} cannot give p <= "
                            f"{self.significance}; give 0 or at least {math.ceil(1 / self.significance) - 1}")
        statistics_options("directions", self)
        if 1 / (1 + self.random_directions) > self.significance:
            raise UserError(f"directions.random_directions: {self.random_directions} random directions cannot give "
                            f"p <= {self.significance} (the smallest p is 1/{1 + self.random_directions}); give at "
                            f"least {math.ceil(1 / self.significance) - 1}")
        positive_int("directions.batch_size", self.batch_size, 8)


# --------------------------------------------------------------------------------------------------
# records


@dataclass
class Candidate:
    """One (layer, position) the global direction may be taken at, scored on the selection subset."""

    layer: str
    position: str
    norm: float
    """|r| there (discovery prompts outside the selection subset)."""
    bypass: float
    """Mean change of the subset's toxic prompts' score with r ablated (lower: it removes refusal)."""
    induce: float
    """Mean change of the subset's safe prompts' score with r added (higher: it induces refusal)."""


@dataclass
class Selection:
    layer: str
    position: str
    n_toxic: int
    n_safe: int
    candidates: list[Candidate]
    note: str | None


@dataclass
class CategoryDirections:
    category: str
    n_discovery: dict[str, int]
    """Discovery prompts per label the direction is the difference of means of."""
    n_toxic: int
    n_safe: int
    """Held-out prompts the effects are measured on."""
    norm: float
    """|r_c| at the chosen layer and position."""
    cosine_global: float
    """Its cosine with the global direction there."""
    toxic: Interval
    """The model's mean score on the held-out toxic prompts."""
    safe: Interval
    random_change: Band
    """Changes of the toxic prompts' mean score with each random direction ablated."""
    testable: bool
    """Its own direction lowers its refusal, below 0 and below the random directions."""


@dataclass
class DirectionsVerdict:
    label: str
    testable: list[str]
    n_pairs: int
    n_transfer: int
    """Pairs (A, B) of distinct testable categories whose ablation transfers."""
    mean_share: float | None
    mean_random_share: float | None
    p_value: float | None
    """Against the random directions (and, with them, the permuted-label ones: the larger p)."""
    global_share: float | None
    """Mean over testable categories of the share of their own direction's effect the global direction has."""
    explanation: str
    share_interval: Interval | None = None
    """S with its bootstrap interval (null with fewer than two testable categories)."""
    p_random: float | None = None
    p_permuted: float | None = None
    """S against the permuted-label directions (null without them)."""


@dataclass
class DirectionsResult:
    config: dict[str, Any]
    metric: dict[str, Any]
    scheme: dict[str, Any]
    selection: Selection
    names: list[str]
    """The directions intervened with: global, then every category."""
    categories: list[str]
    cosine: list[list[float]]
    """names x names cosine of the directions at the chosen layer and position."""
    ablation: list[list[Effect]]
    """[direction][category]: ablated, on the category's held-out toxic prompts."""
    addition: list[list[Effect]]
    """[direction][category]: added, on the category's held-out safe prompts."""
    per_category: list[CategoryDirections]
    verdict: DirectionsVerdict
    orthogonal: list[list[Effect]] | None = None
    """[category a][category b]: a's direction minus its projection on the global one, ablated on b's held-out toxic
    prompts (p_value against the random directions; share: of b's own orthogonal component's change)."""
    orthogonal_summary: str | None = None
    """What the own parts do to their own category and to the others, in a sentence."""

    def transfers(self, a: int, b: int) -> bool:
        """Whether ablating direction `a` measurably lowers category `b`'s refusal, beyond the random directions."""
        return transfers(self.ablation[a][b], self.config["significance"])


@dataclass
class DirectionVectors:
    """Every difference-of-means direction the stage computed: what the record's numbers come from."""

    arrays: dict[str, np.ndarray]
    """{`<name>.<layer>`: (positions, d_model)} for every direction name (global, categories) and candidate layer."""
    metadata: dict[str, str]
    """The candidate layers and positions, and the chosen layer and position."""


# --------------------------------------------------------------------------------------------------
# difference of means


@dataclass
class SuffixSums:
    """Sums of the discovery prompts' residuals at the suffix positions per category, label and part: every
    difference of means the stage needs, from one pass over the cache."""

    positions: list[str]
    categories: list[str]
    sums: dict[str, np.ndarray]
    """{layer: (categories, labels (safe, toxic), parts (fit, selection), positions, d_model)} float64."""
    counts: np.ndarray
    """(categories, labels, parts) prompts."""

    def direction(self, category: str | None = None, parts: Sequence[int] = (FIT, SELECT)) -> dict[str, np.ndarray]:
        """{layer: (positions, d_model)} mean toxic minus mean safe residual of `category` (None: all prompts)."""
        rows = list(range(len(self.categories))) if category is None else [self.categories.index(category)]
        n = self.counts[rows][:, :, list(parts)].sum((0, 2))
        out = {}
        for layer, sums in self.sums.items():
            s = sums[rows][:, :, list(parts)].sum((0, 2))
            out[layer] = s[1] / n[1] - s[0] / n[0]
        return out


def suffix_sums(cache: ActivationCache, layers: Sequence[str], suffix: int, categories: Sequence[str],
                selection_fraction: float, rng: np.random.Generator) -> tuple[SuffixSums, np.ndarray]:
    """The discovery split's suffix sums, with a selection subset drawn per category and label; and the
    subset's prompt indices."""
    missing = [layer for layer in layers if layer not in cache.layers]
    if missing:
        raise UserError(f"directions.layers: {missing} not in the activation cache (cached: "
                        f"{', '.join(cache.layers)}); give cached layers, or null for all of them")
    prompts = PromptActivations(cache, ["discovery"], list(layers))
    names = np.array(cache.manifest["categories"])[prompts.rows["category"]]
    toxic = prompts.rows["refusal_label"].astype(bool)
    part = np.full(len(toxic), FIT)
    for c in categories:
        for label, kind in ((True, "toxic"), (False, "safe")):
            rows = np.flatnonzero((names == c) & (toxic == label))
            if len(rows) == 0:
                raise UserError(f"directions: category {c!r} has no {kind} prompts in the discovery split; its "
                                "refusal direction is toxic minus safe, so it needs both (drop the category with "
                                "data.prompts.categories, or give it more prompts)")
            n_select = min(math.ceil(selection_fraction * len(rows)), len(rows) - 1)
            part[rng.choice(rows, n_select, replace=False)] = SELECT
    for label, kind in ((True, "toxic"), (False, "safe")):
        if not np.any((part == SELECT) & (toxic == label)):
            raise UserError(f"directions: no category has 2 {kind} discovery prompts, so none can be held out to "
                            "choose the layer and position; give the categories more prompts")
    index = {c: i for i, c in enumerate(categories)}
    sums = {layer: np.zeros((len(categories), 2, 2, suffix, cache.d_model)) for layer in layers}
    counts = np.zeros((len(categories), 2, 2), np.int64)
    for i in tqdm(range(len(prompts)), desc="suffix residuals", unit="prompt", leave=False):
        key = (index[names[i]], int(toxic[i]), part[i])
        counts[key] += 1
        residuals = prompts[i]["activations"]
        for layer in layers:
            sums[layer][key] += residuals[layer][-suffix:].double().numpy()
    positions = [f"-{j}" for j in range(suffix, 0, -1)]
    return SuffixSums(positions, list(categories), sums, counts), prompts.rows["prompt_index"][part == SELECT]


def site_residuals(cache: ActivationCache, layer: str, position: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The discovery prompts' residuals at one layer and suffix position ("-j": j-th token from the end), as
    (prompts, d_model), with their categories and labels (True = toxic)."""
    prompts = PromptActivations(cache, ["discovery"], [layer])
    j = int(position)
    x = np.stack([prompts[i]["activations"][layer][j].double().numpy()
                  for i in tqdm(range(len(prompts)), desc=f"residuals at {layer} {position}", unit="prompt",
                                leave=False)])
    names = np.array(cache.manifest["categories"])[prompts.rows["category"]]
    return x, names, prompts.rows["refusal_label"].astype(bool)


# --------------------------------------------------------------------------------------------------
# interventions


@contextlib.contextmanager
def directional_ablation(wrapper: ModelWrapper, direction: Tensor, strength: float = 1.0) -> Iterator[None]:
    """Within the block the model runs without `direction`: x <- x - strength (x . u) u, u = direction /
    |direction|, on the embeddings' output and after every decoder block, at every position (strength 1 removes
    the component; less leaves part of it)."""
    u = (direction / direction.norm()).to(wrapper.device, torch.float32)

    def project(hidden: Tensor) -> Tensor:
        x = hidden.float()
        return (x - strength * (x @ u)[..., None] * u).to(hidden.dtype)

    handle = wrapper.model.get_input_embeddings().register_forward_hook(lambda module, args, out: project(out))
    try:
        with wrapper.edit_residuals({layer: project for layer in wrapper.layer_names}):
            yield
    finally:
        handle.remove()


@contextlib.contextmanager
def activation_addition(wrapper: ModelWrapper, layer: str, vector: Tensor) -> Iterator[None]:
    """Within the block, x <- x + vector after block `layer`, at every position."""
    v = vector.to(wrapper.device, torch.float32)
    with wrapper.edit_residuals({layer: lambda hidden: (hidden.float() + v).to(hidden.dtype)}):
        yield


def scores(wrapper: ModelWrapper, prompts: Sequence[str], metric: RefusalMetric, batch_size: int,
           edit: contextlib.AbstractContextManager | None = None) -> np.ndarray:
    """(n,) float64 refusal scores of `prompts` within `edit` (`directional_ablation`, `activation_addition`)."""
    with edit if edit is not None else contextlib.nullcontext():
        return refusal_scores(wrapper, prompts, batch_size, metric).double().numpy()


def select_site(wrapper: ModelWrapper, metric: RefusalMetric, directions: Mapping[str, np.ndarray],
                positions: Sequence[str], toxic: Sequence[str], safe: Sequence[str], batch_size: int) -> Selection:
    """Score every (layer, position) of `directions` ({layer: (positions, d_model)}) on the selection prompts and
    choose one (module docstring)."""
    base_toxic = scores(wrapper, toxic, metric, batch_size)
    base_safe = scores(wrapper, safe, metric, batch_size)
    candidates = []
    sites = [(layer, p, torch.from_numpy(r)) for layer, rs in directions.items() for p, r in zip(positions, rs)]
    for layer, position, r in tqdm(sites, desc="choosing the direction's layer and position", unit="site"):
        bypass = scores(wrapper, toxic, metric, batch_size, directional_ablation(wrapper, r)) - base_toxic
        induce = scores(wrapper, safe, metric, batch_size, activation_addition(wrapper, layer, r)) - base_safe
        candidates.append(Candidate(layer, position, float(r.norm()), float(bypass.mean()), float(induce.mean())))
    inducing = [c for c in candidates if c.induce > 0]
    best = min(inducing or candidates, key=lambda c: c.bypass)
    note = None if inducing else "no candidate's addition raised the safe prompts' score: chosen by bypass alone"
    return Selection(best.layer, best.position, len(toxic), len(safe), candidates, note)


# --------------------------------------------------------------------------------------------------
# effects and verdict


def direction_verdict(categories: Sequence[str], cross: Sequence[Sequence[Effect]], global_row: Sequence[Effect],
                      random: np.ndarray, cfg: DirectionsConfig, resampled: np.ndarray | None = None,
                      permuted: np.ndarray | None = None) -> DirectionsVerdict:
    """The label of the module docstring from the category rows of the ablation matrix (`cross[a][b]`: category
    a's direction on category b's prompts), the global direction's row, the random directions' mean changes
    (K, categories), the cells' resampled changes (categories, categories, resamples) for S's interval, and the
    permuted-label directions' mean changes (P, categories)."""
    own = [cross[b][b] for b in range(len(categories))]
    summary = transfer_summary(cross, cfg.significance)
    tested, pairs = summary.tested, summary.pairs
    names = [categories[b] for b in tested]
    if summary.mean_share is None:
        return DirectionsVerdict("undetermined", names, 0, 0, None, None, None, None,
                                 f"Refusal directions: undetermined; {len(tested)} of {len(categories)} categories' "
                                 "own direction measurably lowers their held-out toxic prompts' refusal score (below 0 "
                                 "and below random directions), and a comparison needs two.")
    random_shares = np.mean([random[:, b] / own[b].change.value for b in tested], axis=0)
    mean, chance, moved = summary.mean_share, float(random_shares.mean()), summary.n_transfer
    p_random = p = p_above(mean, random_shares)
    p_permuted = None
    if permuted is not None and len(permuted):
        p_permuted = p_above(mean, np.mean([permuted[:, b] / own[b].change.value for b in tested], axis=0))
        p = max(p, p_permuted)
    spread = None
    if resampled is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            per_resample = np.mean([resampled[a, b] / resampled[b, b] for a, b in pairs], axis=0)
        spread = interval(mean, per_resample, cfg.confidence)
    global_share = float(np.mean([global_row[b].change.value / own[b].change.value for b in tested]))
    if p > cfg.significance and mean > cfg.modular_below:
        label, why = "undetermined", "random directions remove as much"
    elif mean <= cfg.modular_below:
        label, why = "modular", (f"at or below {cfg.modular_below}: a category's direction leaves the other "
                                 "categories' refusal")
    elif mean >= cfg.monolithic_above:
        label, why = "monolithic", (f"at or above {cfg.monolithic_above}: any category's direction removes most of "
                                    "the others' refusal")
    else:
        label, why = "hybrid", f"between {cfg.modular_below} and {cfg.monolithic_above}"
    head = "Refusal directions: undetermined" if label == "undetermined" else f"Refusal directions look {label}"
    interval_text = "" if spread is None else f" (95% interval {spread.format('.0%')})"
    permuted_text = "" if p_permuted is None else f"; permuted-label directions: p = {p_permuted:.3g}"
    explanation = (f"{head}: ablating one category's direction removes on average "
                   f"{mean:.0%}{interval_text} of another category's refusal-score drop under its own direction "
                   f"({why}), over the {len(pairs)} ordered pairs of the {len(tested)} categories whose own direction "
                   f"measurably lowers their refusal; random directions remove {chance:.0%} (p = {p_random:.3g})"
                   f"{permuted_text}; {moved} of {len(pairs)} pairs transfer at p <= {cfg.significance}. The global "
                   f"direction removes {global_share:.0%} of a category's own-direction drop on average.")
    return DirectionsVerdict(label, names, len(pairs), moved, mean, chance, p, global_share, explanation, spread,
                             p_random, p_permuted)


def orthogonal_summary(categories: Sequence[str], parts: Sequence[Sequence[Effect]], significance: float) -> str:
    """How many categories' own parts (their direction minus the global one) lower their own refusal beyond the random
    directions, how many lower another category's, and the mean changes of each kind."""
    n = len(categories)
    own = [parts[b][b] for b in range(n)]
    others = [parts[a][b] for a in range(n) for b in range(n) if a != b]
    moved_own = sum(transfers(e, significance) for e in own)
    moved_other = sum(transfers(e, significance) for e in others)
    other_text = (f"{moved_other} of {len(others)} lower another category's "
                  f"(mean change {np.mean([e.change.value for e in others]):+.2f})") if others else "no other category"
    return (f"The categories' own parts (each direction minus its projection on the global one): {moved_own} of {n} "
            f"lower their own category's refusal score beyond the random directions (mean change "
            f"{np.mean([e.change.value for e in own]):+.2f}), {other_text}.")


def run_directions(wrapper: ModelWrapper, cache: ActivationCache, splits: Mapping[Split, Sequence[PromptSample]],
                   scheme: PositionScheme, cfg: DirectionsConfig, metric_cfg: RefusalMetricConfig
                   ) -> tuple[DirectionsResult, DirectionVectors]:
    """The stage: directions, the choice of layer and position, effects, cross-category matrix and verdict; and
    every direction computed, to save beside the record."""
    if scheme.mode != "positional" or scheme.suffix == 0:
        raise UserError("directions: the prompts share no post-instruction template suffix to take refusal "
                        "directions at; use a chat model whose template ends every prompt the same way")
    layers = list(cfg.layers or cache.layers)
    discovery, evaluation = list(splits["discovery"]), list(splits["evaluation"])
    categories = sorted({s.category for s in discovery + evaluation})
    rng = np.random.default_rng(cfg.seed)
    sums, selected = suffix_sums(cache, layers, scheme.suffix, categories, cfg.selection_fraction, rng)
    held_out = {kind: [s for s in evaluation if s.refusal_label == (kind == "toxic")] for kind in LABELS}
    rows = {}  # (label, category): the category's positions among the held-out prompts of that label
    for kind, samples in held_out.items():
        for c in categories:
            rows[kind, c] = np.flatnonzero([s.category == c for s in samples])
            if len(rows[kind, c]) == 0:
                raise UserError(f"directions: the evaluation split has no {kind} prompts of category {c!r}; raise "
                                "data.prompts.eval_fraction or give the category more prompts")
    prompts = {kind: [s.prompt for s in samples] for kind, samples in held_out.items()}
    metric = RefusalMetric.from_wrapper(wrapper, metric_cfg)

    def run(texts: Sequence[str], edit: contextlib.AbstractContextManager | None = None) -> np.ndarray:
        return scores(wrapper, texts, metric, cfg.batch_size, edit)

    chosen = [discovery[i] for i in selected]
    selection = select_site(wrapper, metric, sums.direction(parts=[FIT]), sums.positions,
                            [s.prompt for s in chosen if s.refusal_label],
                            [s.prompt for s in chosen if not s.refusal_label], cfg.batch_size)
    log.info("refusal direction at %s, position %s", selection.layer, selection.position)
    j = sums.positions.index(selection.position)
    names = [GLOBAL, *categories]
    full = {GLOBAL: sums.direction()} | {c: sums.direction(c) for c in categories}
    vectors = {name: torch.from_numpy(full[name][selection.layer][j]) for name in names}
    unit = torch.stack([v / v.norm() for v in vectors.values()])
    cosine = (unit @ unit.T).tolist()

    base = {kind: run(prompts[kind]) for kind in prompts}
    ablated, added = {}, {}
    for name in tqdm(names, desc="ablating and adding refusal directions", unit="direction"):
        ablated[name] = run(prompts["toxic"], directional_ablation(wrapper, vectors[name]))
        added[name] = run(prompts["safe"], activation_addition(wrapper, selection.layer, vectors[name]))
    noise = torch.from_numpy(rng.standard_normal((cfg.random_directions, cache.d_model)))
    random = np.stack([run(prompts["toxic"], directional_ablation(wrapper, v)) - base["toxic"]
                       for v in tqdm(noise, desc="ablating random directions", unit="direction")])
    g = vectors[GLOBAL] / vectors[GLOBAL].norm()
    orthogonal = {c: run(prompts["toxic"], directional_ablation(wrapper, vectors[c] - (vectors[c] @ g) * g))
                  for c in tqdm(categories, desc="ablating the categories' own parts", unit="direction")}
    permuted = np.zeros((0, len(prompts["toxic"])))
    if cfg.permuted_directions:
        x, site_categories, labels = site_residuals(cache, selection.layer, selection.position)
        nulls = []
        for _ in tqdm(range(cfg.permuted_directions), desc="ablating permuted-label directions", unit="direction"):
            shuffled = labels.copy()
            for c in categories:
                rows_c = np.flatnonzero(site_categories == c)
                shuffled[rows_c] = rng.permutation(labels[rows_c])
            direction = torch.from_numpy(x[shuffled].mean(0) - x[~shuffled].mean(0))
            nulls.append(run(prompts["toxic"], directional_ablation(wrapper, direction)) - base["toxic"])
        permuted = np.stack(nulls)

    ablation: list[list[Effect]] = [[] for _ in names]
    addition: list[list[Effect]] = [[] for _ in names]
    own_parts: list[list[Effect]] = [[] for _ in categories]
    per_category = []
    random_means = np.zeros((cfg.random_directions, len(categories)))
    permuted_means = np.zeros((len(permuted), len(categories)))
    cells = np.zeros((len(categories), len(categories), cfg.bootstrap))
    for b, c in enumerate(categories):
        tox, saf = rows["toxic", c], rows["safe", c]
        w_tox = resample_weights(objective("toxic", "all", np.ones(len(tox), bool)), cfg.bootstrap, rng)
        w_safe = resample_weights(objective("toxic", "all", np.ones(len(saf), bool)), cfg.bootstrap, rng)
        random_means[:, b] = random[:, tox].mean(axis=1)
        permuted_means[:, b] = permuted[:, tox].mean(axis=1)
        measured = [effect(base["toxic"][tox], ablated[name][tox], w_tox, cfg.confidence) for name in names]
        own, own_resampled = measured[names.index(c)]
        for a, (e, resampled) in enumerate(measured):
            e.p_value = p_below(e.change.value, random_means[:, b])
            e.share = share(own.change, own_resampled, e.change, resampled, cfg.confidence)
            ablation[a].append(e)
            addition[a].append(effect(base["safe"][saf], added[names[a]][saf], w_safe, cfg.confidence)[0])
            if a:
                cells[a - 1, b] = resampled
        parts = [effect(base["toxic"][tox], orthogonal[name][tox], w_tox, cfg.confidence) for name in categories]
        part_own, part_own_resampled = parts[b]
        for a, (e, resampled) in enumerate(parts):
            e.p_value = p_below(e.change.value, random_means[:, b])
            e.share = share(part_own.change, part_own_resampled, e.change, resampled, cfg.confidence)
            own_parts[a].append(e)
        n_discovery = sums.counts[sums.categories.index(c)].sum(1)
        per_category.append(CategoryDirections(
            c, {LABELS[k]: int(n_discovery[k]) for k in (1, 0)}, len(tox), len(saf),
            float(vectors[c].norm()), cosine[0][b + 1],
            interval(float(base["toxic"][tox].mean()), w_tox @ base["toxic"][tox], cfg.confidence),
            interval(float(base["safe"][saf].mean()), w_safe @ base["safe"][saf], cfg.confidence),
            band(random_means[:, b]),
            transfers(own, cfg.significance)))
    verdict = direction_verdict(categories, ablation[1:], ablation[0], random_means, cfg, cells,
                                permuted_means if len(permuted) else None)
    log.info("%s", verdict.explanation)
    result = DirectionsResult(asdict(cfg), asdict(metric_cfg), scheme.to_dict(), selection, names, categories, cosine,
                              ablation, addition, per_category, verdict, own_parts,
                              orthogonal_summary(categories, own_parts, cfg.significance))
    saved = {f"{name}.{layer}": v for name in names for layer, v in full[name].items()}
    return result, DirectionVectors(saved, {"layers": ",".join(layers), "positions": ",".join(sums.positions),
                                            "layer": selection.layer, "position": selection.position})



__all__ = ["GLOBAL", "Candidate", "CategoryDirections", "DirectionVectors", "DirectionsConfig", "DirectionsResult",
           "DirectionsVerdict", "Selection", "SuffixSums", "activation_addition", "direction_verdict",
           "directional_ablation", "orthogonal_summary", "run_directions", "scores", "select_site", "site_residuals",
           "suffix_sums"]
