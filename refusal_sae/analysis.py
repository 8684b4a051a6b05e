"""The analysis stages after SAE training: quality -> discover -> similarity -> evaluate -> cross -> directions ->
ceiling -> edit -> tradeoff -> summary -> report -> export.

Each stage is a plain function of the SAEs, the activation cache, the prompts and the model
(`AnalysisInputs`) and of the previous stage's result, passed in memory. A stage returns typed records; this
module writes them through the run layout (`refusal_sae.layout`) and draws their figures (`refusal_sae.plots`),
and a later process reads them back (`load_discovery`, `load_evaluation`) to run one stage alone on a finished
run (`analyze`).

    discover    node means, per method and category the circuit and every node's score
    similarity  per method: do the category circuits share nodes more than chance? (monolithic/modular)
    evaluate    per circuit: faithfulness / completeness curves with intervals, sanity checks
    cross       per method: each category's circuit ablated on every category's held-out prompts
                (`refusal_sae.cross_ablation`; when `cross_ablation.enabled`, or asked for by name)
    directions  without SAEs: refusal directions per category and their cross-category ablation
                (`refusal_sae.directions`; when `directions.enabled`, or asked for by name)
    ceiling     per method, and for the directions where they ran: the same question against the split-half
                noise ceiling (`refusal_sae.ceiling`; when `ceiling.enabled`, or asked for by name)
    edit        circuits and the refusal direction judged by the answers they change (`refusal_sae.editing`;
                when `editing.enabled`, or asked for by name)
    tradeoff    over-refusal against refusal under over-refusal features, the refusal direction and the
                false-refusal vector, swept (`refusal_sae.overrefusal`; when `tradeoff.enabled`, or by name)
    summary     the short summary the CLI prints
    report      node cards (top contexts, logit lens, ...) and the analysis as one HTML page (`refusal_sae.report`)
    export      every circuit as a circuit-tracer graph, its nodes labelled as the report labels them
                (`refusal_sae.export`)

(The SAE quality stage, `quality`, runs first: it needs no circuit, and it judges loaded SAEs before they are used.)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from refusal_sae.ablation import Ablator
from refusal_sae.activations import ActivationCache, PromptActivations
from refusal_sae.attribution import AttributionConfig, attribution_scores
from refusal_sae.attribution_check import AttributionCheck, better_estimate, check_attribution
from refusal_sae.ceiling import (
    Ceiling,
    CeilingConfig,
    DirectionCeiling,
    direction_ceiling,
    output_writers,
    split_half_ceiling,
)
from refusal_sae.circuits import ERROR, Circuit, NodeScores, circuit_size
from refusal_sae.cross_ablation import (
    CrossAblationConfig,
    CrossAblationResult,
    cross_ablation,
)
from refusal_sae.data import PromptSample, Split
from refusal_sae.directions import (
    GLOBAL,
    DirectionsConfig,
    DirectionsResult,
    run_directions,
    site_residuals,
)
from refusal_sae.discovery import Attribution, DiscoveryConfig, DiscoveryInputs, discover, methods
from refusal_sae.editing import (
    CategoryEdits,
    EditingConfig,
    GlobalDirection,
    circuit_answers,
    direction_answers,
    edit_category,
    edits_table,
)
from refusal_sae.errors import UserError
from refusal_sae.evaluation import (
    RECORD_VERSION,
    CircuitEvaluation,
    EvaluationConfig,
    evaluate_circuit,
    faithful_sizes,
    upgrade_record,
)
from refusal_sae.features import NodeMeans, encode_prompts
from refusal_sae.io import from_json, md_cell, write_json
from refusal_sae.layout import (
    AnalysisLayout,
    AnswersSummary,
    CircuitEntry,
    CircuitSummary,
    DirectionsSummary,
    DiscoveryRecord,
    MethodSummary,
    RunLayout,
    Summary,
    TradeoffSummary,
)
from refusal_sae.metric import RefusalMetric, RefusalMetricConfig
from refusal_sae.model import ModelWrapper
from refusal_sae.plots import (
    plot_ceiling,
    plot_cross_ablation,
    plot_curves,
    plot_directions,
    plot_similarity,
    plot_tradeoff,
)
from refusal_sae.overrefusal import TradeoffConfig, TradeoffResult, category_table, run_tradeoff, tradeoff_table
from refusal_sae.positions import PositionMode, PositionScheme, position_scheme
from refusal_sae.protocol import ProtocolStamp
from refusal_sae.export import circuit_tracer_graph
from refusal_sae.report import build_report, load_cards, node_label
from refusal_sae.sae import SparseAutoencoder
from refusal_sae.sae_io import PretrainedSAE
from refusal_sae.sae_quality import LayerQuality, quality_table, sae_quality
from refusal_sae.similarity import Similarity, SimilarityConfig, analyse_similarity
from refusal_sae.stats import Interval
from refusal_sae.validate import positive_int
from refusal_sae.validity import (
    ValidityConfig,
    behavior_labels,
    validity_report,
    write_validity_report,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class AnalysisInputs:
    """What every stage reads: a run's SAEs, cache, prompts and model."""

    saes: Mapping[str, SparseAutoencoder]
    cache: ActivationCache
    splits: Mapping[Split, Sequence[PromptSample]]
    wrapper: Callable[[], ModelWrapper]
    """The model, loaded on first call (correlation discovery needs only its tokenizer)."""
    run: RunLayout
    validity: ValidityConfig
    """Greedy generation settings for behaviour labels."""

    def refused(self, samples: Sequence[PromptSample]) -> np.ndarray:
        """Whether the model refuses each prompt (greedy answers, cached in the run)."""
        return behavior_labels(self.wrapper(), samples, self.validity, self.run.behavior_answers)

    def scheme(self, mode: PositionMode) -> PositionScheme:
        """The position classes of the run's prompts (both splits) under the model's chat template."""
        every = [s for split in ("discovery", "evaluation") for s in self.splits.get(split, [])]
        return position_scheme(self.wrapper(), every, mode)


