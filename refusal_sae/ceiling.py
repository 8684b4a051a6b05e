"""Noise ceilings: how alike two circuits of the *same* category are, so that "how alike are two categories'
circuits" has a scale.

A Jaccard of 0.23 between two categories' circuits means nothing alone: discovery on a few dozen prompts is
noisy, and two circuits of one category found on different prompts need not be identical either. So each
category's discovery prompts are split into two disjoint halves (label by label, at random), a method's node
scores are computed on each half, and at each size n the circuit of a half is its n best-ranked nodes
(`refusal_sae.circuits.ranked_nodes`, nodes of importance > 0 only):

    within_c(n)     = J(c_A, c_B)                                two halves of category c
    between_cd(n)   = (J(c_A, d_B) + J(c_B, d_A)) / 2             categories c and d, also from disjoint prompts
    null(x, y)      = E J of random node sets shaped like x and y (the matched null, below)
    relative_cd(n)  = (between_cd - null_cd) / sqrt((within_c - null_c) (within_d - null_d))

Both sides of `relative` are made from half-size samples, so the halving lowers them alike. relative_cd is
1 when c's and d's circuits are as alike as two halves of one category (one mechanism, as far as the data can
tell) and 0 when they share no more than chance; it is defined where both categories are *reproducible*: the
interval of within - null lies above 0 (the halves agree more than chance).

The matched null
    A random node set of a circuit's shape holds as many nodes as the circuit in every (layer, position class,
    firing-frequency bin) stratum, drawn uniformly from that stratum's candidates (frequency: the share of
    discovery prompts on which a latent fires in that class, binned at quantiles of all candidates; error nodes
    are a stratum of their own). Two such sets share a hypergeometric number of nodes per stratum
    (`refusal_sae.similarity.shared_counts`), so E J is sampled exactly without building the sets. Matching on
    frequency matters: circuits favour latents that fire often, and two sets of frequent latents overlap more
    than two uniform ones, which a uniform null would credit to a shared mechanism.

Resampling
    The whole procedure is repeated over `splits` random half splits (half-sampling: each split is a draw of
    two disjoint half-size samples). Every number is the mean over the splits with the percentile interval of
    its per-split values; a per-split ratio that is undefined (a category not reproducible in that split) is
    left out and counted.

Verdict at each size, from R = the mean relative_cd over pairs of reproducible categories
    unmeasurable   fewer than two reproducible categories
    monolithic     R's interval lies at or above `monolithic_above`
    modular        R's interval lies at or below `modular_below`
    hybrid         R's interval lies strictly between the two
    undecided      R's interval crosses a threshold: the data do not tell
The method's verdict is the one at the smallest size with two reproducible categories: a circuit's best-ranked
nodes are those discovery is surest of, while past some size the ranks are noise and the ceiling sinks to the
null (every size's verdict is reported beside it). On a planted model whose categories read separate refusal
directions the head also reads the other category's direction, so under mean ablation that direction's latent
has an effect on every category's prompts and joins each circuit a few nodes down: the verdict by size shows it.

Output features apart
    F is read from the same tokens in every category, so latents that write the refusal's first word themselves
    (an output, not a mechanism) would be shared by every category's circuit and pass for a shared mechanism. With
    `output_fraction`, the share of each layer's candidate latents whose decoder direction's logit lens favours
    (or disfavours) the refusal openers most (|`RefusalMetric.output_alignment`|) is left out of a second set of
    circuits and of that set's null, and R is computed again (`relative_without_output`): an R that falls without
    them says the categories share their output more than their mechanism.

Refusal directions (Arditi et al.), the same question without SAEs
    At the refusal-directions stage's layer and position, with r_c^A, r_c^B category c's difference of means
    (toxic minus safe) on its two halves: the halves' noise is independent, so r_c^A . r_d^B estimates the true
    directions' dot product without the noise term that r_c . r_d carries. Hence, per split,

        within_c        = cos(r_c^A, r_c^B)                       how reproducible c's direction is
        corrected_cd    = (r_c^A . r_d^B + r_c^B . r_d^A) / 2 / sqrt((r_c^A . r_c^B)(r_d^A . r_d^B))
                          the cosine of the true directions (disattenuated: noise shrinks a raw cosine)
        specific_c      = (s_c^A . s_c^B) / (r_c^A . r_c^B), s = r minus its projection on the global direction
                          of the same half: the share of c's reproducible direction that is c's own
        dimension       = (sum λ)² / sum λ² of the positive eigenvalues λ of the cross-half Gram matrix
                          G_cd = (r_c^A . r_d^B + r_c^B . r_d^A) / 2 (participation ratio: 1 for one shared
                          direction, C for C orthogonal ones of equal norm)

    R_directions = the mean corrected cosine over pairs of reproducible categories (within's interval above 0),
    judged by the same thresholds as R.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm

from refusal_sae.circuits import NodeIndex, NodeScores, ranked_nodes
from refusal_sae.discovery import DiscoveryInputs, DiscoveryMethod, discover
from refusal_sae.errors import UserError
from refusal_sae.similarity import jaccard, shared_counts
from refusal_sae.stats import Interval
from refusal_sae.validate import fraction, positive_int, statistics_options

NodeKey = tuple[str, int, int]
"""(layer, position class, column), as `ranked_nodes` gives them."""
MIN_HALF = 3
"""Prompts a half must hold: discovery finds no circuit on fewer."""
VERDICTS = ("unmeasurable", "monolithic", "modular", "hybrid", "undecided")


@dataclass
class CeilingConfig:
    """The split-half noise ceiling of circuit similarity, and the verdict in its terms."""

    enabled: bool = False
    """Run the stage in `fit`'s epoch-end analysis and `analyze --stage all` (always with `--stage ceiling`)."""
    splits: int = 10
    """Random half splits of each category's discovery prompts (each runs discovery twice)."""
    sizes: list[int] = field(default_factory=lambda: [5, 20, 50])
    """Circuit sizes (nodes) at which the halves and the categories are compared."""
    null_draws: int = 1000
    """Random node-set pairs per comparison for the matched null's mean Jaccard."""
    frequency_bins: int = 4
    """Firing-frequency bins of the matched null (quantiles of the candidates' frequencies)."""
    at_faithful_size: bool = False
    """Also compare at the median over the method's categories of the smallest size whose faithfulness interval's
    lower bound reaches 0.8 (this analysis's evaluation): similarity where the circuits are faithful."""
    output_fraction: float = 0.0
    """Share of each layer's candidate latents with the largest |logit-lens alignment| with the refusal openers, left
    out of a second computation of R (`relative_without_output`; 0: not computed)."""
    monolithic_above: float = 0.75
    """R (between-category similarity as a fraction of the ceiling) at or above which refusal is monolithic."""
    modular_below: float = 0.25
    """R at or below which refusal is modular."""
    confidence: float = 0.95
    """Coverage of the intervals over splits."""
    seed: int = 0
    """Seed of the splits and the null."""

    def __post_init__(self) -> None:
        positive_int("ceiling.splits", self.splits, 10)
        positive_int("ceiling.null_draws", self.null_draws, 1000)
        positive_int("ceiling.frequency_bins", self.frequency_bins, 4)
        if self.output_fraction:
            fraction("ceiling.output_fraction", self.output_fraction, 0.01)
        if not self.sizes:
            raise UserError("ceiling.sizes: empty; give at least one circuit size, e.g. [5, 20, 50]")
        for n in self.sizes:
            positive_int("ceiling.sizes", n, 20)
        statistics_options("ceiling", self)


