"""Epoch-end circuit discovery and ablation evaluation, as observers of SAE training.

Every `every_n_epochs` training epochs (and after the last one) rank 0 takes a copy of the current SAEs,
runs a stage of `refusal_sae.analysis` into `<run_dir>/analysis/epoch_<NNN>/` and reports to the
Lightning logger; the other ranks wait at a barrier. `<run_dir>/analysis/latest` links to the newest
complete epoch directory. Nothing here changes training: the SAEs are copied, never touched.

Put `CircuitDiscoveryCallback` before `AblationEvaluationCallback` in `trainer.callbacks`, with the same
`every_n_epochs`: evaluation reads the circuits that discovery wrote.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from refusal_sae.ablation import AblationConfig
from refusal_sae.analysis import (
    COMPARISON_FILE,
    CURVES_FILE,
    EVALUATION_FILE,
    discover_circuits,
    discovery_metric,
    evaluate_circuits,
    format_summary,
    make_labeller,
    read_discovery,
)
from refusal_sae.circuits import CircuitConfig
from refusal_sae.errors import UserError
from refusal_sae.metric import RefusalMetricConfig
from refusal_sae.validity import ValidityConfig, validity_report, write_validity_report
from refusal_sae.similarity import SimilarityConfig

log = logging.getLogger("refusal_sae")

ANALYSIS_DIR, LATEST = "analysis", "latest"
VALIDITY_FILE, BEHAVIOR_FILE = "metric_validity.json", "behavior_answers.json"


def epoch_dir(trainer: L.Trainer) -> Path:
    return Path(_datamodule(trainer).run_dir) / ANALYSIS_DIR / f"epoch_{trainer.current_epoch + 1:03d}"


def point_latest(directory: Path) -> None:
    """Atomically re-point `<analysis>/latest` at `directory`."""
    link = directory.parent / LATEST
    tmp = directory.parent / f".{LATEST}.tmp"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(directory.name, tmp)
    os.replace(tmp, link)


def _datamodule(trainer: L.Trainer) -> Any:
    dm = trainer.datamodule
    if dm is None or not hasattr(dm, "cache") or not hasattr(dm, "llm"):
        raise UserError("circuit callbacks need the ActivationDataModule (prompts, cache and model); use `fit` with it")
    return dm


def _saes(pl_module: L.LightningModule) -> dict[str, Any]:
    """fp32 CPU copies of the module's SAEs in eval mode (training state untouched)."""
    return {layer: copy.deepcopy(sae).float().cpu().eval() for layer, sae in pl_module.saes.items()}


class _EveryNEpochs(Callback):
    def __init__(self, every_n_epochs: int) -> None:
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise UserError(f"every_n_epochs: {every_n_epochs!r} must be an integer >= 1")
        self.every_n_epochs = every_n_epochs

    def due(self, trainer: L.Trainer) -> bool:
        epoch = trainer.current_epoch + 1
        return epoch % self.every_n_epochs == 0 or epoch == trainer.max_epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.due(trainer):
            return
        if trainer.is_global_zero:
            self.run(trainer, pl_module, epoch_dir(trainer))
        trainer.strategy.barrier()

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Path) -> None:
        raise NotImplementedError

    def labeller(self, trainer: L.Trainer, validity: ValidityConfig):
        dm = _datamodule(trainer)
        return make_labeller(dm.llm, validity, Path(dm.run_dir) / "data" / BEHAVIOR_FILE)

    @staticmethod
    def log_metrics(trainer: L.Trainer, metrics: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


class CircuitDiscoveryCallback(_EveryNEpochs):
    """Finds the circuits of every category with the current SAEs and compares them across categories.

    Args:
        circuits: the discovery methods, how nodes and edges are chosen, and the sweep the evaluation runs.
        similarity: the monolithic-vs-modular analysis.
        metric: the refusal metric F (opener token sets); attribution differentiates it, and the
            evaluation uses it too unless AblationEvaluationCallback sets its own.
        validity: greedy generation settings for behaviour labels (circuits.label_source: behavior).
        batch_size: prompts per forward / backward pass of attribution.
        every_n_epochs: run after every N training epochs (and after the last).
    """

    def __init__(self, circuits: CircuitConfig = CircuitConfig(), similarity: SimilarityConfig = SimilarityConfig(),
                 metric: RefusalMetricConfig = RefusalMetricConfig(), validity: ValidityConfig = ValidityConfig(),
                 batch_size: int = 8, every_n_epochs: int = 1) -> None:
        super().__init__(every_n_epochs)
        self.circuits = circuits
        self.similarity = similarity
        self.metric = metric
        self.validity = validity
        self.batch_size = batch_size

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Path) -> None:
        dm = _datamodule(trainer)
        found = discover_circuits(_saes(pl_module), dm.cache, dm.splits, self.circuits, self.similarity, out,
                                  self.labeller(trainer, self.validity), dm.llm, self.metric, self.batch_size)
        metrics = {}
        for method, circuits in found.items():
            metrics |= {f"circuits/{method}/{c.name}/n_nodes": float(len(c.nodes)) for c in circuits}
            metrics |= {f"circuits/{method}/{c.name}/n_edges": float(len(c.edges)) for c in circuits}
            similarity_path = out / method / "similarity.json"
            if not similarity_path.is_file():
                continue
            verdict = json.loads(similarity_path.read_text(encoding="utf-8"))["verdict"]
            for key in ("mean_node_jaccard", "mean_edge_jaccard", "mean_null_node_jaccard", "significant_node_fraction"):
                metrics[f"similarity/{method}/{key}"] = _float(verdict[key])
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(f"similarity/{method}/heatmap", [str(out / method / "similarity.png")],
                                     step=trainer.global_step)
        self.log_metrics(trainer, {k: v for k, v in metrics.items() if v == v})
        point_latest(out)
        log.info("circuits of epoch %d written to %s", trainer.current_epoch + 1, out)


