"""The analysis stages after SAE training, each reading the previous one's files from one directory.

    discover_circuits(...) -> <out>/means.safetensors              per-feature / error means (ablation values)
                              <out>/discovery.json                 config, metric, methods
                              <out>/<method>/circuits/<name>.{json,graphml}, sweep/<name>.json, index.json
                              <out>/<method>/similarity.{json,png}  monolithic or modular?
    evaluate_circuits(...) -> <out>/<method>/evaluation.json, curves.png
                              <out>/comparison.{json,png}          methods side by side (two or more)
                              <out>/summary.json                   the short summary the CLI prints

`<method>` is `correlation` or `attribution`. The Lightning callbacks call these at the end of training
epochs; they are plain functions of SAEs, the activation cache, prompts and a model, so a notebook can
run them on a finished run too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save
from tqdm.auto import tqdm

from refusal_sae.ablation import AblationConfig, Ablator, evaluate_sweep
from refusal_sae.activations import ActivationCache, PromptActivations
from refusal_sae.attribution import attribution_scores, edge_scores
from refusal_sae.circuits import (
    Circuit,
    CircuitConfig,
    PromptFeatures,
    circuit_groups,
    discover,
    encode_prompts,
    select_nodes,
    sweep_circuits,
)
from refusal_sae.data import PromptSample, Split
from refusal_sae.errors import UserError
from refusal_sae.io import atomic_open, write_json
from refusal_sae.metric import RefusalMetric, RefusalMetricConfig
from refusal_sae.model import ModelWrapper
from refusal_sae.sae import SparseAutoencoder
from refusal_sae.similarity import SimilarityConfig, analyse_similarity, write_similarity
from refusal_sae.validity import ValidityConfig, behavior_labels

log = logging.getLogger(__name__)

MEANS_FILE, DISCOVERY_FILE, CIRCUITS_DIR, SWEEP_DIR, INDEX_FILE = (
    "means.safetensors", "discovery.json", "circuits", "sweep", "index.json")
EVALUATION_FILE, CURVES_FILE, COMPARISON_FILE, SUMMARY_FILE = (
    "evaluation.json", "curves.png", "comparison", "summary.json")
Labeller = Callable[[Sequence[PromptSample]], np.ndarray]


def candidates_from_means(feature_means: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Latents that fired at least once on the discovery prompts: what random circuits are drawn from."""
    return {layer: np.flatnonzero(m > 0) for layer, m in feature_means.items()}


def _labels(samples: Sequence[PromptSample], source: str, labeller: Labeller | None) -> np.ndarray:
    """Positive = toxic (label_source dataset) or refused by the model (behavior)."""
    if source == "dataset":
        return np.array([s.refusal_label for s in samples], dtype=bool)
    if labeller is None:
        raise UserError("circuits.label_source: behavior needs the model to label refusals; none was given")
    return labeller(samples)


def _rows(samples: Sequence[PromptSample], category: str, group: str) -> list[int]:
    """Indices of a circuit's prompts: the category's, toxic or safe only for a toxic / safe circuit."""
    return [i for i, s in enumerate(samples) if s.category == category
            and (group == "all" or s.refusal_label == (group == "toxic"))]


