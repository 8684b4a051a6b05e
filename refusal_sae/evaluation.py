"""Circuit evaluation: faithfulness and completeness curves over the whole range of circuit sizes,
with bootstrap intervals, a random-circuit band, per-layer curves and sanity checks.

For a circuit's node ranking (`NodeScores`, best first) and N candidate nodes, the circuit of n nodes
C_n is the n best-ranked candidates. With F the objective (`refusal_sae.objective`) on the category's
held-out prompts and `refusal_sae.ablation` doing the mean-ablations:

    F(M)      nothing ablated                        the model
    F(C_n)    every candidate outside C_n ablated    the circuit alone
    F(M\\C_n)  every candidate in C_n ablated         the model without the circuit
    F(∅)      every candidate ablated                nothing left

    faithfulness = (F(C_n) - F(∅)) / (F(M) - F(∅))     1: the circuit suffices
    completeness = (F(M\\C_n) - F(∅)) / (F(M) - F(∅))   0: the circuit is necessary (Marks et al.)

Sizes are log-spaced from 1 to N plus the fractions 0.001 ... 1 of N (MIB's circuit track); every point
is measured, the 100% point included (F(C_N) = F(M) exactly: nothing is edited). CPR (area under
faithfulness against n/N, from (0, 0) at the empty circuit through the measured points) and CMD (area
between the curve and 1) use measured points only. Error terms are either always kept ("keep", the
spec's variant) or nodes like latents ("nodes", Marks et al.), each its own curve. Per-layer curves
edit one layer with that layer's own ranking. Random circuits with the circuit's nodes per layer and
position class give a chance band at every size of the first error mode's all-layer curve.

Every number has a 95% paired, stratified bootstrap interval over prompts (`refusal_sae.stats`).
A ratio is undefined (null, with the reason) when the interval of F(M) - F(∅) contains 0: nothing to
explain, or not distinguishable from noise.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from refusal_sae.ablation import Ablator, Variant
from refusal_sae.circuits import (
    Circuit,
    NodeIndex,
    NodeScores,
    candidate_mask,
    node_mask,
    random_mask,
    ranked_nodes,
)
from refusal_sae.errors import UserError
from refusal_sae.io import from_json
from refusal_sae.objective import TARGETS, Objective, Target, objective
from refusal_sae.stats import (
    FAITHFUL,
    Band,
    Interval,
    band,
    interval,
    jackknife_weights,
    p_above,
    resample_weights,
)
from refusal_sae.validate import all_of, fraction, non_negative_int, one_of, positive_int, statistics_options

ErrorMode = Literal["keep", "nodes"]
IntervalMethod = Literal["bca", "percentile"]
INTERVAL_METHODS: tuple[str, ...] = ("bca", "percentile")
ERROR_MODES: tuple[str, ...] = ("keep", "nodes")
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
ALL_LAYERS = "all layers"
RECORD_VERSION = 5
"""Bumped when a record's meaning changes, so a rerun recomputes records written before (2: the random
sanity check around the smallest faithful circuit; 3: each check pass / fail / not applicable, and `passed`
None when no check applied; 4: `reaches` by the interval's lower bound, the point estimate's in `reaches_point`,
and each point's one-sided p against its random circuits; 5: the interval method named (`intervals`: BCa by
default), dropped resamples counted, MIB's log-axis CPR / CMD beside the linear ones, the splice check, and no ratios
where F(M) - F(∅) is negative)."""
MIN_AREA_POINTS = 8
REACH = (0.5, FAITHFUL)
PREFIX_TOLERANCE = 0.05
"""Sanity: ablating the shared prefix may move no score by more than this (score units, log-odds)."""
SANITY_FAITHFULNESS = FAITHFUL
"""Sanity: the random check ablates latents outside the smallest circuit that reaches this faithfulness."""
RANDOM_TOLERANCE = 0.25
"""Sanity: ablating a random share of the non-circuit latents moves the median score by less than this
fraction of |F(M) - F(∅)|."""
SPLICE_TOLERANCE = 0.25
"""Sanity: one SAE's reconstruction spliced in (its error set to 0) moves F by less than this fraction of
|F(M) - F(∅)|."""


@dataclass
class EvaluationConfig:
    """How circuits are judged."""

    intervals: IntervalMethod = "bca"
    """bca: bias-corrected and accelerated bootstrap intervals (jackknife acceleration), which keep their coverage for
    ratios of differences over few prompts; percentile: the plain percentile intervals (records before version 5)."""
    target: Target = "toxic"
    """F: toxic (mean score of the category's held-out toxic prompts: the refusal itself), contrast (toxic
    minus safe mean score) or behavior (refused minus answered; needs greedy answers). toxic is the
    default because on OR-Bench its F(M) - F(∅) excludes 0 in 9 of 10 categories, the contrast's in 3
    (docs/orbench-results.md, "What F measures"); it also runs half the prompts."""
    error_modes: list[ErrorMode] = field(default_factory=lambda: ["keep", "nodes"])
    """keep: SAE error terms are never ablated (the spec's variant); nodes: they are nodes like latents
    (Marks et al.). The first mode also gets the per-layer curves and the sanity checks."""
    n_sizes: int = 12
    """Log-spaced circuit sizes from 1 node to all candidate nodes, on top of the MIB fractions."""
    fractions: list[float] = field(default_factory=lambda: list(MIB_FRACTIONS))
    """Circuit sizes as fractions of all candidate nodes (1.0 is always measured)."""
    sizes: list[int] | None = None
    """Explicit circuit sizes (node counts) instead of n_sizes and fractions; all candidates are added."""
    random_circuits: int = 5
    """Random circuits per size of the first error mode's all-layer curve (same nodes per layer and position
    class): the chance band of faithfulness."""
    random_completeness: bool = False
    """Also measure the random circuits' completeness (one more forward pass per random circuit)."""
    per_layer: bool = True
    """Also one curve per SAE layer (only that layer edited, ranked by its own nodes)."""
    bootstrap: int = 2000
    """Bootstrap resamples of the held-out prompts for the intervals."""
    confidence: float = 0.95
    """Coverage of the intervals."""
    sanity_fraction: float = 0.1
    """Share of the candidate latents outside the smallest faithful (0.8) circuit ablated at random in the
    sanity check."""
    batch_size: int = 8
    """Prompts per forward pass."""
    seed: int = 0
    """Seed of the random circuits and the bootstrap."""

    def __post_init__(self) -> None:
        one_of("evaluation.target", self.target, TARGETS)
        one_of("evaluation.intervals", self.intervals, INTERVAL_METHODS)
        all_of("evaluation.error_modes", self.error_modes, ERROR_MODES)
        if len(set(self.error_modes)) != len(self.error_modes):
            raise UserError(f"evaluation.error_modes: {self.error_modes!r} names a mode twice; give each once")
        positive_int("evaluation.n_sizes", self.n_sizes, 12)
        non_negative_int("evaluation.random_circuits", self.random_circuits, 5)
        positive_int("evaluation.batch_size", self.batch_size, 8)
        statistics_options("evaluation", self)
        for f in self.fractions:
            fraction("evaluation.fractions", f, 0.1, include_one=True)
        for n in self.sizes or []:
            positive_int("evaluation.sizes", n, 100)
        fraction("evaluation.sanity_fraction", self.sanity_fraction, 0.1, include_one=True)