@dataclass
class Discovery:
    """The discover stage's result."""

    record: DiscoveryRecord
    means: NodeMeans
    circuits: dict[str, list[tuple[Circuit, NodeScores]]]
    """Per method, every circuit with its node scores."""
    inputs: DiscoveryInputs | None = None
    """What the methods read, when discovery ran in this process (the ceiling stage reuses it)."""


def _categories(samples: Sequence[PromptSample]) -> list[str]:
    return sorted({str(s.category) for s in samples})


def discovery_inputs(inputs: AnalysisInputs, cfg: DiscoveryConfig, target: str, metric: RefusalMetricConfig
                     ) -> tuple[DiscoveryInputs, PositionScheme]:
    """What the discovery methods read: the discovery prompts' node values (encoded anew, deterministically, so
    a later stage gets those discovery had), their labels, the model and F."""
    wrapper = inputs.wrapper()
    scheme = inputs.scheme(cfg.positions)
    log.info("position classes: %s (shared prefix %d tokens, suffix %d)", scheme.node_classes, scheme.prefix,
             scheme.suffix)
    pf = encode_prompts(inputs.saes, PromptActivations(inputs.cache, ["discovery"], list(inputs.saes)), scheme)
    samples = [inputs.splits["discovery"][i] for i in pf.prompt_index]
    need_refused = cfg.label_source == "behavior" or (target == "behavior" and "attribution" in cfg.methods)
    refused = inputs.refused(samples) if need_refused else None
    labels = refused if cfg.label_source == "behavior" else pf.labels
    scorer = RefusalMetric.from_wrapper(wrapper, metric) if "attribution" in cfg.methods else None
    return DiscoveryInputs(pf, samples, labels, refused, inputs.saes, inputs.wrapper, scorer, target), scheme


def run_discovery(inputs: AnalysisInputs, out: AnalysisLayout, cfg: DiscoveryConfig, target: str,
                  metric: RefusalMetricConfig) -> Discovery:
    """Node means, and every method's circuit and node scores per category (and group); written to `out`."""
    d_inputs, scheme = discovery_inputs(inputs, cfg, target, metric)
    pf, samples = d_inputs.features, d_inputs.samples
    out.write_means(pf.means)
    found, entries = {}, {}
    categories = _categories(samples)
    for method in methods(cfg):
        results = []
        for category in tqdm(categories, desc=f"{method.name} discovery", unit="category", leave=False):
            results += discover(method, d_inputs, [category], cfg.groups)
        for circuit, scores in results:
            out.method(method.name).write_circuit(circuit, scores)
        found[method.name] = results
        entries[method.name] = [CircuitEntry(c.name, c.category, c.group, len(c.nodes), len(c.edges), c.n_prompts,
                                             c.positions()) for c, _ in results]
    if "attribution" in found and cfg.attribution.check_nodes:
        checks = run_attribution_check(inputs, d_inputs, found["attribution"], cfg.attribution)
        out.method("attribution").write_attribution_check(checks)
    record = DiscoveryRecord(asdict(cfg), target, asdict(metric), scheme.to_dict(), entries)
    out.write_discovery(record)
    return Discovery(record, pf.means, found, d_inputs)


def run_attribution_check(inputs: AnalysisInputs, d_inputs: DiscoveryInputs,
                          circuits: Sequence[tuple[Circuit, NodeScores]], cfg: AttributionConfig
                          ) -> list[AttributionCheck]:
    """Per category circuit: patching and integrated gradients against exact single-node ablation effects."""
    wrapper, scorer = inputs.wrapper(), d_inputs.metric  # the scorer discovery built for attribution
    ablator = Ablator(wrapper, inputs.saes, d_inputs.features.means, scorer, cfg.batch_size)
    candidates = d_inputs.candidates()
    method = Attribution(cfg)
    other = "ig" if cfg.estimate == "patching" else "patching"
    rng = np.random.default_rng(0)
    checks = []
    for circuit, scores in tqdm(circuits, desc="checking attribution against exact ablation", unit="circuit",
                                leave=False):
        prompts, weights = method.objective(d_inputs, circuit.category, circuit.group)
        estimates = {cfg.estimate: scores, other: attribution_scores(
            wrapper, inputs.saes, d_inputs.features.means, scorer, prompts, weights, estimate=other,
            steps=cfg.ig_steps, batch_size=cfg.batch_size)}
        checks.append(check_attribution(ablator, prompts, weights, circuit.name, estimates, candidates,
                                        cfg.check_nodes, cfg.check_nodes, rng))
    for name in (cfg.estimate, other):
        rs = [e.spearman for c in checks for e in c.checks if e.estimate == name and e.spearman is not None]
        log.info("attribution %s against exact single-node ablation: mean Spearman %s over %d circuits", name,
                 f"{np.mean(rs):.2f}" if rs else "undefined", len(rs))
    log.info("the better estimate: %s", better_estimate(checks))
    return checks


def load_discovery(out: AnalysisLayout) -> Discovery:
    """The discover stage's result as a previous run wrote it."""
    record = out.read_discovery()
    circuits = {m: [out.method(m).read_circuit(e.name) for e in entries] for m, entries in record.circuits.items()}
    return Discovery(record, out.read_means(), circuits)


def candidate_keys(means: NodeMeans) -> dict[str, list[tuple[int, str]]]:
    """Per layer the (feature, position) keys of every node a circuit may hold: live latents, error nodes."""
    classes = means.scheme.node_classes
    out = {}
    for layer in means.layers:
        pos, feat = np.nonzero(means.live(layer))
        out[layer] = [(int(f), classes[p]) for p, f in zip(pos, feat)] + [(ERROR, c) for c in classes]
    return out


def run_similarity(discovery: Discovery, out: AnalysisLayout, cfg: SimilarityConfig) -> dict[str, Similarity]:
    """Per method with two or more category circuits: the similarity analysis (written to `out`)."""
    results = {}
    for method, items in discovery.circuits.items():
        circuits = [c for c, _ in items]
        if sum(c.group == "all" for c in circuits) >= 2:
            results[method] = analyse_similarity(circuits, candidate_keys(discovery.means), cfg)
            out.method(method).write_similarity(results[method])
            plot_similarity(results[method], out.method(method).similarity_png)
    return results


