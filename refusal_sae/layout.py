"""The run directory: every path under `run_dir`, and every read and write of the run's records.

    <run_dir>/
      data/prompts.csv, *_report.*, behavior_answers.json      prompts (balanced, split), their reports
      activations/                                            the activation cache (refusal_sae.activations)
      checkpoints/, saes/<layer>/, saes_by_rank/              SAE training
      metric_validity.json                                    does the refusal score predict refusals?
      .lock                                                   held by the fit using the run (refusal_sae.io)
      analysis/<name>/                                        one circuit analysis (`epoch_008`, or a name
                                                              given to `analyze`); `latest` links the newest
        protocol.json                                         the protocol's stamp (refusal_sae.protocol), if any;
                                                              every JSON record below carries it as "protocol"
        invocation.json, complete                             what `analyze` was asked to do (`--resume` reads it),
                                                              and the marker it writes when it has done it
        means.safetensors                                     ablation means per node (features.NodeMeans)
        discovery.json                                        config, position scheme, circuits per method
        <method>/circuits/<circuit>.json, .graphml            the circuit at the method's threshold
        <method>/scores/<circuit>.safetensors                 every node's score: the evaluation's ranking
        <method>/similarity.json, .png                        monolithic or modular?
        <method>/ceiling.json, .png                           the split-half noise ceiling and its verdict
        attribution/attribution_check.json                    both estimates against exact ablation effects
        <method>/evaluation/<circuit>.json                    curves, intervals, sanity (evaluation.CircuitEvaluation)
        <method>/evaluation/<circuit>.scores.safetensors      per-prompt scores of every ablated variant
        <method>/curves.png                                   faithfulness / completeness curves
        <method>/cross_ablation.json, .png                    each category's circuit ablated on every category's
                                                              held-out prompts (refusal_sae.cross_ablation)
        comparison.png                                        methods side by side
        directions/directions.json, .safetensors, .png        refusal directions per category, their
                                                              cross-category ablation, verdict (refusal_sae.directions)
        directions/ceiling.json                               their split-half ceiling (refusal_sae.ceiling)
        tradeoff/tradeoff.json, .png, .md                     over-refusal against refusal under three edits swept,
                                                              every answer (refusal_sae.overrefusal)
        report/index.html, cards/<n>.js                       what each node is: circuit graphs, figures in one page,
                                                              node cards one script per circuit (refusal_sae.report)
        sae_quality.json                                      each SAE spliced in on held-out prompts (sae_quality)
        summary.json, summary.md                              the short summary; the results table

Records are dataclasses written as key-sorted JSON and read back typed (`refusal_sae.io`); a circuit name `category/group` is stored as `category__group`. Nothing else in the package spells these
names (a test checks).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from refusal_sae.circuits import Circuit, NodeScores
from refusal_sae.errors import UserError
from refusal_sae.features import NodeMeans
from refusal_sae.io import atomic_open, from_json, read_json, to_json, write_json
from refusal_sae.sae_quality import LayerQuality
from refusal_sae.stats import Interval

T = TypeVar("T")
MAX_NAME = 100
"""Characters an analysis name may have (file systems take 255 bytes per name)."""


def _stem(name: str) -> str:
    return name.replace("/", "__")


def _write_record(path: Path, record: Any, protocol: dict[str, Any] | None) -> None:
    """`record` as JSON with the protocol stamp it was made under (`refusal_sae.protocol`; null: none)."""
    write_json(path, {**to_json(record), "protocol": protocol})


# --------------------------------------------------------------------------------------------------
# records


@dataclasses.dataclass
class CircuitEntry:
    name: str
    category: str
    group: str
    n_nodes: int
    n_edges: int
    n_prompts: int
    positions: dict[str, int]


@dataclasses.dataclass
class DiscoveryRecord:
    """What discovery did: its config, F, the position scheme, and every circuit per method."""

    config: dict[str, Any]
    target: str
    metric: dict[str, Any]
    scheme: dict[str, Any]
    circuits: dict[str, list[CircuitEntry]]

    @property
    def methods(self) -> list[str]:
        return list(self.circuits)


@dataclasses.dataclass
class CircuitSummary:
    """One circuit's evaluation in a line: its first all-layer curve."""

    F_M: Interval
    span: Interval
    """F(M) - F(∅): what there is to explain."""
    error_mode: str
    n_candidates: int
    reaches: dict[str, int | None]
    """Smallest size whose faithfulness reaches 0.5 / 0.8 (None: not reached)."""
    cpr: Interval | None
    cmd: Interval | None
    note: str | None
    """Why ratios or areas are null, when they are."""
    sanity_passed: bool | None
    """False: a check failed; True: one passed and none failed; None: no check applied."""