# --------------------------------------------------------------------------------------------------
# records


@dataclass
class Point:
    n_nodes: int
    fraction: float
    """n_nodes / all candidate nodes of the curve."""
    nodes_per_layer: dict[str, int]
    positions: dict[str, int]
    """Nodes per position class."""
    empty_layers: list[str]
    """Edited layers that keep none of their candidates: a point that says nothing about them."""
    F_C: Interval
    F_M_minus_C: Interval
    faithfulness: Interval | None
    completeness: Interval | None
    random_faithfulness: Band | None = None
    random_completeness: Band | None = None
    random_p: float | None = None
    """One-sided: (1 + random circuits whose faithfulness reaches the circuit's) / (1 + random circuits)."""


@dataclass
class Curve:
    scope: str
    """"all layers", or the one layer edited."""
    error_mode: str
    n_candidates: int
    F_empty: Interval
    span: Interval
    """F(M) - F(∅): what there is to explain."""
    ratio_note: str | None
    """Why faithfulness and completeness are null, when they are."""
    points: list[Point]
    cpr: Interval | None
    """Area under faithfulness against the share of nodes kept, linear axis, from (0, 0) to 100%."""
    cmd: Interval | None
    area_note: str | None
    reaches: dict[str, int | None]
    """Smallest size whose faithfulness interval's lower bound reaches 0.5 / 0.8 (None: not reached)."""
    reaches_point: dict[str, int | None] = field(default_factory=dict)
    """Smallest size whose point estimate reaches 0.5 / 0.8: a size the noise may have picked."""
    cpr_log: Interval | None = None
    """MIB's CPR: the trapezoid area under faithfulness over log(share of nodes), from the smallest MIB fraction
    (0.1%) to 100%, divided by that axis's length so that a circuit at faithfulness 1 throughout scores 1 (MIB's
    code reports the undivided area, log(1000) = 6.91 times this)."""
    cmd_log: Interval | None = None
    """MIB's CMD on the same axis: the area of |1 - faithfulness|, divided alike."""

    @property
    def all_layers(self) -> bool:
        """Every SAE layer edited at once (not one layer's curve)."""
        return self.scope == ALL_LAYERS