def run_ceiling(inputs: AnalysisInputs, discovery: Discovery, directions: DirectionsResult | None,
                out: AnalysisLayout, cfg: CeilingConfig,
                results: Mapping[str, Sequence[CircuitEvaluation]] | None = None
                ) -> tuple[dict[str, Ceiling], DirectionCeiling | None]:
    """Per method with two or more category circuits, the split-half noise ceiling of its circuits, with the
    discovery's own options, F and metric (from its record); and, where the refusal-directions stage has run, that
    of the directions at its layer and position. Written to `out`."""
    d_cfg = from_json(DiscoveryConfig, discovery.record.config)
    metric_cfg = from_json(RefusalMetricConfig, discovery.record.metric)
    d_inputs = discovery.inputs
    if d_inputs is None:
        d_inputs, _ = discovery_inputs(inputs, d_cfg, discovery.record.target, metric_cfg)
    exclude = None
    if cfg.output_fraction:
        wrapper = inputs.wrapper()
        metric = RefusalMetric.from_wrapper(wrapper, metric_cfg)
        alignment = {layer: np.concatenate([metric.output_alignment(wrapper.logit_lens(sae.W_dec[i:i + 256].detach()))
                                            for i in range(0, sae.cfg.width, 256)])
                     for layer, sae in inputs.saes.items()}
        exclude = output_writers(alignment, d_inputs.candidates(), cfg.output_fraction)
    found: dict[str, Ceiling] = {}
    for method in methods(d_cfg):
        categories = sorted({c.category for c, _ in discovery.circuits.get(method.name, []) if c.group == "all"})
        if len(categories) >= 2:
            faithful = [n for n in faithful_sizes((results or {}).get(method.name, [])).values() if n is not None]
            at = int(np.median(faithful)) if cfg.at_faithful_size and faithful else None
            found[method.name] = split_half_ceiling(method, d_inputs, categories, cfg, exclude, at)
            out.method(method.name).write_ceiling(found[method.name])
            plot_ceiling(found[method.name], out.method(method.name).ceiling_png)
    if directions is None:
        return found, None
    layer, position = directions.selection.layer, directions.selection.position
    ceiling = direction_ceiling(*site_residuals(inputs.cache, layer, position), layer, position, cfg)
    out.directions.write_ceiling(ceiling)
    return found, ceiling


def _rows(samples: Sequence[PromptSample], category: str, group: str) -> list[int]:
    return [i for i, s in enumerate(samples) if s.category == category
            and (group == "all" or s.refusal_label == (group == "toxic"))]


def fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 of named arrays: what an evaluation record was computed from (its node means and ranking)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def _ablator(inputs: AnalysisInputs, discovery: Discovery, metric: RefusalMetricConfig, batch_size: int) -> Ablator:
    """Mean-ablation with the discovery's node means and the SAEs they were computed with."""
    wrapper = inputs.wrapper()
    missing = [layer for layer in discovery.means.layers if layer not in inputs.saes]
    if missing:
        raise UserError(f"circuits were found with SAEs for {missing}, which are missing now; train them again")
    return Ablator(wrapper, {k: inputs.saes[k] for k in discovery.means.layers}, discovery.means,
                   RefusalMetric.from_wrapper(wrapper, metric), batch_size)


def run_evaluation(inputs: AnalysisInputs, discovery: Discovery, out: AnalysisLayout, cfg: EvaluationConfig,
                   metric: RefusalMetricConfig) -> dict[str, list[CircuitEvaluation]]:
    """Every circuit's curves on its category's held-out prompts; each circuit's record is written as soon as
    it is done, and one already written from the same settings, node means and ranking is read back instead
    of recomputed (so adding a method or a category to a rerun recomputes nothing already done)."""
    ablator = _ablator(inputs, discovery, metric, cfg.batch_size)
    evaluation = list(inputs.splits["evaluation"])
    toxic = np.array([s.refusal_label for s in evaluation], dtype=bool)
    refused = inputs.refused(evaluation) if cfg.target == "behavior" else None
    common = {"record": RECORD_VERSION, "evaluation": asdict(cfg), "metric": asdict(metric), "scheme": discovery.record.scheme,
              "means": fingerprint({**discovery.means.features, **{f"e.{k}": v for k, v in discovery.means.errors.items()}})}
    results: dict[str, list[CircuitEvaluation]] = {}
    for method, items in discovery.circuits.items():
        layout = out.method(method)
        results[method] = []
        for circuit, scores in tqdm(items, desc=f"evaluating {method} circuits", unit="circuit"):
            key = {**common, "circuit": circuit.name, "ranking": fingerprint(scores.arrays())}
            done = layout.read_evaluation(CircuitEvaluation, circuit.name, key)
            if done is None:
                rows = _rows(evaluation, circuit.category, circuit.group)
                if not rows:
                    raise UserError(f"the evaluation split has no {circuit.group} prompts of category "
                                    f"{circuit.category!r}; raise data.prompts.eval_fraction")
                done, variant_scores = evaluate_circuit(
                    ablator, [evaluation[i].prompt for i in rows], toxic[rows],
                    None if refused is None else refused[rows], circuit, scores, cfg)
                layout.write_evaluation(done, key, variant_scores)
            for note in done.sanity.notes:
                (log.warning if done.sanity.passed is False else log.info)("%s %s: %s", method, circuit.name, note)
            results[method].append(done)
        plot_curves({method: results[method]}, layout.curves_png)
    if len(results) > 1:
        plot_curves(results, out.comparison_png)
    return results


def run_cross_ablation(inputs: AnalysisInputs, discovery: Discovery,
                       results: Mapping[str, Sequence[CircuitEvaluation]], out: AnalysisLayout,
                       cfg: CrossAblationConfig, target: str, metric: RefusalMetricConfig
                       ) -> dict[str, CrossAblationResult]:
    """Per method with two or more category circuits: the cross-ablation matrix (written to `out`)."""
    ablator = _ablator(inputs, discovery, metric, cfg.batch_size)
    evaluation = list(inputs.splits["evaluation"])
    refused = inputs.refused(evaluation) if target == "behavior" else None
    found = {}
    for method, items in discovery.circuits.items():
        if sum(c.group == "all" for c, _ in items) < 2:
            continue
        sizes = faithful_sizes(results.get(method, []))
        found[method] = cross_ablation(ablator, evaluation, refused, items, sizes, cfg, target)
        log.info("%s", found[method].explanation)
        out.method(method).write_cross_ablation(found[method])
        plot_cross_ablation(found[method], out.method(method).cross_ablation_png)
    return found