@dataclasses.dataclass
class MethodSummary:
    circuits: dict[str, CircuitSummary]
    verdict: str | None
    """The similarity stage's label (None: not run)."""
    verdict_explanation: str | None
    ceiling_verdict: str | None = None
    """The split-half ceiling's verdict (`refusal_sae.ceiling`; None: not run)."""
    ceiling_explanation: str | None = None


@dataclasses.dataclass
class DirectionsSummary:
    """The refusal directions' verdict (`refusal_sae.directions`)."""

    layer: str
    position: str
    verdict: str
    mean_share: float | None
    p_value: float | None
    global_share: float | None
    verdict_explanation: str
    ceiling_verdict: str | None = None
    """The directions' split-half ceiling verdict (`refusal_sae.ceiling.direction_ceiling`; None: not measured)."""
    ceiling_explanation: str | None = None
    orthogonal: str | None = None
    """What the categories' own parts (direction minus global) do to their own and the others' refusal."""


@dataclasses.dataclass
class AnswersSummary:
    """What one edit did to a category's greedy answers (`refusal_sae.editing`)."""

    edit: str
    toxic_refused: int
    toxic_n: int
    hard_refused: int
    hard_n: int
    coherence_change: Interval | None


@dataclasses.dataclass
class TradeoffSummary:
    """One point of the over-refusal trade-off, pooled over the judged categories (`refusal_sae.overrefusal`)."""

    method: str
    setting: str
    toxic_refused: int
    toxic_n: int
    hard_refused: int
    hard_n: int
    coherence_change: Interval | None
    chosen: bool


@dataclasses.dataclass
class Summary:
    """What the CLI prints and the callback logs: per method and circuit the evaluation's main numbers, the
    similarity verdict, the refusal directions' verdict, and what the edits did to the answers."""

    directory: str
    methods: dict[str, MethodSummary]
    directions: DirectionsSummary | None = None
    answers: dict[str, dict[str, list[AnswersSummary]]] = dataclasses.field(default_factory=dict)
    """{method: {circuit (a category's): each edit's refusals}} where the edit stage ran."""
    protocol: dict[str, Any] | None = None
    """The stamp of the protocol the analysis ran under (`refusal_sae.protocol`); None: exploratory."""
    sae_quality: list[LayerQuality] | None = None
    """Each SAE spliced into the model on held-out prompts (`refusal_sae.sae_quality`; None: the stage did not run)."""
    tradeoff: list[TradeoffSummary] | None = None
    """Each point of the over-refusal trade-off (`refusal_sae.overrefusal`; None: the stage did not run)."""


# --------------------------------------------------------------------------------------------------
# layouts