CheckStatus = Literal["pass", "fail", "not applicable"]


@dataclass
class Sanity:
    """Checks of the evaluation itself, each "pass", "fail" or "not applicable" (with the reason in `notes`).
    `passed` covers the machinery: False when a check failed, True when one passed and none failed, None when
    none applied (nothing was tested, so nothing passed). Whether there is an effect to explain is reported beside
    it (`span_excludes_zero`), since a category without one is a finding about the data, which the null ratios
    already state."""

    prefix_max_change: float | None
    """Largest |score change| of any prompt when every node at the shared prefix is mean-ablated (None: no
    prefix classes, positions global)."""
    random_circuit_nodes: int | None
    """Size of the circuit whose outside the random check ablates: the smallest measured size of the first
    all-layer curve whose faithfulness reaches 0.8, below all candidates (None: no such size, or nothing
    to explain; the check does not apply)."""
    random_median_change: float | None
    """Median |score change| when a random `sanity_fraction` of the candidate latents outside that circuit
    is ablated."""
    random_relative_change: float | None
    """That median as a share of |F(M) - F(∅)|."""
    span_excludes_zero: bool
    prefix_check: CheckStatus
    """Ablating the shared prefix moves no score by more than `PREFIX_TOLERANCE` (not applicable: no prefix)."""
    random_check: CheckStatus
    """Ablating a random share of the latents outside the smallest faithful circuit moves the median score by less
    than `RANDOM_TOLERANCE` of the span (not applicable: nothing to explain, or no faithful circuit)."""
    passed: bool | None
    notes: list[str]
    """Why a check failed or did not apply."""
    splice_change: dict[str, float] | None = None
    """Per SAE layer, |F with that SAE's reconstruction spliced in - F(M)| as a share of |F(M) - F(∅)| (None: the
    check did not run)."""
    splice_check: CheckStatus = "not applicable"
    """Every SAE's splice moves F by less than `SPLICE_TOLERANCE` of the span: the error terms, which keep mode never
    ablates, carry little of F (not applicable: nothing to explain, or a record before version 5)."""


@dataclass
class CircuitEvaluation:
    name: str
    category: str
    group: str
    method: str
    target: str
    n_prompts: int
    n_positive: int
    """Prompts on the positive side of F (toxic or refused; all of them for a mean)."""
    F_M: Interval
    curves: list[Curve]
    sanity: Sanity
    intervals: str = "percentile"
    """How every interval of the record was computed (`EvaluationConfig.intervals`; records before version 5:
    percentile)."""

    def faithful_size(self) -> int | None:
        """The smallest size whose all-layer keep-mode faithfulness interval's lower bound reaches `FAITHFUL` (None:
        not reached); StopIteration without such a curve."""
        curve = next(c for c in self.curves if c.all_layers and c.error_mode == "keep")
        return curve.reaches.get(str(FAITHFUL))


def upgrade_record(record: dict, version: int) -> dict | None:
    """A record written under an earlier `version` in this version's fields, where they follow from what it holds
    (version 2: the check statuses from the changes it recorded; 3: the reach sizes from its points; the random
    p-values, which need each random circuit's value, stay null); None where they do not (evaluate again)."""
    if version == 4:  # its intervals are percentile ones, which the record now says (the default)
        return record
    if version == 3:
        curves = []
        for c in record["curves"]:
            points = [from_json(Point, p) for p in c["points"]]
            low, value = reach_sizes(points)
            curves.append({**c, "reaches": low, "reaches_point": value})
        return upgrade_record({**record, "curves": curves}, 4)
    if version != 2:
        return None
    s = record["sanity"]
    prefix, random = _prefix_status(s["prefix_max_change"]), _random_status(s["random_relative_change"])
    return upgrade_record({**record, "sanity": {**s, "prefix_check": prefix, "random_check": random,
                                                "passed": _passed(prefix, random)}}, 3)