def summarise(out: AnalysisLayout, results: Mapping[str, Sequence[CircuitEvaluation]],
              similarity: Mapping[str, Similarity], directions: DirectionsResult | None = None,
              edits: Mapping[str, Sequence[CategoryEdits]] | None = None,
              ceilings: Mapping[str, Ceiling] | None = None, directions_ceiling: DirectionCeiling | None = None,
              quality: list[LayerQuality] | None = None, tradeoff: TradeoffResult | None = None) -> Summary:
    """Per method and circuit: F(M) - F(∅), the sizes reaching faithfulness 0.5 / 0.8, CPR, sanity; the
    similarity verdict and the split-half ceiling's; the refusal directions' verdict beside them; and what each
    edit did to the answers."""
    ceilings = ceilings or {}
    methods = {}
    for method in dict.fromkeys([*results, *similarity, *ceilings]):
        rs = results.get(method, [])
        verdict = similarity[method].verdict if method in similarity else None
        circuits = {}
        for r in rs:
            main = r.curves[0]
            circuits[r.name] = CircuitSummary(r.F_M, main.span, main.error_mode, main.n_candidates, main.reaches,
                                              main.cpr, main.cmd, main.ratio_note or main.area_note, r.sanity.passed)
        ceiling = ceilings.get(method)
        methods[method] = MethodSummary(circuits, verdict and verdict.label, verdict and verdict.explanation,
                                        ceiling and ceiling.verdict, ceiling and ceiling.reason)
    answers = {method: {r.circuit: [AnswersSummary(o.edit, o.toxic.refused, o.toxic.n, o.hard.refused, o.hard.n,
                                                    o.coherence_change) for o in r.outcomes] for r in records}
               for method, records in (edits or {}).items()}
    points = None
    if tradeoff is not None:
        chosen = {(c.method, c.setting) for c in tradeoff.chosen}
        points = [TradeoffSummary(p.method, p.setting, p.toxic.refused, p.toxic.n, p.hard.refused, p.hard.n,
                                  p.coherence_change, (p.method, p.setting) in chosen) for p in tradeoff.points]
    if directions is None:
        return Summary(str(out.root), methods, answers=answers, protocol=out.protocol, sae_quality=quality,
                       tradeoff=points)
    v = directions.verdict
    return Summary(str(out.root), methods, DirectionsSummary(
        directions.selection.layer, directions.selection.position, v.label, v.mean_share, v.p_value,
        v.global_share, v.explanation, directions_ceiling and directions_ceiling.verdict,
        directions_ceiling and directions_ceiling.reason, directions.orthogonal_summary), answers, out.protocol,
        quality, points)


def summary_tables(results: Mapping[str, Sequence[CircuitEvaluation]], directions: DirectionsResult | None,
                   edits: Mapping[str, Sequence[CategoryEdits]] | None = None) -> str:
    """`summary.md`: the results table, the refusal directions' table when the stage has run, and the answers under
    every edit when the edit stage has; the first two say beside F what their edits did to the answers."""
    edits = edits or {}
    by_circuit = {(m, r.circuit): r for m, records in edits.items() for r in records}
    table = results_table(results, by_circuit)
    if directions is not None:
        by_category = {r.category: r for records in edits.values() for r in records}
        table += "\n" + directions_table(directions, by_category)
    return table + ("\n" + edits_table(edits) if edits else "")


def _ci(x: Interval | None, none: str = "null") -> str:
    """`value [low, high]` of an interval."""
    if x is None:
        return none
    return x.format()


def results_table(results: Mapping[str, Sequence[CircuitEvaluation]],
                  edits: Mapping[tuple[str, str], CategoryEdits] | None = None) -> str:
    """A markdown table per method: per circuit what there is to explain, where faithfulness reaches 0.5 and
    0.8 (nodes, share of all candidates), faithfulness and completeness there with the random band, CPR of
    each error mode, and the sanity checks. Every number with its 95% interval. With `edits` ((method, circuit)
    -> its edit-stage record), a last column says what ablating and keeping the circuit did to the answers."""
    lines = []
    for method, rs in results.items():
        modes = list(dict.fromkeys(c.error_mode for r in rs for c in r.curves))
        answers = edits is not None and any((method, r.name) in edits for r in rs)
        methods = sorted({r.intervals for r in rs})
        lines += [f"**{method}** (error terms {modes[0]}; CPR per error mode, linear axis / MIB's log axis; "
                  f"95% {' and '.join(methods)} bootstrap intervals)", "",
                  "| circuit | prompts (+/-) | F(M) - F(∅) | faithfulness 0.5 at | 0.8 at | faithfulness there "
                  "(random; p) | completeness there | " + " | ".join(f"CPR ({m})" for m in modes) + " | sanity |"
                  + (" answers refused (toxic, hard) |" if answers else ""),
                  "|" + "---|" * (8 + len(modes) + answers)]
        for r in rs:
            main = r.curves[0]
            n = main.n_candidates

            def at(level: str) -> str:
                k, point = main.reaches[level], main.reaches_point.get(level)
                text = "not reached" if k is None else f"{k} ({k / n:.1%})"
                return text if point == k else f"{text}; point estimate at {'-' if point is None else point}"

            k = main.reaches["0.8"]
            point = next((p for p in main.points if p.n_nodes == k), None)
            if point is None:
                there = complete = "-"
            else:
                band = point.random_faithfulness
                p = "" if point.random_p is None else f"; p = {point.random_p:.2g}"
                there = _ci(point.faithfulness) + ("" if band is None else f" ({band.mean:.2f} ± {band.sd:.2f}{p})")
                if point.faithfulness is not None and point.faithfulness.dropped:
                    there += f"; {point.faithfulness.dropped} resamples undefined"
                complete = _ci(point.completeness)
            curves = [next((c for c in r.curves if c.error_mode == m and c.all_layers), None) for m in modes]
            cprs = ["null" if c is None else f"{_ci(c.cpr)} / {_ci(c.cpr_log)}" for c in curves]
            sanity = sanity_word(r.sanity.passed) + "".join(f"; {n}" for n in r.sanity.notes)
            if r.sanity.random_relative_change is not None:
                sanity += (f" (random latents outside {r.sanity.random_circuit_nodes} nodes: "
                           f"median change {r.sanity.random_relative_change:.0%} of the span)")
            sanity = md_cell(sanity)
            lines.append(f"| {md_cell(r.name)} | {r.n_prompts} ({r.n_positive}/{r.n_prompts - r.n_positive}) | {_ci(main.span)} | "
                         f"{at('0.5')} | {at('0.8')} | {there} | {complete} | {' | '.join(cprs)} | {sanity} |"
                         + (f" {circuit_answers((edits or {}).get((method, r.name)))} |" if answers else ""))
        lines.append("")
    return "\n".join(lines)