def discover_circuits(
    saes: Mapping[str, SparseAutoencoder],
    cache: ActivationCache,
    splits: Mapping[Split, Sequence[PromptSample]],
    cfg: CircuitConfig,
    similarity: SimilarityConfig,
    out_dir: str | Path,
    labeller: Labeller | None = None,
    wrapper: Callable[[], ModelWrapper] | None = None,
    metric: RefusalMetricConfig | None = None,
    batch_size: int = 8,
) -> dict[str, list[Circuit]]:
    """Find every circuit (per method, category and group) with its sweep, compare circuits; write it all.

    Correlation reads the activation cache only; attribution runs `wrapper()` with gradients on the
    discovery prompts, with the refusal `metric`. `labeller` gives behaviour labels (whether the model
    refused) when `cfg.label_source` is behavior.
    """
    out = Path(out_dir)
    pf = encode_prompts(saes, PromptActivations(cache, ["discovery"], list(saes)), cfg.aggregation)
    samples = [splits["discovery"][i] for i in pf.prompt_index]
    labels = _labels(samples, cfg.label_source, labeller)
    if "attribution" in cfg.methods and wrapper is None:
        raise UserError("circuits.methods: attribution needs the model; none was given")
    with atomic_open(out / MEANS_FILE, "wb") as f:
        f.write(save({**{f"features.{k}": v for k, v in pf.feature_means.items()},
                      **{f"errors.{k}": v for k, v in pf.error_means.items()}}))
    scorer = RefusalMetric.from_wrapper(wrapper(), metric) if "attribution" in cfg.methods else None
    found: dict[str, list[Circuit]] = {}
    for method in cfg.methods:
        directory = out / method
        circuits = []
        jobs = [(str(c), g) for c in sorted(set(pf.categories)) for g in circuit_groups(cfg)]
        for category, group in tqdm(jobs, desc=f"{method} circuits", unit="circuit", leave=False):
            if method == "correlation":
                circuit, scores = discover(pf, labels, category, group, cfg)
            else:
                circuit, scores = _attribution_circuit(pf, samples, labels, category, group, cfg, saes, wrapper(),
                                                       scorer, batch_size)
            circuit.save(directory / CIRCUITS_DIR)
            write_json(directory / CIRCUITS_DIR / SWEEP_DIR / f"{circuit.name.replace('/', '__')}.json",
                       [c.to_dict() for c in sweep_circuits(scores, circuit, cfg)])
            circuits.append(circuit)
        if sum(c.group == "all" for c in circuits) >= 2:
            write_similarity(analyse_similarity(circuits, candidates_from_means(pf.feature_means), similarity),
                             directory)
        write_json(directory / CIRCUITS_DIR / INDEX_FILE, {"circuits": [
            {"name": c.name, "category": c.category, "group": c.group, "method": c.method,
             "n_nodes": len(c.nodes), "n_edges": len(c.edges), "n_prompts": c.n_prompts} for c in circuits]})
        found[method] = circuits
    write_json(out / DISCOVERY_FILE, {"config": asdict(cfg), "methods": list(cfg.methods),
                                      "metric": asdict(metric) if metric is not None else None})
    return found


def _attribution_circuit(
    pf: PromptFeatures, samples: Sequence[PromptSample], labels: np.ndarray, category: str, group: str,
    cfg: CircuitConfig, saes: Mapping[str, SparseAutoencoder], wrapper: ModelWrapper, metric: RefusalMetric,
    batch_size: int,
) -> tuple[Circuit, Any]:
    """Nodes by attribution patching on the circuit's discovery prompts; edges by edge attribution among
    the `cfg.edge_nodes` most important nodes (`select_nodes` orders them)."""
    rows = _rows(samples, category, group)
    prompts, positive = [samples[i].prompt for i in rows], labels[rows]
    args = (wrapper, saes, pf.feature_means, pf.error_means, metric, prompts, positive, group)
    scores = attribution_scores(*args, method=cfg.attribution, steps=cfg.ig_steps, batch_size=batch_size,
                                include_errors=cfg.include_errors)
    nodes = select_nodes(scores, cfg)
    scored = edge_scores(*args, nodes[: cfg.edge_nodes], batch_size=batch_size) if cfg.edge_nodes else []
    edges = [e for e in scored if e.weight >= cfg.edge_threshold]
    return Circuit(category, group, "attribution", pf.layers, nodes, edges, len(rows), cfg.node_threshold), scores


def read_means(out_dir: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    path = Path(out_dir) / MEANS_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: run circuit discovery (CircuitDiscoveryCallback) before evaluation")
    tensors = load_file(path)
    split = {kind: {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(kind + ".")}
             for kind in ("features", "errors")}
    return split["features"], split["errors"]


def read_discovery(out_dir: str | Path) -> dict[str, Any]:
    """What discovery recorded: its config, the methods and the metric (`discovery.json`)."""
    path = Path(out_dir) / DISCOVERY_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: run circuit discovery (CircuitDiscoveryCallback) before evaluation")
    return json.loads(path.read_text(encoding="utf-8"))


def discovery_metric(out_dir: str | Path) -> RefusalMetricConfig:
    """The refusal metric discovery recorded (attribution differentiated it), or the default."""
    recorded = read_discovery(out_dir)["metric"]
    return RefusalMetricConfig(**recorded) if recorded else RefusalMetricConfig()


def read_circuits(out_dir: str | Path, method: str) -> list[tuple[Circuit, list[Circuit]]]:
    """Every circuit of one method with its sweep, in discovery order."""
    directory = Path(out_dir) / method / CIRCUITS_DIR
    index = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))
    out = []
    for entry in index["circuits"]:
        stem = entry["name"].replace("/", "__")
        sweep = [Circuit.from_dict(d) for d in json.loads((directory / SWEEP_DIR / f"{stem}.json").read_text())]
        out.append((Circuit.load(directory / f"{stem}.json"), sweep))
    return out