def _prefix_status(change: float | None) -> CheckStatus:
    """The prefix check from its largest score change (None: no prefix, the check did not run)."""
    return "not applicable" if change is None else "pass" if change <= PREFIX_TOLERANCE else "fail"


def _random_status(relative: float | None) -> CheckStatus:
    """The random check from its median change as a share of the span (None: the check did not apply)."""
    return "not applicable" if relative is None else "pass" if relative < RANDOM_TOLERANCE else "fail"


def _splice_status(changes: Mapping[str, float] | None) -> CheckStatus:
    """The splice check from each layer's change as a share of the span (None: the check did not apply)."""
    if changes is None:
        return "not applicable"
    return "pass" if max(changes.values()) < SPLICE_TOLERANCE else "fail"


def _passed(*checks: CheckStatus) -> bool | None:
    """False when a check failed, True when one passed and none failed, None when none applied."""
    return False if "fail" in checks else (True if "pass" in checks else None)


def faithful_sizes(records: Sequence[CircuitEvaluation]) -> dict[str, int | None]:
    """{circuit name: `faithful_size`} of the records that have an all-layer keep-mode curve."""
    out = {}
    for record in records:
        with contextlib.suppress(StopIteration):
            out[record.name] = record.faithful_size()
    return out


# --------------------------------------------------------------------------------------------------
# sizes and masks


def curve_sizes(n_total: int, cfg: EvaluationConfig, where: str) -> list[int]:
    """Sizes to measure: explicit sizes, or log-spaced ones and MIB fractions; always n_total itself."""
    if cfg.sizes is not None:
        bad = [n for n in cfg.sizes if n > n_total]
        if bad:
            raise UserError(f"evaluation.sizes: {bad} outside [1, {n_total}], the candidate nodes of {where}; "
                            "give smaller sizes")
        sizes = set(cfg.sizes)
    else:
        sizes = {int(round(x)) for x in np.geomspace(1, n_total, cfg.n_sizes)} if n_total else set()
        sizes |= {max(1, int(round(f * n_total))) for f in cfg.fractions}
    return sorted(n for n in sizes | {n_total} if 1 <= n <= n_total)


def _rng(seed: int, name: str, stream: int) -> np.random.Generator:
    """Seeded per (seed, circuit, stream): results do not depend on evaluation order."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), stream])


# --------------------------------------------------------------------------------------------------
# evaluation


class _Run:
    """The variants of one circuit: runs each once, keeps its per-prompt scores, and F with resamples. An estimate is
    (value, per row of `w`): the bootstrap resamples, then (for BCa) the leave-one-prompt-out jackknife rows."""

    def __init__(self, ablator: Ablator, prompts: list[str], obj: Objective, cfg: EvaluationConfig, key: str,
                 progress: tqdm) -> None:
        self.ablator, self.prompts, self.obj, self.progress = ablator, prompts, obj, progress
        boot = resample_weights(obj, cfg.bootstrap, _rng(cfg.seed, key, 0))
        self.n_boot, self.confidence = len(boot), cfg.confidence
        self.w = np.vstack([boot, jackknife_weights(obj)]) if cfg.intervals == "bca" else boot
        self.scores: dict[str, np.ndarray] = {}

    def __call__(self, name: str, variant: Variant | None) -> np.ndarray:
        if name not in self.scores:
            self.scores[name] = self.ablator.scores(self.prompts, variant)
            self.progress.update(1)
        return self.scores[name]

    def alias(self, name: str, existing: str) -> np.ndarray:
        self.scores[name] = self.scores[existing]
        return self.scores[name]

    def F(self, scores: np.ndarray) -> tuple[float, np.ndarray]:
        return self.obj.value(scores), self.w @ scores

    def interval(self, estimate: tuple[float, np.ndarray]) -> Interval:
        """The estimate's interval: BCa where the jackknife rows are there, else percentile."""
        value, rows = estimate
        jack = rows[self.n_boot:] if len(rows) > self.n_boot else None
        return interval(float(value), rows[:self.n_boot], self.confidence, jack)


