"""Epoch-end circuit analysis, as an observer of SAE training.

Every `every_n_epochs` training epochs (and after the last one) rank 0 takes a copy of the current SAEs
and runs the analysis stages (`refusal_sae.analysis`: discover, similarity, evaluate, summary, report) into
`<run_dir>/analysis/epoch_<NNN>/`, then reports to the Lightning loggers (W&B also gets the curves, the points
table and the report's node cards); the other ranks wait at a barrier. `<run_dir>/analysis/latest` links to
the newest complete analysis. Nothing here changes training: the SAEs are copied, never touched. An analysis
that fails on bad input does not stop training: the checkpoints and the SAE export still happen, and `fit`
then ends with the error (exit status 2). SIGTERM stops an analysis at once (exit status 143, one line naming the
checkpoint to resume from: the previous epoch's, as Lightning writes an epoch's checkpoint after its callbacks).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import signal
import threading
from dataclasses import replace
from collections.abc import Iterator
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from refusal_sae.analysis import AnalysisConfig, AnalysisInputs, format_summary, run_analysis
from refusal_sae.editing import MODEL, CategoryEdits
from refusal_sae.errors import UserError
from refusal_sae.evaluation import ALL_LAYERS, CircuitEvaluation
from refusal_sae.layout import AnalysisLayout, RunLayout, Summary
from refusal_sae.positions import PositionScheme
from refusal_sae.report import load_cards, node_card_table
from refusal_sae.validate import positive_int

log = logging.getLogger("refusal_sae")


def _datamodule(trainer: L.Trainer) -> Any:
    dm = trainer.datamodule
    if dm is None or not hasattr(dm, "cache") or not hasattr(dm, "llm"):
        raise UserError("CircuitAnalysisCallback needs the ActivationDataModule (prompts, cache and model); use `fit`")
    return dm


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM raises Lightning's SIGTERMException at once, as it does at a training batch's boundary (`fit` then
    says so in one line, exit status 143): Lightning's own handler only notes the signal, and an analysis can run
    for an hour. Its handler still runs first (it notes the signal and stops a launcher's other processes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def stop(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        raise SIGTERMException

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class CircuitAnalysisCallback(Callback):
    """Finds each category's circuits with the current SAEs, compares them, and judges them by mean-ablation.

    Args:
        analysis: every option of the analysis (discovery, evaluation, similarity, metric, validity).
        every_n_epochs: run after every N training epochs (and after the last, or one training stops after).
    """

    def __init__(self, analysis: AnalysisConfig = AnalysisConfig(), every_n_epochs: int = 1) -> None:
        positive_int("every_n_epochs", every_n_epochs, 1)
        if analysis.saes:
            raise UserError("analysis.saes: the epoch-end analysis judges the SAEs being trained; analyse loaded SAEs "
                            "after fit with `python -m refusal_sae analyze --run_dir <run> --analysis.saes ...`")
        self.analysis = analysis
        self.every_n_epochs = every_n_epochs
        self.failure: Exception | None = None
        """The last analysis error: training goes on, and `fit` ends with it (a bad option: one line, exit
        status 2; a bug: its traceback) once the checkpoint and the SAEs of the last epoch are written."""
        self.failed_epoch = 0

    def due(self, trainer: L.Trainer) -> bool:
        epoch = trainer.current_epoch + 1
        return epoch % self.every_n_epochs == 0 or epoch == trainer.max_epochs or trainer.should_stop

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.due(trainer):
            return
        if trainer.is_global_zero:
            try:
                with _sigterm_stops():
                    self.run(trainer, pl_module)
            except Exception as e:  # noqa: BLE001 - re-raised at the end of fit, after the SAEs are saved
                self.failure = e
                log.error("circuit analysis of epoch %d failed: %s (training goes on; the SAEs and checkpoints are "
                          "kept)", trainer.current_epoch + 1, e)
                self.failed_epoch = trainer.current_epoch + 1
        trainer.strategy.barrier()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the last checkpoint and the SAE export: end with the analysis error, if there was one."""
        if isinstance(self.failure, UserError):
            raise UserError(f"circuit analysis of epoch {self.failed_epoch} failed: {self.failure}; the SAEs are saved "
                            f"in {RunLayout(trainer.default_root_dir).saes}: fix the option and run `python -m "
                            "refusal_sae analyze --run_dir` on this run")
        if self.failure is not None:
            raise self.failure

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = _datamodule(trainer)
        run = RunLayout(dm.run_dir)
        out = run.epoch(trainer.current_epoch + 1)
        if out.root.exists():  # an earlier fit's analysis of this epoch: replaced whole, never mixed with this one's
            shutil.rmtree(out.root)
        saes = {layer: copy.deepcopy(sae).float().cpu().eval() for layer, sae in pl_module.saes.items()}
        inputs = AnalysisInputs(saes, dm.cache, dm.splits, dm.llm, run, self.analysis.validity)
        # SAEs loaded instead of trained (model.pretrained) are judged like analyze's analysis.saes: quality first,
        # and one below analysis.loaded_sae_floor stops the analysis
        cfg = replace(self.analysis, saes=dict(getattr(pl_module, "pretrained", {})))
        summary = run_analysis(inputs, out, cfg)
        out.mark_complete()
        run.point_latest(out)
        self.report(trainer, out, summary)
        log.info("%s", format_summary(summary))

    def report(self, trainer: L.Trainer, out: AnalysisLayout, summary: Summary) -> None:
        metrics = {}
        for method, m in summary.methods.items():
            for name, r in m.circuits.items():
                prefix = f"circuits/{method}/{name}"
                metrics[f"{prefix}/span"] = r.span.value
                for key, area in (("cpr", r.cpr), ("cmd", r.cmd)):
                    if area is not None:
                        metrics[f"{prefix}/{key}"] = area.value
                for level, n in r.reaches.items():
                    if n is not None:
                        metrics[f"{prefix}/nodes_to_faithfulness_{level}"] = float(n)
                if r.sanity_passed is not None:  # None: no check applied, nothing to log
                    metrics[f"{prefix}/sanity_passed"] = float(r.sanity_passed)
        for q in summary.sae_quality or []:
            for key in ("fvu", "l0", "dead_fraction", "dense_fraction", "loss_recovered", "kl_spliced"):
                metrics[f"sae/{q.layer}/{key}"] = getattr(q, key)
        for method, categories in summary.answers.items():
            for category, rows in categories.items():
                for a in rows:
                    prefix = f"answers/{method}/{category}/{a.edit}"
                    if a.toxic_n:
                        metrics[f"{prefix}/toxic_refusal_rate"] = a.toxic_refused / a.toxic_n
                    if a.hard_n:
                        metrics[f"{prefix}/hard_refusal_rate"] = a.hard_refused / a.hard_n
        for t in summary.tradeoff or []:  # the over-refusal trade-off, pooled over the judged categories
            prefix = f"tradeoff/{t.method}/{t.setting}"
            metrics[f"{prefix}/toxic_refusal_rate"] = t.toxic_refused / t.toxic_n
            metrics[f"{prefix}/hard_refusal_rate"] = t.hard_refused / t.hard_n
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                self._wandb(logger, trainer, out, summary)

    @staticmethod
    def _wandb(logger: WandbLogger, trainer: L.Trainer, out: AnalysisLayout, summary: Summary) -> None:
        """Per circuit a line plot of its all-layer curves, one table of every point, the PNGs, and the report's
        node cards as a table (a row per node, its top contexts as HTML: sortable by importance in any circuit)."""
        import wandb

        from refusal_sae.analysis import load_discovery, load_evaluation

        discovery = load_discovery(out)
        columns = ["method", "circuit", "error_mode", "scope", "n_nodes", "fraction", "faithfulness", "faith_low",
                   "faith_high", "completeness", "random_faithfulness_mean"]
        rows, plots = [], {}
        for method in summary.methods:
            results: list[CircuitEvaluation] = load_evaluation(out, discovery, method)
            for r in results:
                for c in r.curves:
                    for p in c.points:
                        f, k, rf = p.faithfulness, p.completeness, p.random_faithfulness
                        rows.append([method, r.name, c.error_mode, c.scope, p.n_nodes, p.fraction,
                                     f and f.value, f and f.low, f and f.high, k and k.value, rf and rf.mean])
                main = [c for c in r.curves if c.scope == ALL_LAYERS]
                xs = [p.n_nodes for p in main[0].points]
                ys = [[p.faithfulness.value if p.faithfulness else float("nan") for p in c.points] for c in main]
                plots[f"circuits/{method}/{r.name}/faithfulness"] = wandb.plot.line_series(
                    xs=xs, ys=ys, keys=[f"{c.error_mode} errors" for c in main],
                    title=f"{method} {r.name}: faithfulness", xname="nodes")
            images = [out.method(method).curves_png, out.method(method).similarity_png]
            for path in images:
                if path.is_file():
                    logger.log_image(f"circuits/{method}/{path.stem}", [str(path)], step=trainer.global_step)
        logger.log_table("circuits/points", columns=columns, data=rows, step=trainer.global_step)
        cards, prompts = load_cards(out)
        columns, rows = node_card_table(cards, prompts, PositionScheme(**discovery.record.scheme),
                                        lambda fragment: wandb.Html(fragment, inject=False))  # its styles are inline
        logger.log_table("circuits/node_cards", columns=columns, data=rows, step=trainer.global_step)
        rows = []
        for method, categories in summary.answers.items():  # every answer under every edit beside the unedited one
            for circuit in categories:
                record = out.method(method).read_edits(CategoryEdits, circuit)
                if record is None:
                    continue
                plain = record.outcome(MODEL).answers
                for o in record.outcomes:
                    for i, (prompt, answer) in enumerate(zip(record.prompts, o.answers)):
                        rows.append([method, record.category, o.edit, "toxic" if i < record.n_toxic else "hard", prompt,
                                     plain[i], answer])
        if rows:
            logger.log_table("circuits/answers", columns=["method", "category", "edit", "prompt_type", "prompt",
                                                          "unedited_answer", "answer"],
                             data=rows, step=trainer.global_step)
        if summary.tradeoff:
            logger.log_table("tradeoff/points", columns=["method", "setting", "toxic_refused", "toxic_n", "hard_refused",
                                                         "hard_n", "coherence_change", "chosen"],
                             data=[[t.method, t.setting, t.toxic_refused, t.toxic_n, t.hard_refused, t.hard_n,
                                    t.coherence_change and t.coherence_change.value, t.chosen]
                                   for t in summary.tradeoff], step=trainer.global_step)
            logger.log_image("tradeoff/figure", [str(out.tradeoff_png)], step=trainer.global_step)
        # as Lightning's WandbLogger logs: W&B's own step counter has run past global_step by now (one
        # increment per log call), and W&B drops data logged at an explicit step behind it
        logger.experiment.log({**plots, "trainer/global_step": trainer.global_step})


__all__ = ["CircuitAnalysisCallback"]
