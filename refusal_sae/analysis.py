"""The analysis stages after SAE training, each reading the previous one's files from one directory.

    discover(...)  -> <out>/circuits/<name>.{json,graphml}   one circuit per category (and group)
                      <out>/circuits/sweep/<name>.json        the circuits of the threshold sweep
                      <out>/means.safetensors                 per-feature / error means (ablation values)
                      <out>/similarity.{json,png}             monolithic or modular?
    evaluate(...)  -> <out>/evaluation.json, <out>/curves.png faithfulness / completeness per circuit
                      <out>/summary.json                      the short summary the CLI prints

The Lightning callbacks call these at the end of training epochs; they are plain functions of SAEs,
the activation cache, prompts and a model, so a notebook can run them on a finished run too.
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
from refusal_sae.circuits import Circuit, CircuitConfig, circuit_groups, discover, encode_prompts, sweep_circuits
from refusal_sae.data import PromptSample, Split
from refusal_sae.errors import UserError
from refusal_sae.io import atomic_open, write_json
from refusal_sae.metric import RefusalMetric, RefusalMetricConfig, ValidityConfig, behavior_labels
from refusal_sae.model import ModelWrapper
from refusal_sae.sae import SparseAutoencoder
from refusal_sae.similarity import SimilarityConfig, analyse_similarity, write_similarity

log = logging.getLogger(__name__)

CIRCUITS_DIR, SWEEP_DIR, MEANS_FILE, INDEX_FILE = "circuits", "sweep", "means.safetensors", "index.json"
EVALUATION_FILE, CURVES_FILE, SUMMARY_FILE = "evaluation.json", "curves.png", "summary.json"


def candidates_from_means(feature_means: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Latents that fired at least once on the discovery prompts: what random circuits are drawn from."""
    return {layer: np.flatnonzero(m > 0) for layer, m in feature_means.items()}


def discover_circuits(
    saes: Mapping[str, SparseAutoencoder],
    cache: ActivationCache,
    splits: Mapping[Split, Sequence[PromptSample]],
    cfg: CircuitConfig,
    similarity: SimilarityConfig,
    out_dir: str | Path,
    labeller: Callable[[Sequence[PromptSample]], np.ndarray] | None = None,
) -> list[Circuit]:
    """Encode the discovery split, find every circuit and its sweep, compare circuits; write it all.

    `labeller` gives behaviour labels (whether the model refused) when `cfg.label_source` is behavior.
    """
    out = Path(out_dir)
    if cfg.method == "attribution":
        raise UserError("circuits.method: attribution is not built into discovery yet; use correlation")
    pf = encode_prompts(saes, PromptActivations(cache, ["discovery"], list(saes)), cfg.aggregation)
    labels = pf.labels
    if cfg.label_source == "behavior":
        if labeller is None:
            raise UserError("circuits.label_source: behavior needs the model to label refusals; none was given")
        samples = splits["discovery"]
        labels = labeller([samples[i] for i in pf.prompt_index])
    circuits = []
    for category in tqdm(sorted(set(pf.categories)), desc="discovering circuits", unit="category", leave=False):
        for group in circuit_groups(cfg):
            circuit, scores = discover(pf, labels, category, group, cfg)
            circuit.save(out / CIRCUITS_DIR)
            sweep = sweep_circuits(scores, circuit, cfg)
            write_json(out / CIRCUITS_DIR / SWEEP_DIR / f"{circuit.name.replace('/', '__')}.json",
                       [c.to_dict() for c in sweep])
            circuits.append(circuit)
    with atomic_open(out / MEANS_FILE, "wb") as f:
        f.write(save({**{f"features.{k}": v for k, v in pf.feature_means.items()},
                      **{f"errors.{k}": v for k, v in pf.error_means.items()}}))
    main = [c for c in circuits if c.group == "all"]
    if len(main) >= 2:
        write_similarity(analyse_similarity(circuits, candidates_from_means(pf.feature_means), similarity), out)
    write_json(out / CIRCUITS_DIR / INDEX_FILE, {
        "config": asdict(cfg),
        "circuits": [{"name": c.name, "category": c.category, "group": c.group, "method": c.method,
                      "n_nodes": len(c.nodes), "n_edges": len(c.edges), "n_prompts": c.n_prompts} for c in circuits],
    })
    return circuits