def evaluate_circuits(
    wrapper: ModelWrapper,
    saes: Mapping[str, SparseAutoencoder],
    splits: Mapping[Split, Sequence[PromptSample]],
    out_dir: str | Path,
    ablation: AblationConfig,
    metric: RefusalMetricConfig | None = None,
    labeller: Labeller | None = None,
) -> dict[str, Any]:
    """Judge every circuit of `out_dir` on its category's held-out prompts; write results, curves, summary.

    A whole-category circuit is judged on the category's evaluation prompts, F = mean score of the
    positive ones (toxic, or refused with label_source behavior) - mean of the others; a toxic (safe)
    circuit on the category's toxic (safe) evaluation prompts, F = their mean score. `metric`: None for
    the one discovery recorded (or the default).
    """
    out = Path(out_dir)
    discovery = read_discovery(out)
    feature_means, error_means = read_means(out)
    missing = [layer for layer in feature_means if layer not in saes]
    if missing:
        raise UserError(f"circuits were found with SAEs for {missing}, which are missing now; train them again")
    metric = metric or discovery_metric(out)
    ablator = Ablator(wrapper, {k: saes[k] for k in feature_means}, feature_means, error_means,
                      RefusalMetric.from_wrapper(wrapper, metric), ablation)
    candidates = candidates_from_means(feature_means)
    n_candidates = sum(sae.cfg.width + discovery["config"]["include_errors"] for sae in ablator.saes.values())
    evaluation = splits["evaluation"]
    positive = _labels(evaluation, discovery["config"]["label_source"], labeller)
    results: dict[str, list[dict[str, Any]]] = {}
    for method in discovery["methods"]:
        results[method] = []
        for circuit, sweep in tqdm(read_circuits(out, method), desc=f"evaluating {method} circuits", unit="circuit"):
            if all(not c.nodes for c in sweep):
                points = [c.threshold or c.top_n or c.max_nodes for c in sweep]
                raise UserError(
                    f"{method} circuit {circuit.name!r}: every point of the sweep {points} selects no node; "
                    "lower circuits.sweep (correlation) or raise circuits.sweep_top_n / sweep_nodes"
                )
            rows = _rows(evaluation, circuit.category, circuit.group)
            if not rows:
                raise UserError(f"the evaluation split has no {circuit.group} prompts of category "
                                f"{circuit.category!r}; raise data.prompts.eval_fraction")
            result = evaluate_sweep(ablator, [evaluation[i].prompt for i in rows], positive[rows], circuit, sweep,
                                    candidates)
            result.update(curve_areas(result["points"], n_candidates))
            if "note" in result:
                log.warning("%s %s: %s", method, circuit.name, result["note"])
            results[method].append(result)
        write_json(out / method / EVALUATION_FILE, {"ablation": asdict(ablation), "metric": asdict(metric),
                                                    "label_source": discovery["config"]["label_source"],
                                                    "n_candidates": n_candidates, "circuits": results[method]})
        plot_curves({method: results[method]}, out / method / CURVES_FILE)
    if len(results) > 1:
        write_comparison(results, out)
    summary = summarise(out, results)
    write_json(out / SUMMARY_FILE, summary)
    return summary


def curve_areas(points: Sequence[dict[str, Any]], n_candidates: int) -> dict[str, float | None]:
    """Threshold-free summaries of a faithfulness curve (MIB's circuit benchmark): CPR, the area under
    faithfulness against circuit size as a fraction of all candidate nodes, and CMD, the area between
    the curve and 1. The curve runs from the empty circuit (faithfulness 0 by definition) through the
    sweep points to the full model (faithfulness 1), trapezoids in between; higher CPR and lower CMD are
    better. None when faithfulness is undefined."""
    curve = [(p["n_nodes"] / n_candidates, p["circuit"]["faithfulness"]) for p in points]
    if any(f is None for _, f in curve):
        return {"cpr": None, "cmd": None}
    x, y = (np.array(v, dtype=float) for v in zip(*sorted([(0.0, 0.0), *curve, (1.0, 1.0)])))

    def area(v: np.ndarray) -> float:
        return float(((x[1:] - x[:-1]) * (v[1:] + v[:-1]) / 2).sum())

    return {"cpr": area(y), "cmd": area(np.abs(1 - y))}