class MethodLayout:
    """One discovery method's files in an analysis directory."""

    def __init__(self, root: Path, protocol: dict[str, Any] | None = None) -> None:
        self.root = root
        self.protocol = protocol

    def circuit_paths(self, name: str) -> tuple[Path, Path]:
        stem = _stem(name)
        return self.root / "circuits" / f"{stem}.json", self.root / "circuits" / f"{stem}.graphml"

    def export_path(self, name: str) -> Path:
        """The circuit as a circuit-tracer graph (`refusal_sae.export`)."""
        return self.root / "export" / f"{_stem(name)}.circuit-tracer.json"

    def write_circuit(self, circuit: Circuit, scores: NodeScores) -> None:
        circuit.save(*self.circuit_paths(circuit.name))
        meta = {"method": scores.method, "layers": ",".join(scores.layers), "positions": ",".join(scores.positions),
                "n_prompts": str(scores.n_prompts)}
        with atomic_open(self.root / "scores" / f"{_stem(circuit.name)}.safetensors", "wb") as f:
            f.write(save(scores.arrays(), metadata=meta))

    def read_circuit(self, name: str) -> tuple[Circuit, NodeScores]:
        path, _ = self.circuit_paths(name)
        circuit = Circuit.load(path)
        scores_path = self.root / "scores" / f"{_stem(name)}.safetensors"
        try:
            with safe_open(scores_path, framework="numpy") as f:
                meta, keys = f.metadata() or {}, set(f.keys())
                layers = meta["layers"].split(",")

                def part(kind: str) -> dict[str, np.ndarray] | None:
                    got = {k: f.get_tensor(f"{kind}.{k}") for k in layers if f"{kind}.{k}" in keys}
                    return got or None

                scores = NodeScores(meta["method"], layers, meta["positions"].split(","), part("importance"),
                                    part("signed"), part("p_value"), int(meta["n_prompts"]))
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"{scores_path}: node scores missing or unreadable ({e}); run discovery again") from e
        return circuit, scores

    @property
    def similarity_json(self) -> Path:
        return self.root / "similarity.json"

    @property
    def similarity_png(self) -> Path:
        return self.root / "similarity.png"

    def write_similarity(self, result: Any) -> None:
        _write_record(self.similarity_json, result, self.protocol)

    def read_similarity(self, cls: type[T]) -> T | None:
        """The similarity record as `cls` (`similarity.Similarity`); None when the stage did not run."""
        if not self.similarity_json.is_file():
            return None
        return from_json(cls, read_json(self.similarity_json, "similarity", "run analyze --stage similarity again"))

    @property
    def attribution_check_json(self) -> Path:
        return self.root / "attribution_check.json"

    def write_attribution_check(self, checks: Any) -> None:
        _write_record(self.attribution_check_json, {"checks": checks}, self.protocol)

    @property
    def ceiling_json(self) -> Path:
        return self.root / "ceiling.json"

    @property
    def ceiling_png(self) -> Path:
        return self.root / "ceiling.png"

    def write_ceiling(self, result: Any) -> None:
        _write_record(self.ceiling_json, result, self.protocol)

    def read_ceiling(self, cls: type[T]) -> T | None:
        """The split-half ceiling as `cls` (`ceiling.Ceiling`); None when the stage did not run."""
        if not self.ceiling_json.is_file():
            return None
        return from_json(cls, read_json(self.ceiling_json, "split-half ceiling", "run analyze --stage ceiling again"))

    def evaluation_paths(self, name: str) -> tuple[Path, Path]:
        stem = _stem(name)
        return self.root / "evaluation" / f"{stem}.json", self.root / "evaluation" / f"{stem}.scores.safetensors"

    def write_evaluation(self, record: Any, key: dict[str, Any], scores: Mapping[str, np.ndarray]) -> None:
        """One circuit's evaluation: the per-prompt scores first, then the record that says it is complete."""
        record_path, scores_path = self.evaluation_paths(record.name)
        names = list(scores)
        with atomic_open(scores_path, "wb") as f:
            f.write(save({"scores": np.stack([scores[n] for n in names]).astype(np.float64)},
                         metadata={"variants": json.dumps(names)}))
        _write_record(record_path, {"key": key, "record": record}, self.protocol)

    def read_evaluation(self, cls: type[T], name: str, key: dict[str, Any] | None = None,
                        version: int | None = None,
                        upgrade: Callable[[dict[str, Any], int], dict[str, Any] | None] | None = None) -> T | None:
        """The circuit's evaluation record; None if absent or (given `key`) made with other settings. Given only
        `version` (a later stage reading an earlier analysis), a record written under another version is
        `upgrade`d to this one where that can be done from what it holds, else an error: its fields mean something
        else now."""
        path, _ = self.evaluation_paths(name)
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        if key is not None and data.get("key") != to_json(key):
            return None
        found = (data.get("key") or {}).get("record")
        if key is None and version is not None and found != version:
            upgraded = upgrade(data["record"], found or 1) if upgrade is not None else None
            if upgraded is not None:
                return from_json(cls, upgraded)
            raise UserError(f"{path}: an evaluation record of version {found or 1}, this code reads version {version}; "
                            f"evaluate these circuits again: analyze --stage evaluate --source {self.root.parent.name} "
                            "--name <new analysis>")
        return from_json(cls, data["record"])

    def read_variant_scores(self, name: str) -> dict[str, np.ndarray]:
        _, path = self.evaluation_paths(name)
        with safe_open(path, framework="numpy") as f:
            names = json.loads((f.metadata() or {})["variants"])
            matrix = f.get_tensor("scores")
        return dict(zip(names, matrix))

    @property
    def curves_png(self) -> Path:
        return self.root / "curves.png"

    @property
    def cross_ablation_json(self) -> Path:
        return self.root / "cross_ablation.json"

    @property
    def cross_ablation_png(self) -> Path:
        return self.root / "cross_ablation.png"

    def write_cross_ablation(self, record: Any) -> None:
        _write_record(self.cross_ablation_json, record, self.protocol)

    def edits_json(self, name: str) -> Path:
        """One circuit's edit-stage record: refusal rates, coherence and every answer under each edit."""
        return self.root / "editing" / f"{_stem(name)}.json"

    def write_edits(self, record: Any) -> None:
        _write_record(self.edits_json(record.circuit), record, self.protocol)

    def read_edits(self, cls: type[T], name: str) -> T | None:
        path = self.edits_json(name)
        if not path.is_file():
            return None
        return from_json(cls, read_json(path, "edit-stage record", "run analyze --stage edit again"))