def _ratio(f: tuple[float, np.ndarray], empty: tuple[float, np.ndarray], model: tuple[float, np.ndarray]
           ) -> tuple[float, np.ndarray]:
    """(F - F(∅)) / (F(M) - F(∅)), point estimate and per resample (nan or inf where F(M) = F(∅) exactly: the
    point estimate is a NumPy float so that it divides as the resamples do, never raising)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (float(np.float64(f[0] - empty[0]) / (model[0] - empty[0])),
                (f[1] - empty[1]) / (model[1] - empty[1]))


def areas(points: list[tuple[float, tuple[float, np.ndarray]]],
          to_interval: Callable[[tuple[float, np.ndarray]], Interval], log_axis: bool = False
          ) -> tuple[Interval | None, Interval | None, str | None]:
    """CPR and CMD from measured (fraction, faithfulness (value, rows)) points. Linear axis: from (0, 0), the empty
    circuit, to 100%. Log axis (MIB): the points are MIB's fractions, each at its nominal fraction (as MIB plots
    them), over log(fraction) from 0.1% to 100%, divided by the axis's length."""
    if log_axis and [p[0] for p in points] != list(MIB_FRACTIONS):
        return None, None, f"MIB's log axis needs a point at each of its fractions {MIB_FRACTIONS}"
    if len(points) < MIN_AREA_POINTS:
        return None, None, f"{len(points)} measured points, fewer than {MIN_AREA_POINTS}"
    if points[-1][0] != 1.0:
        return None, None, "no measured 100% point"
    start = [] if log_axis else [(0.0, (0.0, np.zeros_like(points[0][1][1])))]
    x = np.array([p[0] for p in start + points])
    x = np.log(x) / -np.log(x[0]) if log_axis else x
    value = np.array([p[1][0] for p in start + points])
    rows = np.stack([p[1][1] for p in start + points], axis=-1)

    def area(y: np.ndarray) -> np.ndarray:
        return ((x[1:] - x[:-1]) * (y[..., 1:] + y[..., :-1]) / 2).sum(-1)

    return (to_interval((float(area(value)), area(rows))),
            to_interval((float(area(np.abs(1 - value))), area(np.abs(1 - rows)))), None)


def _curve(run: _Run, scope: str, layers: list[str], mode: str, ranking: list[tuple[str, int, int]],
           candidates: dict[str, np.ndarray], model: tuple[float, np.ndarray], cfg: EvaluationConfig,
           rng: np.random.Generator | None, where: str) -> Curve:
    ablator = run.ablator
    shapes = {layer: candidates[layer].shape for layer in layers}
    none = {layer: np.zeros(shape, bool) for layer, shape in shapes.items()}
    prefix = f"{mode}/{scope}"
    empty = run.F(run(f"{prefix}/empty", ablator.variant(none, candidates, layers)))
    span = run.interval((model[0] - empty[0], model[1] - empty[1]))
    defined = span.above_zero()
    note = None if defined else (
        f"F(M) - F(∅) = {span.format('.4g')}: its interval contains 0, so faithfulness and completeness are "
        "undefined" if span.high >= 0 else
        f"F(M) - F(∅) = {span.format('.4g')} is negative: ablating every candidate raises F, so there is no refusal "
        "for a circuit to explain; faithfulness and completeness are undefined")
    n_total = len(ranking)
    points, faith_at = [], {}  # faith_at: size -> faithfulness (value, rows), where defined
    positions = ablator.scheme.node_classes
    for n in curve_sizes(n_total, cfg, where):
        kept = node_mask(ranking[:n], shapes)
        if n == n_total:  # every candidate kept: no edit; every candidate ablated: F(∅)
            f_c, f_mc = run.alias(f"{prefix}/C{n}", "model"), run.alias(f"{prefix}/MC{n}", f"{prefix}/empty")
        else:
            f_c = run(f"{prefix}/C{n}", ablator.variant(kept, candidates, layers))
            f_mc = run(f"{prefix}/MC{n}", ablator.variant(kept, candidates, layers, inside=False))
        fc, fmc = run.F(f_c), run.F(f_mc)
        faith_r, complete_r = _ratio(fc, empty, model), _ratio(fmc, empty, model)
        faith = run.interval(faith_r) if defined else None
        complete = run.interval(complete_r) if defined else None
        rand_f, rand_c, random_p = [], [], None
        if rng is not None and n < n_total and defined:
            for r in range(cfg.random_circuits):
                rm = random_mask(kept, candidates, rng)
                rf = run.F(run(f"{prefix}/R{r}C{n}", ablator.variant(rm, candidates, layers)))
                rand_f.append(_ratio(rf, empty, model)[0])
                if cfg.random_completeness:
                    rc = run.F(run(f"{prefix}/R{r}MC{n}", ablator.variant(rm, candidates, layers, inside=False)))
                    rand_c.append(_ratio(rc, empty, model)[0])
        if rand_f and faith is not None:
            random_p = p_above(faith.value, np.array(rand_f))
        per_layer = {layer: int(kept[layer].sum()) for layer in layers}
        per_position = {p: int(sum(kept[layer][i].sum() for layer in layers)) for i, p in enumerate(positions)}
        points.append(Point(n, n / n_total, per_layer, {p: c for p, c in per_position.items() if c},
                            [layer for layer, c in per_layer.items() if c == 0],
                            run.interval(fc), run.interval(fmc), faith, complete,
                            band(rand_f), band(rand_c), random_p))
        if faith is not None:
            faith_at[n] = faith_r
    cpr = cmd = cpr_log = cmd_log = None
    area_note = note
    if defined:
        cpr, cmd, area_note = areas([(n / n_total, r) for n, r in faith_at.items()], run.interval)
        mib = [(f, faith_at[k]) for f in MIB_FRACTIONS if (k := max(1, round(f * n_total))) in faith_at]
        cpr_log, cmd_log, _ = areas(mib, run.interval, log_axis=True)
    return Curve(scope, mode, n_total, run.interval(empty), span, note, points, cpr, cmd, area_note,
                 *reach_sizes(points), cpr_log, cmd_log)