def directions_table(result: DirectionsResult, edits: Mapping[str, CategoryEdits] | None = None) -> str:
    """A markdown table: per category its held-out toxic prompts' refusal score, with the global and with its own
    direction ablated, the share of its own direction's drop the global one has, the random directions' drop,
    and its safe prompts' score with its own direction added; then the verdict. With `edits` (category -> an
    edit-stage record), a last column says what ablating and adding the global direction did to the answers."""
    answers = bool(edits) and any(r.category in edits for r in result.per_category)
    lines = [f"**refusal directions** (difference of means at {result.selection.layer}, position "
             f"{result.selection.position}; refusal score of the held-out prompts)", "",
             "| category | prompts (toxic/safe) | toxic score | global ablated | own ablated | global share | random "
             "ablated: change | safe score | own added |" + (" answers refused (toxic, hard) |" if answers else ""),
             "|" + "---|" * (9 + answers)]
    for b, r in enumerate(result.per_category):
        own, band = 1 + b, r.random_change  # row 0 is the global direction, then the categories in order
        lines.append(f"| {md_cell(r.category)} | {r.n_toxic}/{r.n_safe} | {_ci(r.toxic)} | {_ci(result.ablation[0][b].score)} | "
                     f"{_ci(result.ablation[own][b].score)} | {_ci(result.ablation[0][b].share)} | "
                     f"{band.mean:.2f} ± {band.sd:.2f} | {_ci(r.safe)} | {_ci(result.addition[own][b].score)} |"
                     + (f" {direction_answers((edits or {}).get(r.category))} |" if answers else ""))
    own_parts = [result.orthogonal_summary] if result.orthogonal_summary else []
    return "\n".join([*lines, "", result.verdict.explanation, *own_parts, ""])


def sanity_word(passed: bool | None) -> str:
    """ok (a check passed, none failed), FAILED, or "not tested" (no check applied)."""
    return "not tested" if passed is None else ("ok" if passed else "FAILED")


def protocol_label(stamp: Mapping[str, Any] | None) -> str:
    """Which protocol (a stamp as the records hold it) results are under, or that none fixed their decision rules."""
    if stamp is None:
        return "none (exploratory: no pre-registered options or decision rules)"
    return f"{ProtocolStamp(**stamp).label()} from {stamp['path']}"


def protocol_line(stamp: Mapping[str, Any] | None) -> str:
    return f"protocol: {protocol_label(stamp)}"


def format_summary(summary: Summary) -> str:
    """What the analysis can claim, a few lines per method: per circuit what there is to explain, or "nothing
    measurable" / "negative"; the sizes whose faithfulness interval reaches 0.5 / 0.8; CPR; sanity. A verdict only
    where it is supported (`verdict_line`); the overlap and transfer labels as descriptions."""
    lines = [f"circuits in {summary.directory}", protocol_line(summary.protocol)]
    for q in summary.sae_quality or []:
        lines.append(f"SAE {q.layer}: FVU {q.fvu:.3f}, L0 {q.l0:.0f}, dead {q.dead_fraction:.0%}, dense "
                     f"{q.dense_fraction:.0%}; spliced in, loss recovered {q.loss_recovered:.3f} (next-token CE "
                     f"{q.ce_clean:.3f} -> {q.ce_spliced:.3f} nats, mean ablation {q.ce_mean:.3f})")
    for method, m in summary.methods.items():
        lines.append(f"{method}: F(M)-F(empty) [95% CI] | nodes whose faithfulness interval lies above 0.5 / 0.8, of all "
                     "| CPR | sanity")
        for name, r in m.circuits.items():
            if r.span.low <= 0:
                what = "negative" if r.span.high < 0 else "nothing measurable"
                lines.append(f"  {name:<24} {what}: F(M)-F(empty) = {_ci(r.span)}")
                continue
            reach = " / ".join("-" if v is None else str(v) for v in r.reaches.values())
            line = (f"  {name:<24} {_ci(r.span)} | {reach} of {r.n_candidates} | {_ci(r.cpr, 'n/a')} | "
                    f"{sanity_word(r.sanity_passed)}")
            lines.append(line + (f"  ({r.note})" if r.note else ""))
        if m.verdict_explanation:
            lines.append(f"  overlap at the discovery threshold (describes, decides nothing): {m.verdict_explanation}")
        if m.ceiling_verdict:
            lines.append(f"  split-half ceiling: {m.ceiling_verdict} ({m.ceiling_explanation})")
        lines.append(f"  {verdict_line(m, summary.directions)}")
    if summary.directions is not None:
        lines.append(f"directions (transfer share; describes, decides nothing): {summary.directions.verdict_explanation}")
        if summary.directions.orthogonal:
            lines.append(f"  {summary.directions.orthogonal}")
        if summary.directions.ceiling_verdict:
            lines.append(f"  split-half ceiling: {summary.directions.ceiling_verdict} "
                         f"({summary.directions.ceiling_explanation})")
    for method, categories in summary.answers.items():
        lines.append(f"{method}: refused answers under each edit (toxic, hard; random circuits: their range)")
        for category, rows in categories.items():
            lines.append(f"  {category:<24} " + " | ".join(_answers(rows)))
    return "\n".join(lines)