def write_comparison(results: Mapping[str, Sequence[dict[str, Any]]], out: Path) -> None:
    """Every method's curves per circuit in one plot, and one table (JSON) of every point and area."""
    rows = [{"circuit": r["name"], "method": method, "n_nodes": p["n_nodes"],
             "faithfulness": p["circuit"]["faithfulness"], "completeness": p["circuit"]["completeness"],
             "random_faithfulness": p["random"]["faithfulness"], "random_completeness": p["random"]["completeness"],
             "cpr": r["cpr"], "cmd": r["cmd"]}
            for method, rs in results.items() for r in rs for p in r["points"]]
    write_json(out / f"{COMPARISON_FILE}.json", {"methods": list(results), "rows": rows})
    plot_curves(results, out / f"{COMPARISON_FILE}.png")


def summarise(out_dir: Path, results: Mapping[str, Sequence[dict[str, Any]]]) -> dict[str, Any]:
    """Best sweep point and curve areas per method and circuit, and each method's similarity verdict."""
    summary: dict[str, Any] = {"directory": str(out_dir), "methods": {}}
    for method, rs in results.items():
        similarity_path = out_dir / method / "similarity.json"
        verdict = json.loads(similarity_path.read_text(encoding="utf-8"))["verdict"] if similarity_path.is_file() else {}
        summary["methods"][method] = {
            "circuits": {r["name"]: {"F_M": r["F_M"], "F_empty": r["F_empty"], "best": r["best"], "cpr": r["cpr"],
                                     "cmd": r["cmd"]} for r in rs},
            "verdict": verdict.get("label"),
            "verdict_explanation": verdict.get("explanation"),
        }
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """A few lines per method: best faithfulness / completeness per circuit, CPR, and the verdict."""
    lines = [f"circuits in {summary['directory']}"]
    for method, m in summary["methods"].items():
        lines.append(f"{method} (best sweep point: faithfulness / completeness, nodes; CPR)")
        for name, r in m["circuits"].items():
            best = r["best"]
            point = "undefined (F(M) = F(empty))" if best is None else (
                f"{best['faithfulness']:.2f} / {best['completeness']:.2f}, {best['n_nodes']} nodes; "
                f"CPR {r['cpr']:.3f}")
            lines.append(f"  {name:<28} {point}")
        if m.get("verdict_explanation"):
            lines.append(f"  {m['verdict_explanation']}")
    return "\n".join(lines)


def plot_curves(results: Mapping[str, Sequence[dict[str, Any]]], path: str | Path) -> None:
    """One panel per circuit: faithfulness (solid) and completeness (dashed) against node count for each
    method, random circuits of the same sizes in grey."""
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(r["name"] for rs in results.values() for r in rs))
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(4 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colours = {"correlation": "tab:blue", "attribution": "tab:red", "magnitude": "tab:green"}
    for ax, name in zip(axes, names):
        for method, rs in results.items():
            r = next((r for r in rs if r["name"] == name), None)
            if r is None:
                continue
            x = [p["n_nodes"] for p in r["points"]]
            colour = colours.get(r["method"], "tab:purple")
            for key, style in (("faithfulness", "o-"), ("completeness", "s--")):
                ax.plot(x, [_nan(p["circuit"][key]) for p in r["points"]], style, color=colour,
                        label=f"{method} {key}")
                ax.plot(x, [_nan(p["random"][key]) for p in r["points"]], style, color="grey", alpha=0.5,
                        label=f"random ({method}) {key}")
        ax.axhline(1, color="grey", lw=0.5)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("nodes")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=6)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def make_labeller(wrapper_factory: Callable[[], ModelWrapper], validity: ValidityConfig,
                  cache_path: str | Path) -> Labeller:
    """Behaviour labels from greedy generation, the model loaded only when first needed."""
    return lambda samples: behavior_labels(wrapper_factory(), samples, validity, cache_path)


__all__ = [
    "candidates_from_means", "curve_areas", "discover_circuits", "discovery_metric", "evaluate_circuits",
    "format_summary", "make_labeller", "plot_curves", "read_circuits", "read_discovery", "read_means", "summarise",
]