def reach_sizes(points: Sequence[Point]) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """Per level of `REACH` the smallest size whose faithfulness interval's lower bound reaches it, and the smallest
    whose point estimate does."""
    def first(t: float, value: str) -> int | None:
        return next((p.n_nodes for p in points if p.faithfulness and getattr(p.faithfulness, value) >= t), None)

    return {str(t): first(t, "low") for t in REACH}, {str(t): first(t, "value") for t in REACH}


def evaluate_circuit(ablator: Ablator, prompts: Sequence[str], toxic: np.ndarray, refused: np.ndarray | None,
                     circuit: Circuit, scores: NodeScores, cfg: EvaluationConfig
                     ) -> tuple[CircuitEvaluation, dict[str, np.ndarray]]:
    """Every curve of one circuit on its category's held-out `prompts`; also the per-prompt scores of
    every variant (name -> (prompts,) array), from which every number here can be recomputed."""
    where = f"{circuit.method} circuit {circuit.name!r}"
    obj = objective(cfg.target, circuit.group, toxic, refused, where=f"evaluation of {where}")
    key = f"{circuit.method}/{circuit.name}"
    live = {layer: ablator.means.live(layer) for layer in ablator.layers}
    chosen = [prompts[i] for i in obj.rows]
    with tqdm(desc=f"evaluating {where}", unit="variant", leave=False) as progress:
        run = _Run(ablator, chosen, obj, cfg, key, progress)
        model = run.F(run("model", None))
        curves, first = [], None
        for i, mode in enumerate(cfg.error_modes):
            candidates = candidate_mask(live, errors=mode == "nodes")
            ranking = ranked_nodes(scores, candidates)
            first = first or (ranking, candidates)
            curves.append(_curve(run, ALL_LAYERS, ablator.layers, mode, ranking, candidates, model, cfg,
                                 _rng(cfg.seed, key, 1) if i == 0 else None, where))
            if i == 0 and cfg.per_layer and len(ablator.layers) > 1:
                for layer in ablator.layers:
                    own = [e for e in ranking if e[0] == layer]
                    curves.append(_curve(run, layer, [layer], mode, own, candidates, model, cfg, None, where))
        sanity = _sanity(run, cfg, curves[0], *first, _rng(cfg.seed, key, 100))
    n_positive = int(obj.strata.sum())
    return (CircuitEvaluation(circuit.name, circuit.category, circuit.group, circuit.method, cfg.target,
                              len(chosen), n_positive, run.interval(model), curves, sanity, cfg.intervals),
            run.scores)