def verdict_line(method: MethodSummary, directions: DirectionsSummary | None) -> str:
    """"verdict: ..." from the method's split-half ceiling, beside the directions' ceiling, where at least two of its
    circuits pass the evaluation (a measurably positive F(M) - F(∅), faithfulness 0.8 reached by the interval's
    lower bound, no failed check) and both ceilings ran; otherwise "no verdict is supported", and why."""
    passing = [n for n, r in method.circuits.items()
               if r.span.above_zero() and r.reaches.get("0.8") is not None and r.sanity_passed is not False]
    why = []
    if len(passing) < 2:
        why.append(f"{len(passing)} of {len(method.circuits)} circuits pass the evaluation (a measurable effect, "
                   "faithfulness 0.8 by the interval's lower bound, no failed check) and a comparison needs two")
    if method.ceiling_verdict is None:
        why.append("the split-half ceiling did not run (analysis.ceiling.enabled)")
    if directions is None or directions.ceiling_verdict is None:
        why.append("the refusal directions' split-half ceiling did not run (analysis.directions.enabled and "
                   "analysis.ceiling.enabled), and a circuit verdict stands only beside theirs")
    if why:
        return "no verdict is supported: " + "; ".join(why)
    agree = "they agree" if method.ceiling_verdict == directions.ceiling_verdict else "they disagree: no single answer"
    return (f"verdict: {method.ceiling_verdict} by the split-half ceiling over {len(passing)} passing circuits, "
            f"beside the refusal directions' {directions.ceiling_verdict}; {agree}")


def _answers(rows: Sequence[AnswersSummary]) -> list[str]:
    """`edit t/n, h/m` per edit, the random circuits of each kind of values as one `random lo-hi/n, lo-hi/m` where
    the first of them stood."""
    out: list[str] = []
    randoms: dict[str, list[AnswersSummary]] = {}
    for r in rows:
        if r.edit.startswith("random"):
            cf = " cf" if r.edit.endswith(" cf") else ""
            if cf not in randoms:
                out.append(f"random{cf}")  # its place, filled in below
            randoms.setdefault(cf, []).append(r)
        else:
            out.append(f"{r.edit} {r.toxic_refused}/{r.toxic_n}, {r.hard_refused}/{r.hard_n}")
    for cf, group in randoms.items():
        t, h = [r.toxic_refused for r in group], [r.hard_refused for r in group]
        out[out.index(f"random{cf}")] = (f"random{cf} {min(t)}-{max(t)}/{group[0].toxic_n}, "
                                         f"{min(h)}-{max(h)}/{group[0].hard_n}")
    return out




STAGES = ("discover", "quality", "similarity", "evaluate", "cross", "directions", "ceiling", "edit", "tradeoff",
          "summary", "report", "export")


@dataclass
class AnalysisConfig:
    """Every option of the circuit analysis: what `CircuitAnalysisCallback` and `analyze` take."""

    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    ceiling: CeilingConfig = field(default_factory=CeilingConfig)
    """The split-half noise ceiling: circuit similarity between categories as a fraction of that within one."""
    cross_ablation: CrossAblationConfig = field(default_factory=CrossAblationConfig)
    """Each category's circuit ablated on every category's held-out prompts: does their refusal need it?"""
    directions: DirectionsConfig = field(default_factory=DirectionsConfig)
    """Refusal directions per category without SAEs (Arditi et al.): a second opinion on the similarity verdict."""
    metric: RefusalMetricConfig = field(default_factory=RefusalMetricConfig)
    """The refusal score F is built from (attribution differentiates it, evaluation measures it)."""
    editing: EditingConfig = field(default_factory=EditingConfig)
    """Circuits and the refusal direction judged by the answers they change (greedy generation under edits)."""
    tradeoff: TradeoffConfig = field(default_factory=TradeoffConfig)
    """Over-refusal against refusal: over-refusal features, the refusal direction and the false-refusal vector."""
    validity: ValidityConfig = field(default_factory=ValidityConfig)
    """Greedy generation for behaviour labels and the validity report."""
    validity_report: bool = True
    """Write `<run_dir>/metric_validity.json` once per run: does the score predict the model's refusals?"""
    sae_quality: bool = True
    """Judge each SAE spliced into the model on the held-out prompts (`refusal_sae.sae_quality`): FVU, L0, dead and
    dense latents, cross-entropy and KL against the clean model and against mean ablation (loss recovered)."""
    sae_quality_prompts: int | None = None
    """How many held-out prompts the SAE quality stage splices on (evenly spaced over the held-out split, so every
    category is in); null: all of them. Each prompt costs a forward per SAE and a clean one."""
    saes: dict[str, PretrainedSAE] = field(default_factory=dict)
    """SAEs to analyse instead of the ones `fit` trained, per layer the run cached, e.g. `{residuals_16: {path:
    sae_dir}}` (SAELens, sparsify or this package's directories, or a safetensors file with its activation):
    `analyze` only; the SAE quality stage judges them like trained ones, before discovery, and refuses one whose
    fraction of loss recovered is below `loaded_sae_floor`."""
    loaded_sae_floor: float = 0.8
    """The least fraction of next-token loss a loaded SAE (`saes`) must recover, spliced in on the held-out prompts
    (the default run's trained SAEs: 0.94 to 0.99); below it the analysis stops with one line."""
    accept_weak_saes: bool = False
    """Analyse a loaded SAE below `loaded_sae_floor` anyway, with a warning."""

    def __post_init__(self) -> None:
        if self.sae_quality_prompts is not None:
            positive_int("analysis.sae_quality_prompts", self.sae_quality_prompts, 64)
        if not isinstance(self.loaded_sae_floor, (int, float)) or not 0 <= self.loaded_sae_floor <= 1:
            raise UserError(f"analysis.loaded_sae_floor: {self.loaded_sae_floor!r}; give a fraction of loss recovered "
                            "in [0, 1], e.g. 0.8")