class AblationEvaluationCallback(_EveryNEpochs):
    """Judges the circuits discovery just wrote by mean-ablation on the held-out split; logs the curves.

    Args:
        ablation: error-term handling, batch size and the random baseline's seed.
        metric: the refusal metric F; null: CircuitDiscoveryCallback's.
        validity: write `<run_dir>/metric_validity.json` once per run (greedy answers of the evaluation
            prompts: does the score predict refusals?); null to skip it.
        every_n_epochs: must match CircuitDiscoveryCallback's.
    """

    def __init__(self, ablation: AblationConfig = AblationConfig(), metric: RefusalMetricConfig | None = None,
                 validity: ValidityConfig | None = ValidityConfig(), every_n_epochs: int = 1) -> None:
        super().__init__(every_n_epochs)
        self.ablation = ablation
        self.metric = metric
        self.validity = validity

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Path) -> None:
        dm = _datamodule(trainer)
        wrapper = dm.llm()
        metric = self.metric or discovery_metric(out)
        validity_path = Path(dm.run_dir) / VALIDITY_FILE
        if self.validity is not None and not validity_path.is_file():
            log.info("metric validity report: greedy answers of %d evaluation prompts", len(dm.splits["evaluation"]))
            write_validity_report(validity_report(wrapper, dm.splits["evaluation"], metric, self.validity),
                                  validity_path)
        summary = evaluate_circuits(wrapper, _saes(pl_module), dm.splits, out, self.ablation, metric,
                                    self.labeller(trainer, self.validity or ValidityConfig()))
        self.report(trainer, out)
        point_latest(out)
        log.info("%s", format_summary(summary))

    def report(self, trainer: L.Trainer, out: Path) -> None:
        metrics, images = {}, []
        results = {}
        for method in read_discovery(out)["methods"]:
            results[method] = json.loads((out / method / EVALUATION_FILE).read_text(encoding="utf-8"))["circuits"]
            images.append((f"circuits/{method}/curves", out / method / CURVES_FILE))
            for r in results[method]:
                if r["best"] is not None:
                    for key in ("faithfulness", "completeness", "n_nodes"):
                        metrics[f"circuits/{method}/{r['name']}/best_{key}"] = float(r["best"][key])
                for key in ("cpr", "cmd"):
                    if r[key] is not None:
                        metrics[f"circuits/{method}/{r['name']}/{key}"] = r[key]
        if len(results) > 1:
            images.append(("circuits/comparison", out / f"{COMPARISON_FILE}.png"))
        self.log_metrics(trainer, metrics)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._wandb(logger, trainer, results, images)

    @staticmethod
    def _wandb(logger: WandbLogger, trainer: L.Trainer, results: dict[str, list[dict[str, Any]]],
               images: list[tuple[str, Path]]) -> None:
        """Per circuit a line plot of every method's sweep, one table of every point, the PNGs."""
        import wandb

        columns = ["method", "circuit", "threshold", "max_nodes", "n_nodes", "faithfulness", "completeness",
                   "random_faithfulness", "random_completeness", "completeness_ratio"]
        rows = [[method, r["name"], p["threshold"], p.get("max_nodes"), p["n_nodes"], p["circuit"]["faithfulness"],
                 p["circuit"]["completeness"], p["random"]["faithfulness"], p["random"]["completeness"],
                 p["circuit"]["completeness_ratio"]] for method, rs in results.items() for r in rs for p in r["points"]]
        logger.log_table("circuits/sweep", columns=columns, data=rows, step=trainer.global_step)
        plots = {}
        for method, rs in results.items():
            for r in rs:
                xs = [p["n_nodes"] for p in r["points"]]
                ys = [[_float(p[side][key]) for p in r["points"]]
                      for side in ("circuit", "random") for key in ("faithfulness", "completeness")]
                plots[f"circuits/{method}/{r['name']}/curves"] = wandb.plot.line_series(
                    xs=xs, ys=ys, keys=["faithfulness", "completeness", "random faithfulness", "random completeness"],
                    title=f"{method} {r['name']}: ablation sweep", xname="nodes")
        # as Lightning's WandbLogger logs: W&B's own step counter has run past global_step by now (one
        # increment per log call), and W&B drops data logged at an explicit step behind it
        logger.experiment.log({**plots, "trainer/global_step": trainer.global_step})
        for key, path in images:
            logger.log_image(key, [str(path)], step=trainer.global_step)


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


__all__ = ["AblationEvaluationCallback", "CircuitDiscoveryCallback"]