# --------------------------------------------------------------------------------------------------
# records


@dataclass
class CategoryCeiling:
    """One category at one size: its halves' agreement."""

    category: str
    within: Interval
    """J of the two halves' circuits."""
    null: float
    """Mean matched-null J of node sets of the halves' shapes."""
    excess: Interval
    """within - null, per split."""
    reproducible: bool
    """excess's interval lies above 0."""


@dataclass
class PairCeiling:
    a: str
    b: str
    between: Interval
    null: float
    relative: Interval | None
    """(between - null) / the ceiling; None when a category is not reproducible or no split defines it."""
    undefined_splits: int
    """Splits left out of `relative` (a category's excess <= 0 in that split)."""


@dataclass
class SizeCeiling:
    n_nodes: int
    categories: list[CategoryCeiling]
    pairs: list[PairCeiling]
    relative: Interval | None
    """R: the mean relative similarity over pairs of reproducible categories."""
    verdict: str
    reason: str
    relative_without_output: Interval | None = None
    """R of the circuits without the output latents (`output_fraction`; null: not computed, or fewer than two
    categories reproducible without them)."""
    verdict_without_output: str | None = None


@dataclass
class Ceiling:
    """The split-half ceiling of one discovery method's circuits."""

    method: str
    splits: int
    half_prompts: dict[str, list[int]]
    """Per category the prompts of half A and half B."""
    short: dict[str, int]
    """Per category the splits where a half had fewer nodes of importance > 0 than the largest size."""
    sizes: list[SizeCeiling]
    at: int | None
    """The size the method's verdict is taken at: the smallest with two reproducible categories (None: none)."""
    verdict: str
    reason: str
    config: dict
    output_latents: dict[str, int] | None = None
    """Per layer, the candidate latents left out as output features (null: `output_fraction` 0)."""
    faithful_size: int | None = None
    """The median faithful size compared at (`at_faithful_size`; null: not asked, or no category faithful)."""