def check_loaded_saes(quality: Sequence[LayerQuality], cfg: AnalysisConfig) -> None:
    """A loaded SAE (`cfg.saes`, or `fit`'s `model.pretrained`) that recovers less of the next-token loss than `cfg.loaded_sae_floor` stops the
    analysis (its circuits would explain the SAE's errors), unless `cfg.accept_weak_saes`."""
    for q in quality:
        if q.layer not in cfg.saes or q.loss_recovered >= cfg.loaded_sae_floor:  # NaN: refused
            continue
        what = (f"the loaded SAE of {q.layer} ({cfg.saes[q.layer].path}) recovers {q.loss_recovered:.3f} of the "
                f"next-token loss spliced in on the held-out prompts, below analysis.loaded_sae_floor "
                f"{cfg.loaded_sae_floor}")
        if not cfg.accept_weak_saes:
            raise UserError(f"{what}; use a better SAE for this model and layer, or --analysis.accept_weak_saes true")
        log.warning("%s; analysed anyway (accept_weak_saes)", what)


def spread(items: Sequence[T], n: int | None) -> list[T]:
    """`n` of `items` evenly spaced over them, in order (all of them when `n` is None or not smaller)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def run_analysis(inputs: AnalysisInputs, out: AnalysisLayout, cfg: AnalysisConfig,
                 stages: Sequence[str] = STAGES, source: AnalysisLayout | None = None) -> Summary:
    """Run `stages` in order into `out`; a stage whose input stage is not run reads it from `source` (default
    `out`). `cross` and `directions` run when enabled in `cfg` or when first in `stages` (`analyze --stage
    cross`). Returns the summary (reading what exists when the summary is run alone)."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UserError(f"analyze --stage: unknown stage(s) {unknown}; use {', '.join(STAGES)}")
    source = source or out
    if cfg.validity_report and "evaluate" in stages and not inputs.run.validity.is_file():
        report = validity_report(inputs.wrapper(), inputs.splits["evaluation"], cfg.metric, cfg.validity,
                                 inputs.run.behavior_answers)
        write_validity_report(report, inputs.run.validity)
    if "quality" in stages and (cfg.sae_quality or stages[0] == "quality" or cfg.saes):  # first: it judges loaded SAEs
        held_out = spread([s.prompt for s in inputs.splits.get("evaluation", [])], cfg.sae_quality_prompts)
        quality = sae_quality(inputs.wrapper(), inputs.saes, held_out, inputs.scheme("positional"),
                              cfg.evaluation.batch_size)
        out.write_sae_quality(quality)
        check_loaded_saes(quality, cfg)
    else:
        quality = source.read_sae_quality(LayerQuality)
    if "discover" in stages:
        discovery = run_discovery(inputs, out, cfg.discovery, cfg.evaluation.target, cfg.metric)
    else:
        discovery = load_discovery(source)
        if source.root != out.root:
            out.copy_discovery(source)
    similarity = run_similarity(discovery, out, cfg.similarity) if "similarity" in stages else {
        m: s for m in discovery.circuits if (s := source.method(m).read_similarity(Similarity)) is not None}
    if "evaluate" in stages:
        results = run_evaluation(inputs, discovery, out, cfg.evaluation, cfg.metric)
    else:
        results = {m: rs for m in discovery.circuits if (rs := load_evaluation(source, discovery, m))}
    if "cross" in stages and (cfg.cross_ablation.enabled or stages[0] == "cross"):
        run_cross_ablation(inputs, discovery, results, out, cfg.cross_ablation, cfg.evaluation.target, cfg.metric)
    if "directions" in stages and (cfg.directions.enabled or stages[0] == "directions"):
        directions, vectors = run_directions(inputs.wrapper(), inputs.cache, inputs.splits, inputs.scheme("positional"),
                                             cfg.directions, cfg.metric)
        out.directions.write(directions, vectors.arrays, vectors.metadata)
        plot_directions(directions, out.directions.png)
    else:
        directions = out.directions.read(DirectionsResult)
    if "ceiling" in stages and (cfg.ceiling.enabled or stages[0] == "ceiling"):
        ceilings, directions_ceiling = run_ceiling(inputs, discovery, directions, out, cfg.ceiling, results)
    else:
        ceilings = {m: c for m in discovery.circuits if (c := source.method(m).read_ceiling(Ceiling)) is not None}
        directions_ceiling = out.directions.read_ceiling(DirectionCeiling)
    if "edit" in stages and (cfg.editing.enabled or stages[0] == "edit"):
        edits = run_edits(inputs, discovery, results, out, source, cfg.editing, cfg.metric,
                          cfg.validity.refusal_phrases)
    else:
        edits = load_edits(source, discovery)
    if "tradeoff" in stages and (cfg.tradeoff.enabled or stages[0] == "tradeoff"):
        tradeoff = run_overrefusal(inputs, discovery, out, source, cfg)
    else:
        tradeoff = source.read_tradeoff(TradeoffResult)
        if tradeoff is not None and source.root != out.root:
            out.copy_tradeoff(source)
    summary = summarise(out, results, similarity, directions, edits, ceilings, directions_ceiling, quality, tradeoff)
    out.write_summary(summary, protocol_line(summary.protocol) + "\n\n" + summary_tables(results, directions, edits)
                      + ("\n**Over-refusal against refusal** (held-out prompts, pooled)\n\n" + tradeoff_table(tradeoff)
                         if tradeoff else "")
                      + ("\n**SAEs spliced into the model** (held-out prompts)\n\n" + quality_table(quality)
                         if quality else ""))
    if "report" in stages:
        for method, rs in results.items():  # the curves of an evaluation read from `source` are drawn here too
            if not out.method(method).curves_png.is_file():
                plot_curves({method: rs}, out.method(method).curves_png)
        report = build_report(out, inputs.run, inputs.saes, inputs.cache, inputs.splits, inputs.wrapper(),
                              discovery.circuits, discovery.record, similarity, summary, edits)
        out.write_report(report.page, report.card_scripts)
        log.info("report: %d node cards in %s", len(report.cards), out.report_html)
    if "export" in stages:
        export_circuits(inputs, discovery, out, source)
    return summary