def read_means(out_dir: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    path = Path(out_dir) / MEANS_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: run circuit discovery (CircuitDiscoveryCallback) before evaluation")
    tensors = load_file(path)
    split = {kind: {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(kind + ".")}
             for kind in ("features", "errors")}
    return split["features"], split["errors"]


def read_circuits(out_dir: str | Path) -> tuple[dict[str, Any], list[tuple[Circuit, list[Circuit]]]]:
    """The discovery config and every circuit with its sweep, in discovery order."""
    directory = Path(out_dir) / CIRCUITS_DIR
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        raise UserError(f"{index_path} not found: run circuit discovery (CircuitDiscoveryCallback) before evaluation")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    out = []
    for entry in index["circuits"]:
        stem = entry["name"].replace("/", "__")
        sweep_path = directory / SWEEP_DIR / f"{stem}.json"
        sweep = [Circuit.from_dict(d) for d in json.loads(sweep_path.read_text(encoding="utf-8"))]
        out.append((Circuit.load(directory / f"{stem}.json"), sweep))
    return index["config"], out


def evaluate_circuits(
    wrapper: ModelWrapper,
    saes: Mapping[str, SparseAutoencoder],
    splits: Mapping[Split, Sequence[PromptSample]],
    out_dir: str | Path,
    ablation: AblationConfig,
    metric: RefusalMetricConfig,
    labeller: Callable[[Sequence[PromptSample]], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Judge every circuit of `out_dir` on its category's held-out prompts; write results, curves, summary.

    A whole-category circuit is judged on the category's evaluation prompts, F = mean score of the
    positive ones (toxic, or refused with label_source behavior) - mean of the others; a toxic (safe)
    circuit on the category's toxic (safe) evaluation prompts, F = their mean score.
    """
    out = Path(out_dir)
    config, circuits = read_circuits(out)
    feature_means, error_means = read_means(out)
    missing = [layer for layer in feature_means if layer not in saes]
    if missing:
        raise UserError(f"circuits were found with SAEs for {missing}, which are missing now; train them again")
    ablator = Ablator(wrapper, {k: saes[k] for k in feature_means}, feature_means, error_means,
                      RefusalMetric.from_wrapper(wrapper, metric), ablation)
    candidates = candidates_from_means(feature_means)
    evaluation = splits["evaluation"]
    positive_all = np.array([s.refusal_label for s in evaluation], dtype=bool)
    if config["label_source"] == "behavior":
        if labeller is None:
            raise UserError("circuits.label_source: behavior needs the model to label refusals; none was given")
        positive_all = labeller(evaluation)
    results = []
    for circuit, sweep in tqdm(circuits, desc="evaluating circuits", unit="circuit"):
        if all(not c.nodes for c in sweep):
            points = [c.threshold if c.method == "correlation" else c.top_n for c in sweep]
            raise UserError(
                f"circuit {circuit.name!r}: every point of the sweep {points} selects no node; lower "
                "circuits.sweep (correlation) or raise circuits.sweep_top_n (magnitude)"
            )
        rows = [i for i, s in enumerate(evaluation) if s.category == circuit.category
                and (circuit.group == "all" or s.refusal_label == (circuit.group == "toxic"))]
        if not rows:
            raise UserError(f"the evaluation split has no {circuit.group} prompts of category "
                            f"{circuit.category!r}; raise data.prompts.eval_fraction")
        results.append(evaluate_sweep(ablator, [evaluation[i].prompt for i in rows], positive_all[rows],
                                      circuit, sweep, candidates))
        if "note" in results[-1]:
            log.warning("%s: %s", circuit.name, results[-1]["note"])
    report = {"ablation": asdict(ablation), "label_source": config["label_source"], "circuits": results}
    write_json(out / EVALUATION_FILE, report)
    plot_curves(results, out / CURVES_FILE)
    summary = summarise(out, results)
    write_json(out / SUMMARY_FILE, summary)
    return summary


def summarise(out_dir: Path, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Best sweep point per circuit and the similarity verdict, for the CLI's closing lines."""
    similarity_path = out_dir / "similarity.json"
    verdict = json.loads(similarity_path.read_text(encoding="utf-8"))["verdict"] if similarity_path.is_file() else {}
    return {
        "directory": str(out_dir),
        "circuits": {r["name"]: {"F_M": r["F_M"], "F_empty": r["F_empty"], "best": r["best"]} for r in results},
        "verdict": verdict.get("label"),
        "verdict_explanation": verdict.get("explanation"),
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """A few lines: best faithfulness / completeness per circuit and the verdict."""
    lines = [f"circuits in {summary['directory']} (best sweep point: faithfulness / completeness, nodes)"]
    for name, r in summary["circuits"].items():
        best = r["best"]
        point = "undefined (F(M) = F(empty))" if best is None else (
            f"{best['faithfulness']:.2f} / {best['completeness']:.2f}, {best['n_nodes']} nodes")
        lines.append(f"  {name:<28} {point}")
    if summary.get("verdict_explanation"):
        lines.append(summary["verdict_explanation"])
    return "\n".join(lines)


def plot_curves(results: Sequence[dict[str, Any]], path: str | Path) -> None:
    """One panel per circuit: faithfulness and completeness against node count, random circuits dashed."""
    from matplotlib.figure import Figure

    n = len(results)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = Figure(figsize=(4 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, r in zip(axes, results):
        x = [p["n_nodes"] for p in r["points"]]
        for key, colour in (("faithfulness", "tab:blue"), ("completeness", "tab:orange")):
            ax.plot(x, [_nan(p["circuit"][key]) for p in r["points"]], "o-", color=colour, label=key)
            ax.plot(x, [_nan(p["random"][key]) for p in r["points"]], "x--", color=colour, alpha=0.6,
                    label=f"random, {key}")
        ax.axhline(1, color="grey", lw=0.5)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_title(r["name"], fontsize=10)
        ax.set_xlabel("nodes")
    for ax in axes[n:]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def make_labeller(wrapper_factory: Callable[[], ModelWrapper], validity: ValidityConfig,
                  cache_path: str | Path) -> Callable[[Sequence[PromptSample]], np.ndarray]:
    """Behaviour labels from greedy generation, the model loaded only when first needed."""
    return lambda samples: behavior_labels(wrapper_factory(), samples, validity, cache_path)


__all__ = [
    "candidates_from_means", "discover_circuits", "evaluate_circuits", "format_summary", "make_labeller",
    "plot_curves", "read_circuits", "read_means", "summarise",
]