# --------------------------------------------------------------------------------------------------
# the pieces


def half_split(categories: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of half A: in every (category, label) cell a random floor(n / 2) of its rows (half B
    gets the rest, one more when n is odd). Cells with fewer than 2 rows are refused (a half would lack them), and
    categories with fewer than 2 * MIN_HALF rows."""
    half = np.zeros(len(labels), bool)
    for c in np.unique(categories):
        if (n := int((categories == c).sum())) < 2 * MIN_HALF:
            raise UserError(f"ceiling: category {str(c)!r} has {n} discovery prompts; a split-half ceiling needs at "
                            f"least {2 * MIN_HALF} (two halves of {MIN_HALF}, what discovery needs per circuit): give "
                            "the categories more prompts, or leave ceiling.enabled off")
        for label in (True, False):
            rows = np.flatnonzero((categories == c) & (labels == label))
            if len(rows) < 2:
                raise UserError(f"ceiling: category {str(c)!r} has {len(rows)} {'toxic' if label else 'safe'} discovery "
                                "prompt(s); a split-half ceiling needs at least 2 per label (drop the category "
                                "with data.prompts.categories, or give it more prompts)")
            half[rng.choice(rows, len(rows) // 2, replace=False)] = True
    return half


def top_nodes(scores: NodeScores, candidates: Mapping[str, np.ndarray], n: int) -> list[NodeKey]:
    """The n best-ranked candidates of importance > 0, best first (fewer when fewer have any): the circuit of any
    smaller size is a prefix."""
    out = []
    for key in ranked_nodes(scores, candidates):
        if len(out) == n or scores.importance[key[0]][key[1], key[2]] <= 0:
            break
        out.append(key)
    return out


@dataclass
class Strata:
    """The matched null's strata: every candidate node's (layer, position class, frequency bin) as an integer."""

    of: dict[str, np.ndarray]
    """{layer: (node classes, width + 1)} stratum of each node, -1 for non-candidates."""
    sizes: np.ndarray
    """(strata,) candidates per stratum."""

    def counts(self, nodes: frozenset[NodeKey]) -> np.ndarray:
        out = np.zeros(len(self.sizes), np.int64)
        for layer, pos, col in nodes:
            out[self.of[layer][pos, col]] += 1
        return out


def strata(values: Mapping[str, np.ndarray], candidates: Mapping[str, np.ndarray], bins: int) -> Strata:
    """Strata of the candidates from the discovery prompts' node values ({layer: (prompts, classes, width + 1)}):
    latents by layer, class and firing-frequency quantile bin; each (layer, class) error node alone."""
    frequency = {layer: (v > 0).mean(0) for layer, v in values.items()}
    pooled = np.concatenate([NodeIndex.latents(frequency[layer])[NodeIndex.latents(m)]
                             for layer, m in candidates.items()])
    edges = np.unique(np.quantile(pooled, np.linspace(0, 1, bins + 1)[1:-1])) if len(pooled) else np.zeros(0)
    of, ids = {}, {}
    for li, (layer, m) in enumerate(candidates.items()):
        s = np.full(m.shape, -1, np.int64)
        b = np.digitize(frequency[layer], edges, right=True)
        for pos, col in zip(*np.nonzero(m)):
            key = (li, pos, -1 if col == m.shape[1] - 1 else int(b[pos, col]))
            s[pos, col] = ids.setdefault(key, len(ids))
        of[layer] = s
    sizes = np.bincount(np.concatenate([s[s >= 0] for s in of.values()]), minlength=len(ids))
    return Strata(of, sizes)


def null_jaccard(a: np.ndarray, b: np.ndarray, pool: np.ndarray, draws: int, rng: np.random.Generator) -> float:
    """Mean Jaccard of random node sets with stratum counts `a` and `b` (NaN when both are empty)."""
    total = a.sum() + b.sum()
    if total == 0:
        return float("nan")
    shared = shared_counts(a, b, pool, draws, rng).sum(1)
    return float(np.mean(shared / (total - shared)))


def _spread(values: Sequence[float], confidence: float) -> Interval:
    """Mean of the finite per-split values with their percentile interval (NaN when none is finite)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    tail = (1 - confidence) / 2
    low, high = np.quantile(v, [tail, 1 - tail])
    return Interval(float(v.mean()), float(low), float(high))


def _finite_spread(values: Sequence[float], confidence: float) -> Interval | None:
    """`_spread`, or None when no value is finite."""
    spread = _spread(values, confidence)
    return spread if np.isfinite(spread.value) else None


def size_verdict(relative: Interval | None, n_reproducible: int, cfg: CeilingConfig, name: str = "R",
                 unmeasured: str = "two halves of a category agree no more than chance") -> tuple[str, str]:
    """The verdict (module docstring) from `name`'s interval, and why."""
    if relative is None or n_reproducible < 2:
        return "unmeasurable", (f"{n_reproducible} reproducible categor{'y' if n_reproducible == 1 else 'ies'}: "
                                f"{unmeasured}, so there is no ceiling to compare categories against")
    r = f"{name} = {relative.format('.2f')}"
    if relative.low >= cfg.monolithic_above:
        return "monolithic", f"{r} lies at or above {cfg.monolithic_above}"
    if relative.high <= cfg.modular_below:
        return "modular", f"{r} lies at or below {cfg.modular_below}"
    if relative.low > cfg.modular_below and relative.high < cfg.monolithic_above:
        return "hybrid", f"{r} lies between {cfg.modular_below} and {cfg.monolithic_above}"
    return "undecided", f"{r} crosses a threshold ({cfg.modular_below}, {cfg.monolithic_above})"


# --------------------------------------------------------------------------------------------------
# the ceiling


def output_writers(alignment: Mapping[str, np.ndarray], candidates: Mapping[str, np.ndarray], share: float
                   ) -> dict[str, np.ndarray]:
    """{layer: (node classes, width + 1) bool}: the `share` of the layer's candidate latents (at least one) with the
    largest |alignment| ({layer: (width,)} `RefusalMetric.output_alignment` of each decoder direction), at every
    position class where they are candidates."""
    out = {}
    for layer, m in candidates.items():
        live = np.flatnonzero(NodeIndex.latents(m).any(0))
        k = max(1, round(share * len(live)))
        chosen = live[np.argsort(-np.abs(alignment[layer][live]), kind="stable")[:k]]
        mask = np.zeros_like(m)
        NodeIndex.latents(mask)[:, chosen] = True
        out[layer] = mask & m
    return out


def split_half_ceiling(method: DiscoveryMethod, inputs: DiscoveryInputs, categories: Sequence[str],
                       cfg: CeilingConfig, exclude: Mapping[str, np.ndarray] | None = None,
                       faithful_size: int | None = None) -> Ceiling:
    """The split-half ceiling of `method`'s category circuits (group "all") on `inputs`' discovery prompts; with
    `exclude` ({layer: node mask}, `output_writers`), R once more without those nodes; with `faithful_size`, also
    at that size."""
    rng = np.random.default_rng([cfg.seed, 1])
    null_rng = np.random.default_rng([cfg.seed, 2])
    candidates = inputs.candidates()
    st = strata(inputs.features.values, candidates, cfg.frequency_bins)
    reduced = None if exclude is None else {layer: m & ~exclude[layer] for layer, m in candidates.items()}
    in_scope = np.isin(inputs.features.categories, list(categories))
    features = inputs.features
    sizes = sorted(set(cfg.sizes) | ({faithful_size} if faithful_size else set()))
    # per split, size: the halves' node sets per category (and without the excluded nodes)
    tops: list[dict[int, dict[str, tuple[frozenset[NodeKey], frozenset[NodeKey]]]]] = []
    tops_reduced: list[dict[int, dict[str, tuple[frozenset[NodeKey], frozenset[NodeKey]]]]] = []
    short = dict.fromkeys(categories, 0)
    for _ in tqdm(range(cfg.splits), desc=f"{method.name} split halves", unit="split", leave=False):
        half = half_split(features.categories[in_scope], features.labels[in_scope], rng)
        mask_a = np.zeros(len(features), bool)
        mask_a[np.flatnonzero(in_scope)[half]] = True
        mask_b = in_scope & ~mask_a
        found = {}
        for name, mask in (("A", mask_a), ("B", mask_b)):
            found[name] = {c.category: s for c, s in discover(method, inputs.subset(mask), categories, ["all"])}
        per_size: dict[int, dict[str, tuple[frozenset[NodeKey], frozenset[NodeKey]]]] = {n: {} for n in sizes}
        per_size_reduced: dict[int, dict[str, tuple[frozenset[NodeKey], frozenset[NodeKey]]]] = {n: {} for n in sizes}
        for c in categories:
            a, b = (top_nodes(found[h][c], candidates, sizes[-1]) for h in ("A", "B"))
            short[c] += min(len(a), len(b)) < sizes[-1]
            for n in sizes:
                per_size[n][c] = (frozenset(a[:n]), frozenset(b[:n]))
            if reduced is not None:
                a, b = (top_nodes(found[h][c], reduced, sizes[-1]) for h in ("A", "B"))
                for n in sizes:
                    per_size_reduced[n][c] = (frozenset(a[:n]), frozenset(b[:n]))
        tops.append(per_size)
        tops_reduced.append(per_size_reduced)
    # every split halves each (category, label) cell alike, so the last split's halves have every split's sizes
    half_prompts = {c: [int((mask_a & (features.categories == c)).sum()),
                        int((mask_b & (features.categories == c)).sum())] for c in categories}
    out = [_size_ceiling(n, tops, categories, st, cfg, null_rng) for n in sizes]
    if reduced is not None:
        st_reduced = strata(inputs.features.values, reduced, cfg.frequency_bins)
        for size in out:
            without = _size_ceiling(size.n_nodes, tops_reduced, categories, st_reduced, cfg, null_rng)
            size.relative_without_output, size.verdict_without_output = without.relative, without.verdict
    at = next((s for s in out if s.verdict != "unmeasurable"), None)
    if at is None:
        verdict, reason = "unmeasurable", f"at no size in {sizes} do two categories' halves agree more than chance"
    else:
        verdict = at.verdict
        reason = f"at {at.n_nodes} nodes, the smallest size with two reproducible categories: {at.reason}"
        if at.relative_without_output is not None:
            reason += (f"; without the output latents R = {at.relative_without_output.format('.2f')} "
                       f"({at.verdict_without_output})")
    if faithful_size:
        f = next(s for s in out if s.n_nodes == faithful_size)
        r = "undefined" if f.relative is None else f.relative.format(".2f")
        reason += f"; at the median faithful size, {faithful_size} nodes, R = {r} ({f.verdict})"
    counts = None if exclude is None else {layer: int(NodeIndex.latents(m).any(0).sum()) for layer, m in exclude.items()}
    return Ceiling(method.name, cfg.splits, half_prompts, short, out, None if at is None else at.n_nodes, verdict,
                   reason, asdict(cfg), counts, faithful_size)


def _size_ceiling(n: int, tops: Sequence[Mapping[int, Mapping[str, tuple[frozenset[NodeKey], frozenset[NodeKey]]]]],
                  categories: Sequence[str], st: Strata, cfg: CeilingConfig, null_rng: np.random.Generator
                  ) -> SizeCeiling:
    """Within, between, null and R at size n from every split's halves' node sets (`tops`)."""
    within = {c: [] for c in categories}
    nulls = {c: [] for c in categories}
    for split in tops:
        for c in categories:
            a, b = split[n][c]
            within[c].append(jaccard(a, b))
            nulls[c].append(null_jaccard(st.counts(a), st.counts(b), st.sizes, cfg.null_draws, null_rng))
    excess = {c: np.asarray(within[c]) - np.asarray(nulls[c]) for c in categories}
    rows = []
    for c in categories:
        ex = _spread(excess[c], cfg.confidence)
        rows.append(CategoryCeiling(c, _spread(within[c], cfg.confidence), float(np.nanmean(nulls[c])), ex,
                                    ex.above_zero()))
    reproducible = [r.category for r in rows if r.reproducible]
    pairs, per_split_means = [], [[] for _ in tops]
    for i, c in enumerate(categories):
        for d in categories[i + 1:]:
            between, null, relative = [], [], []
            for s, split in enumerate(tops):
                (ca, cb), (da, db) = split[n][c], split[n][d]
                j = (jaccard(ca, db) + jaccard(cb, da)) / 2
                nj = (null_jaccard(st.counts(ca), st.counts(db), st.sizes, cfg.null_draws, null_rng)
                      + null_jaccard(st.counts(cb), st.counts(da), st.sizes, cfg.null_draws, null_rng)) / 2
                between.append(j)
                null.append(nj)
                both = excess[c][s] > 0 and excess[d][s] > 0
                r = (j - nj) / np.sqrt(excess[c][s] * excess[d][s]) if both else float("nan")
                relative.append(r)
                if c in reproducible and d in reproducible:
                    per_split_means[s].append(r)
            rel = _finite_spread(relative, cfg.confidence) if c in reproducible and d in reproducible else None
            pairs.append(PairCeiling(c, d, _spread(between, cfg.confidence), float(np.nanmean(null)), rel,
                                     int(np.sum(~np.isfinite(relative)))))
    means = [float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for v in map(np.asarray,
                                                                                         per_split_means)]
    relative_all = _finite_spread(means, cfg.confidence) if len(reproducible) >= 2 else None
    verdict, reason = size_verdict(relative_all, len(reproducible), cfg)
    return SizeCeiling(n, rows, pairs, relative_all, verdict, reason)


@dataclass
class DirectionPair:
    a: str
    b: str
    raw: Interval
    """The plain cosine of the halves' directions, (cos(r_a^A, r_b^B) + cos(r_a^B, r_b^A)) / 2, over splits."""
    corrected: Interval | None
    """The disattenuated cosine; None when a category is not reproducible."""


@dataclass
class DirectionCeiling:
    """The split-half ceiling of the per-category refusal directions at one layer and position."""

    layer: str
    position: str
    splits: int
    within: dict[str, Interval]
    reproducible: list[str]
    specific: dict[str, Interval]
    """Per category the share of its reproducible direction orthogonal to the global one."""
    pairs: list[DirectionPair]
    relative: Interval | None
    """R_directions: the mean corrected cosine over pairs of reproducible categories."""
    dimension: Interval
    """Participation ratio of the cross-half Gram matrix of the reproducible categories."""
    verdict: str
    reason: str


def _cross_gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(C, C) symmetrised cross-half Gram matrix of the rows of two (C, d) arrays of half directions."""
    g = a @ b.T
    return (g + g.T) / 2


def direction_ceiling(residuals: np.ndarray, categories: np.ndarray, labels: np.ndarray, layer: str, position: str,
                      cfg: CeilingConfig) -> DirectionCeiling:
    """The directions' split-half ceiling from the discovery prompts' residuals at one layer and position
    ((prompts, d_model)), their categories and labels (True = toxic)."""
    rng = np.random.default_rng([cfg.seed, 3])
    names = sorted({str(c) for c in categories})
    x = residuals.astype(np.float64)

    def directions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        per = np.stack([x[mask & (categories == c) & labels].mean(0) - x[mask & (categories == c) & ~labels].mean(0)
                        for c in names])
        return per, x[mask & labels].mean(0) - x[mask & ~labels].mean(0)

    within, specific, raw, corrected, dims = [], [], [], [], []
    for _ in tqdm(range(cfg.splits), desc="direction split halves", unit="split", leave=False):
        half = half_split(categories, labels, rng)
        (ra, ga), (rb, gb) = directions(half), directions(~half)
        na, nb = np.linalg.norm(ra, axis=1), np.linalg.norm(rb, axis=1)
        dot = np.einsum("cd,cd->c", ra, rb)
        within.append(dot / (na * nb))
        sa = ra - np.outer(ra @ ga / (ga @ ga), ga)
        sb = rb - np.outer(rb @ gb / (gb @ gb), gb)
        specific.append(np.einsum("cd,cd->c", sa, sb) / dot)
        raw.append((ra / na[:, None]) @ (rb / nb[:, None]).T)
        gram = _cross_gram(ra, rb)
        with np.errstate(invalid="ignore", divide="ignore"):
            corrected.append(gram / np.sqrt(np.outer(np.diag(gram), np.diag(gram))))
        dims.append(gram)
    within_a, specific_a = np.array(within), np.array(specific)
    within_i = {c: _spread(within_a[:, i], cfg.confidence) for i, c in enumerate(names)}
    reproducible = [c for c in names if within_i[c].above_zero()]
    keep = [names.index(c) for c in reproducible]
    pairs, means = [], [[] for _ in range(cfg.splits)]
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            b = names[j]
            both = a in reproducible and b in reproducible
            values = [c[i, j] for c in corrected]
            if both:
                for s, v in enumerate(values):
                    means[s].append(v)
            pairs.append(DirectionPair(a, b, _spread([(r[i, j] + r[j, i]) / 2 for r in raw], cfg.confidence),
                                       _spread(values, cfg.confidence) if both else None))
    relative = None
    if len(reproducible) >= 2:
        relative = _spread([float(np.nanmean(m)) for m in means], cfg.confidence)

    def participation(g: np.ndarray) -> float:
        lam = np.linalg.eigvalsh(g[np.ix_(keep, keep)])
        lam = lam[lam > 0]
        return float(lam.sum() ** 2 / (lam ** 2).sum()) if len(lam) else float("nan")

    verdict, reason = size_verdict(relative, len(reproducible), cfg, "R_directions",
                                   "no other category's halves give directions that agree")
    return DirectionCeiling(layer, position, cfg.splits, within_i, reproducible,
                            {c: _spread(specific_a[:, i], cfg.confidence) for i, c in enumerate(names)}, pairs,
                            relative, _spread([participation(g) for g in dims], cfg.confidence), verdict, reason)


__all__ = ["VERDICTS", "CategoryCeiling", "Ceiling", "CeilingConfig", "DirectionCeiling", "DirectionPair",
           "PairCeiling", "SizeCeiling", "direction_ceiling", "half_split",
           "null_jaccard", "size_verdict", "split_half_ceiling", "strata", "top_nodes"]