def export_circuits(inputs: AnalysisInputs, discovery: Discovery, out: AnalysisLayout, source: AnalysisLayout) -> None:
    """Every circuit as a circuit-tracer graph (`refusal_sae.export`), its nodes labelled as the report labels them
    where a report of this analysis (or its source) has their cards."""
    reported = next((a for a in (out, source) if a.report_cards.is_dir() and any(a.report_cards.glob("*.js"))), None)
    cards, prompts = load_cards(reported) if reported is not None else ({}, {})
    labels = {name: node_label(card, prompts) for name, card in cards.items()}
    metric = discovery.record.metric
    target = f"refusal score F ({metric.get('compliance_mode')} score, {discovery.record.target} target)"
    model = inputs.cache.model_name or ""
    positions = PositionScheme(**discovery.record.scheme).node_classes
    for method, circuits in discovery.circuits.items():
        for circuit, _ in circuits:
            write_json(out.method(method).export_path(circuit.name),
                       circuit_tracer_graph(circuit, positions, model, target, labels))
    log.info("export: %d circuits as circuit-tracer graphs under %s", sum(map(len, discovery.circuits.values())),
             out.root)


def global_direction(*places: AnalysisLayout) -> GlobalDirection | None:
    """The refusal-directions stage's global direction at its chosen layer and position, from the first of
    `places` where that stage has run; None where it has run nowhere."""
    for place in places:
        record = place.directions.read(DirectionsResult)
        if record is None:
            continue
        meta = place.directions.read_vector_metadata()
        positions = meta["positions"].split(",")
        layer = record.selection.layer
        vector = place.directions.read_vectors()[f"{GLOBAL}.{layer}"][positions.index(record.selection.position)]
        return GlobalDirection(layer, vector)
    return None


def run_edits(inputs: AnalysisInputs, discovery: Discovery, results: Mapping[str, Sequence[CircuitEvaluation]],
              out: AnalysisLayout, source: AnalysisLayout, cfg: EditingConfig, metric: RefusalMetricConfig,
              phrases: Sequence[str]) -> dict[str, list[CategoryEdits]]:
    """Per method, every category circuit (group all) edited on its category's held-out prompts, judged by the
    answers (`refusal_sae.editing`); each record written as soon as it is done."""
    items = {m: [(c, s) for c, s in found if c.group == "all"] for m, found in discovery.circuits.items()}
    items = {m: found for m, found in items.items() if found}
    if not items:
        raise UserError("edit: the source analysis has no category circuits of group 'all'; run discovery with "
                        "discovery.groups including all")
    known = {c.category for found in items.values() for c, _ in found}
    unknown = sorted(set(cfg.categories or []) - known)
    if unknown:
        raise UserError(f"editing.categories: {unknown} have no circuit here; use some of {sorted(known)}")
    ablator = _ablator(inputs, discovery, metric, cfg.batch_size)
    direction = global_direction(out, source) if cfg.directions else None
    if cfg.directions and direction is None:
        log.info("edit: no refusal-directions stage in this analysis or its source; the direction edits are left out")
    evaluation, discovery_split = list(inputs.splits["evaluation"]), list(inputs.splits["discovery"])
    found: dict[str, list[CategoryEdits]] = {}
    for method, circuits in items.items():
        sizes = faithful_sizes(results.get(method, []))
        found[method] = []
        for circuit, scores in circuits:
            if cfg.categories and circuit.category not in cfg.categories:
                continue
            size = circuit_size(circuit.name, sizes, cfg.n_nodes, "editing")
            record = edit_category(ablator, circuit, scores, evaluation, discovery_split, size, direction, cfg,
                                   phrases)
            out.method(method).write_edits(record)
            found[method].append(record)
    return found


def run_overrefusal(inputs: AnalysisInputs, discovery: Discovery, out: AnalysisLayout, source: AnalysisLayout,
                    cfg: AnalysisConfig) -> TradeoffResult:
    """The over-refusal trade-off (`refusal_sae.overrefusal`) at the refusal-directions stage's site (of this
    analysis or its source; `tradeoff.layer` overrides), written with its tables and figure."""
    ablator = _ablator(inputs, discovery, cfg.metric, cfg.tradeoff.batch_size)
    site = next(((r.selection.layer, r.selection.position) for place in (out, source)
                 if (r := place.directions.read(DirectionsResult)) is not None), None)
    result = run_tradeoff(ablator, inputs.cache, inputs.splits, site, cfg.tradeoff,
                          cfg.validity.refusal_phrases)
    out.write_tradeoff(result, tradeoff_table(result) + "\nPer category (refused toxic · refused hard-but-safe "
                       "held-out prompts):\n\n" + category_table(result))
    plot_tradeoff(result, out.tradeoff_png)
    return result


def load_edits(out: AnalysisLayout, discovery: Discovery) -> dict[str, list[CategoryEdits]]:
    """The edit-stage records of the circuits that have one in `out`, per method (methods without any left out)."""
    found = {m: [r for c, _ in items if (r := out.method(m).read_edits(CategoryEdits, c.name)) is not None]
             for m, items in discovery.circuits.items()}
    return {m: records for m, records in found.items() if records}


def load_evaluation(out: AnalysisLayout, discovery: Discovery, method: str) -> list[CircuitEvaluation]:
    """The evaluation records of one method's circuits that exist in `out`."""
    layout = out.method(method)
    found = [layout.read_evaluation(CircuitEvaluation, c.name, version=RECORD_VERSION, upgrade=upgrade_record)
             for c, _ in discovery.circuits[method]]
    return [r for r in found if r is not None]


__all__ = [
    "STAGES",
    "AnalysisConfig",
    "AnalysisInputs",
    "Discovery",
    "candidate_keys",
    "format_summary",
    "load_discovery",
    "load_edits",
    "load_evaluation",
    "run_analysis",
    "run_cross_ablation",
    "run_discovery",
    "run_edits",
    "run_evaluation",
    "run_similarity",
    "spread",
    "summarise",
]