def _sanity(run: _Run, cfg: EvaluationConfig, main: Curve, ranking: Sequence[tuple[str, int, int]],
            candidates: dict[str, np.ndarray], rng: np.random.Generator) -> Sanity:
    """The prefix check, the splice check (each SAE's reconstruction in place of the residual), and the random
    check around the smallest faithful circuit (faithfulness >= 0.8):
    that circuit's claim is that the latents it leaves out do not matter, so ablating a random share of
    them must move scores little. Around a smaller circuit (e.g. the discovery threshold's) the check
    would measure how distributed refusal is, which the curves already show, not whether ablation works."""
    ablator, notes = run.ablator, []
    model = run.scores["model"]
    prefix_change, prefix_check, random_check = None, "not applicable", "not applicable"
    if not ablator.scheme.prefix:
        notes.append("the positions are global (no shared prefix classes): the prefix check does not apply")
    else:
        prefix_change = float(np.abs(run("sanity/prefix", ablator.prefix_ablation()) - model).max())
        prefix_check = _prefix_status(prefix_change)
        if prefix_check == "fail":
            notes.append(f"ablating the shared prefix moved a score by {prefix_change:.3g} > {PREFIX_TOLERANCE}: "
                         "the prefix is not shared, or the means are off")
    excludes, positive = main.span.excludes_zero(), main.span.above_zero()
    splice = None
    if positive:
        f_model = run.obj.value(model)
        splice = {layer: abs(run.obj.value(run(f"sanity/splice/{layer}", ablator.splice(layer))) - f_model)
                  / abs(main.span.value) for layer in ablator.layers}
        worst = max(splice, key=splice.get)
        if _splice_status(splice) == "fail":
            notes.append(f"splicing in {worst}'s reconstruction moved F by {splice[worst]:.0%} of |F(M) - F(∅)| "
                         f"(tolerance {SPLICE_TOLERANCE:.0%}): its error term carries that much of F, which keep "
                         "mode never ablates; read the nodes-mode curves")
    size = next((p.n_nodes for p in main.points if p.faithfulness is not None and p.n_nodes < main.n_candidates
                 and p.faithfulness.value >= SANITY_FAITHFULNESS), None)
    random_change = relative = None
    if not positive:
        notes.append(("the interval of F(M) - F(∅) contains 0: nothing measurable to explain" if not excludes else
                      "F(M) - F(∅) is negative: no refusal to explain") + ", the random and splice checks do not apply")
    elif size is None:
        notes.append(f"no circuit below all {main.n_candidates} candidates reaches faithfulness "
                     f"{SANITY_FAITHFULNESS}: the random check does not apply")
    else:
        kept = node_mask(ranking[:size], {layer: m.shape for layer, m in candidates.items()})
        chosen = {}
        for layer, m in candidates.items():
            outside = m & ~kept[layer]
            NodeIndex.errors(outside)[:] = False  # latents only
            flat = np.flatnonzero(outside)
            pick = rng.choice(flat, size=int(round(cfg.sanity_fraction * len(flat))), replace=False)
            chosen[layer] = np.zeros(m.size, bool)
            chosen[layer][pick] = True
            chosen[layer] = chosen[layer].reshape(m.shape)
        moved = run("sanity/random", ablator.variant(chosen, candidates, inside=False))
        random_change = float(np.median(np.abs(moved - model)))
        relative = random_change / abs(main.span.value)
        random_check = _random_status(relative)
        if random_check == "fail":
            notes.append(f"ablating a random {cfg.sanity_fraction:.0%} of the latents outside the {size}-node "
                         f"circuit moved the median score by {random_change:.3g}, {relative:.0%} of |F(M) - F(∅)| "
                         f"(tolerance {RANDOM_TOLERANCE:.0%})")
    splice_check = _splice_status(splice)
    return Sanity(prefix_change, size, random_change, relative, excludes, prefix_check, random_check,
                  _passed(prefix_check, random_check, splice_check), notes, splice, splice_check)


__all__ = [
    "ALL_LAYERS",
    "ERROR_MODES",
    "RECORD_VERSION",
    "CircuitEvaluation",
    "Curve",
    "EvaluationConfig",
    "Point",
    "Sanity",
    "areas",
    "curve_sizes",
    "evaluate_circuit",
    "faithful_sizes",
    "reach_sizes",
    "upgrade_record",
]