class DirectionsLayout:
    """The refusal-direction stage's files (`refusal_sae.directions`) in an analysis directory."""

    def __init__(self, root: Path, protocol: dict[str, Any] | None = None) -> None:
        self.root = root
        self.protocol = protocol

    @property
    def record_json(self) -> Path:
        return self.root / "directions.json"

    @property
    def vectors(self) -> Path:
        """Every difference-of-means direction: per name (global, categories) and layer, (positions, d_model)."""
        return self.root / "directions.safetensors"

    @property
    def png(self) -> Path:
        return self.root / "directions.png"

    def write(self, record: Any, vectors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
        """The vectors first, then the record that says the stage is complete."""
        with atomic_open(self.vectors, "wb") as f:
            f.write(save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in vectors.items()},
                         metadata=dict(metadata)))
        _write_record(self.record_json, record, self.protocol)

    def read(self, cls: type[T]) -> T | None:
        """The stage's record; None when the stage has not run here."""
        if not self.record_json.is_file():
            return None
        return from_json(cls, read_json(self.record_json, "directions", "run analyze --stage directions again"))

    @property
    def ceiling_json(self) -> Path:
        return self.root / "ceiling.json"

    def write_ceiling(self, result: Any) -> None:
        _write_record(self.ceiling_json, result, self.protocol)

    def read_ceiling(self, cls: type[T]) -> T | None:
        """The directions' split-half ceiling (`ceiling.DirectionCeiling`); None when it was not measured here."""
        if not self.ceiling_json.is_file():
            return None
        return from_json(cls, read_json(self.ceiling_json, "directions ceiling", "run analyze --stage ceiling again"))

    def read_vectors(self) -> dict[str, np.ndarray]:
        with safe_open(self.vectors, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def read_vector_metadata(self) -> dict[str, str]:
        """The candidate layers and positions, and the chosen layer and position, of `read_vectors`."""
        with safe_open(self.vectors, framework="numpy") as f:
            return dict(f.metadata() or {})


class AnalysisLayout:
    """One circuit analysis: `<run_dir>/analysis/<name>/`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def protocol_json(self) -> Path:
        return self.root / "protocol.json"

    @property
    def protocol(self) -> dict[str, Any] | None:
        """The stamp of the protocol this analysis runs under (`refusal_sae.protocol`); None: exploratory."""
        return json.loads(self.protocol_json.read_text(encoding="utf-8")) if self.protocol_json.is_file() else None

    def write_protocol(self, stamp: Any) -> None:
        """Stamp a new analysis with its protocol before any stage writes a record."""
        write_json(self.protocol_json, to_json(stamp))

    @property
    def invocation_json(self) -> Path:
        return self.root / "invocation.json"

    def write_invocation(self, stages: list[str], source: str, analysis: Any, allow_changed: Sequence[str] = ()
                         ) -> None:
        """What `analyze` was asked to do (stages, source analysis, every option, the changed inputs it was allowed
        to analyse), before any stage runs: all `--resume` needs to finish it."""
        write_json(self.invocation_json, {"stages": stages, "source": source, "analysis": to_json(analysis),
                                          "allow_changed": list(allow_changed)})

    def read_invocation(self) -> dict[str, Any]:
        return read_json(self.invocation_json, "record of what analyze was asked to do",
                         "it was not started by `analyze` (or by a version before --resume); delete it, or give "
                         "another --name")

    @property
    def complete(self) -> bool:
        """`analyze` finished this analysis (its marker exists)."""
        return (self.root / "complete").is_file()

    def mark_complete(self) -> None:
        with atomic_open(self.root / "complete", "w", encoding="utf-8") as f:
            f.write("")

    def method(self, method: str) -> MethodLayout:
        return MethodLayout(self.root / method, self.protocol)

    @property
    def means_path(self) -> Path:
        return self.root / "means.safetensors"

    def write_means(self, means: NodeMeans) -> None:
        means.write(self.means_path)

    def read_means(self) -> NodeMeans:
        if not self.means_path.is_file():
            raise UserError(f"{self.means_path} not found: run the discover stage before evaluating")
        return NodeMeans.read(self.means_path)

    @property
    def tradeoff_json(self) -> Path:
        return self.root / "tradeoff" / "tradeoff.json"

    @property
    def tradeoff_png(self) -> Path:
        return self.root / "tradeoff" / "tradeoff.png"

    def write_tradeoff(self, record: Any, table: str) -> None:
        """The trade-off record and its tables (`tradeoff.md`); the record last, so its presence means done."""
        self.tradeoff_json.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.tradeoff_json.with_suffix(".md"), "w", encoding="utf-8") as f:
            f.write(table)
        _write_record(self.tradeoff_json, record, self.protocol)

    def copy_tradeoff(self, source: AnalysisLayout) -> None:
        """The trade-off's files of `source`, for a summary or report made here from it."""
        shutil.copytree(source.tradeoff_json.parent, self.tradeoff_json.parent, dirs_exist_ok=True)

    def read_tradeoff(self, cls: type[T]) -> T | None:
        """The trade-off record (`overrefusal.TradeoffResult`); None when the stage did not run here."""
        if not self.tradeoff_json.is_file():
            return None
        return from_json(cls, read_json(self.tradeoff_json, "over-refusal trade-off", "run analyze --stage tradeoff again"))

    @property
    def sae_quality_json(self) -> Path:
        return self.root / "sae_quality.json"

    def write_sae_quality(self, rows: Any) -> None:
        _write_record(self.sae_quality_json, {"layers": rows}, self.protocol)

    def read_sae_quality(self, cls: type[T]) -> list[T] | None:
        """The SAE quality rows as `cls` (`sae_quality.LayerQuality`); None when the stage did not run here."""
        if not self.sae_quality_json.is_file():
            return None
        data = read_json(self.sae_quality_json, "SAE quality", "run analyze --stage quality again")
        return [from_json(cls, row) for row in data["layers"]]

    @property
    def discovery_json(self) -> Path:
        """Written last by the discover stage: its presence means discovery finished here."""
        return self.root / "discovery.json"

    def write_discovery(self, record: DiscoveryRecord) -> None:
        _write_record(self.discovery_json, record, self.protocol)

    def read_discovery(self) -> DiscoveryRecord:
        return from_json(DiscoveryRecord, read_json(self.root / "discovery.json", "circuits",
                                                     "run the discover stage first"))

    def copy_discovery(self, source: AnalysisLayout) -> None:
        """Take another analysis's discovery (means, record, circuits, scores, similarity) and refusal directions
        as this one's."""
        if self.root.exists() and any(p not in (self.protocol_json, self.invocation_json) for p in self.root.iterdir()):
            raise UserError(f"{self.root} exists already; give analyze another --name (analyses are never overwritten)")
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source.means_path, self.means_path)
        shutil.copy2(source.root / "discovery.json", self.root / "discovery.json")
        for method in source.read_discovery().methods:
            for part in ("circuits", "scores"):
                shutil.copytree(source.method(method).root / part, self.method(method).root / part)
            for path in (source.method(method).similarity_json, source.method(method).similarity_png,
                         source.method(method).ceiling_json, source.method(method).ceiling_png):
                if path.is_file():
                    shutil.copy2(path, self.method(method).root / path.name)
        if source.directions.root.is_dir():
            shutil.copytree(source.directions.root, self.directions.root)

    @property
    def comparison_png(self) -> Path:
        return self.root / "comparison.png"

    @property
    def directions(self) -> DirectionsLayout:
        return DirectionsLayout(self.root / "directions", self.protocol)

    @property
    def summary_md(self) -> Path:
        """The results table (markdown)."""
        return self.root / "summary.md"

    def write_summary(self, summary: Summary, table: str) -> None:
        """`summary.json`, and `summary.md`: the results table."""
        _write_record(self.root / "summary.json", summary, self.protocol)
        with atomic_open(self.summary_md, "w", encoding="utf-8") as f:
            f.write(table)

    @property
    def report_html(self) -> Path:
        """The analysis as one self-contained page (`refusal_sae.report`)."""
        return self.root / "report" / "index.html"

    @property
    def report_cards(self) -> Path:
        """The node cards of the report, one script per circuit (`cards/<n>.js`), which the page loads when the
        circuit is opened: the page itself stays light (`refusal_sae.report`)."""
        return self.root / "report" / "cards"

    def write_report(self, page: str, card_files: Mapping[str, str]) -> None:
        """The card scripts first ({file name: text}; any earlier ones removed), then the page that loads them."""
        self.report_cards.mkdir(parents=True, exist_ok=True)
        for old in self.report_cards.glob("*.js"):
            if old.name not in card_files:
                old.unlink()
        for name, text in card_files.items():
            with atomic_open(self.report_cards / name, "w", encoding="utf-8") as f:
                f.write(text)
        with atomic_open(self.report_html, "w", encoding="utf-8") as f:
            f.write(page)

    def read_summary(self) -> Summary | None:
        path = self.root / "summary.json"
        return from_json(Summary, json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


class RunLayout:
    """Every path of a run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def prompts_csv(self) -> Path:
        return self.data_dir / "prompts.csv"

    @property
    def behavior_answers(self) -> Path:
        return self.data_dir / "behavior_answers.json"

    @property
    def data_report(self) -> Path:
        """Stem of `data_report.{json,png}`: every prompt loaded, before balancing."""
        return self.data_dir / "data_report"

    @property
    def balanced_report(self) -> Path:
        """Stem of `balanced_report.{json,png}`: the prompts after balancing."""
        return self.data_dir / "balanced_report"

    @property
    def activations(self) -> Path:
        return self.root / "activations"

    @property
    def saes(self) -> Path:
        return self.root / "saes"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def rank_state(self, rank: int) -> Path:
        """One DDP rank's SAE state (`model.save_all_ranks`), to check that the replicas agree."""
        return self.root / "saes_by_rank" / f"rank{rank}.safetensors"

    @property
    def validity(self) -> Path:
        return self.root / "metric_validity.json"

    @property
    def config(self) -> Path:
        """The resolved config LightningCLI saves at the start of `fit`."""
        return self.root / "config.yaml"

    @property
    def analysis_root(self) -> Path:
        return self.root / "analysis"

    def analysis(self, name: str) -> AnalysisLayout:
        if not name or "/" in name or name in (".", "..", LATEST) or len(name) > MAX_NAME:
            raise UserError(f"analysis name {name[:60]!r}{'...' if len(name) > 60 else ''}: give a plain directory "
                            f"name of at most {MAX_NAME} characters, e.g. orbench_toxic")
        return AnalysisLayout(self.analysis_root / name)

    def source(self, name: str) -> AnalysisLayout:
        """The analysis `--source name` names: `latest` is the link to the newest, any other name a folder."""
        return self.latest if name == LATEST else self.analysis(name)

    def epoch(self, epoch: int) -> AnalysisLayout:
        """The analysis of training epoch `epoch` (1-based)."""
        return self.analysis(f"epoch_{epoch:03d}")

    @property
    def latest(self) -> AnalysisLayout:
        return AnalysisLayout(self.analysis_root / LATEST)

    def point_latest(self, analysis: AnalysisLayout) -> None:
        """Atomically re-point `analysis/latest` at `analysis`."""
        link = self.analysis_root / LATEST
        tmp = self.analysis_root / f".{LATEST}.tmp"
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(analysis.root.name, tmp)
        os.replace(tmp, link)


LATEST = "latest"

__all__ = ["AnalysisLayout", "CircuitEntry", "CircuitSummary", "DirectionsLayout", "DirectionsSummary",
           "DiscoveryRecord", "MethodLayout", "MethodSummary", "RunLayout", "Summary", "TradeoffSummary"]
