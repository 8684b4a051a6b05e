"""The command line: `fit` (Lightning's `LightningCLI`, the whole pipeline) and `analyze` (one analysis
stage on a finished run).

`fit` options come from the signatures of the data module, the SAE module and the Trainer (`--data.*`,
`--model.*`, `--trainer.*`); `analyze` takes the circuit analysis's options (`--analysis.*`, as
`CircuitAnalysisCallback` does), defaulting to those the run was fitted with. Configs are YAML read
through OmegaConf so they can interpolate (`${run_dir}`), and a `UserError` anywhere ends in one line on
stderr with exit status 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import NoReturn

import yaml
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules import ActivationDataModule
from lightning_modules import SAEModule
from refusal_sae.analysis import STAGES, AnalysisConfig, AnalysisInputs, format_summary, run_analysis
from refusal_sae.errors import UserError
from refusal_sae.layout import RunLayout
from refusal_sae.sae_io import load_sae

log = logging.getLogger("refusal_sae")


class OneLineErrorParser(LightningArgumentParser):
    """Reports a bad option or config key in one line (not argparse's usage dump), exit status 2."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse parses nested parsers with errors as exceptions
            super().error(message, ex)
        reason = " ".join(line.strip(" -") for line in message.splitlines() if line.strip())
        print(f"error: {reason} (options: python -m refusal_sae fit --help)", file=sys.stderr)
        sys.exit(2)


class RefusalCLI(LightningCLI):
    """`fit` runs the pipeline: prompts and activations (data module), then SAE training (the module)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", default="runs/default", help="Directory every stage writes into.")
        parser.link_arguments("run_dir", "data.run_dir")
        parser.link_arguments("run_dir", "trainer.default_root_dir")

    def before_instantiate_classes(self) -> None:
        """Put a logger's relative `save_dir` (e.g. W&B's default ".") under `run_dir`, even when
        `--run_dir` is given on the command line after the config file was read."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            save_dir = getattr(init_args, "save_dir", None)
            if isinstance(save_dir, str) and not Path(save_dir).is_absolute():
                init_args.save_dir = str(Path(config.run_dir) / save_dir)

    def after_fit(self) -> None:
        """Print where the SAEs are and the latest circuits' summary (rank 0)."""
        if not self.trainer.is_global_zero:
            return
        run = RunLayout(self.trainer.default_root_dir)
        print(f"SAEs saved in {run.saes}")
        summary = run.latest.read_summary()
        if summary is not None:
            print(format_summary(summary))
        else:
            print("no circuit analysis ran (add callbacks.CircuitAnalysisCallback to trainer.callbacks, as "
                  "configs/default.yaml does)")


CALLBACK = "callbacks.CircuitAnalysisCallback"


def _fitted(run: RunLayout) -> dict:
    """The resolved config `fit` saved in the run directory."""
    if not run.config.is_file():
        raise UserError(f"{run.config} not found: {run.root} is not a directory `fit` ran in; give analyze the "
                        "--run_dir of a finished run")
    return yaml.safe_load(run.config.read_text(encoding="utf-8")) or {}


def _analysis_defaults(fitted: dict) -> dict:
    """The analysis options of the run's CircuitAnalysisCallback (empty if it had none)."""
    callbacks = (fitted.get("trainer") or {}).get("callbacks") or []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        if isinstance(cb, dict) and cb.get("class_path") == CALLBACK:
            return (cb.get("init_args") or {}).get("analysis") or {}
    return {}


def _inputs(run: RunLayout, fitted: dict, cfg: AnalysisConfig) -> AnalysisInputs:
    """The finished run's data module (prompts, cache, model) and saved SAEs."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False, parser_mode="omegaconf")
    parser.add_class_arguments(ActivationDataModule, "data")
    data = dict(fitted.get("data") or {}, run_dir=str(run.root))
    dm = parser.instantiate_classes(parser.parse_object({"data": data})).data
    dm.setup("fit")
    layers = list(dm.cache.layers)
    missing = [layer for layer in layers if not (run.saes / layer).is_dir()]
    if missing:
        raise UserError(f"{run.saes}: no SAE for layer(s) {missing}; finish `fit` on this run first")
    saes = {layer: load_sae(run.saes / layer, expected_layer=layer).eval() for layer in layers}
    return AnalysisInputs(saes, dm.cache, dm.splits, dm.llm, run, cfg.validity)


def analyze(args: list[str]) -> None:
    """`python -m refusal_sae analyze --run_dir runs/x [--stage evaluate] [--name n] [--analysis.*]`."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="python -m refusal_sae analyze", exit_on_error=False, parser_mode="omegaconf",
                            description="Run circuit-analysis stages on a finished run, into a new "
                                        "<run_dir>/analysis/<name>/ (never overwriting another analysis).")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--run_dir", type=str, required=True, help="The run directory `fit` wrote.")
    parser.add_argument("--stage", type=str, default="all",
                        help=f"One of {', '.join(STAGES)}, or all. A later stage takes the earlier stages' "
                             "results from --source.")
    parser.add_argument("--name", type=str, default=None,
                        help="New analysis directory under <run_dir>/analysis (default: analyze_<stage>_<n>).")
    parser.add_argument("--source", type=str, default="latest",
                        help="The analysis whose discovery a stage after discover uses (default: the newest).")
    parser.add_class_arguments(AnalysisConfig, "analysis")
    try:
        pre = parser.parse_args(args, defaults=False)
    except Exception as e:  # jsonargparse's ArgumentError and friends
        raise UserError(f"analyze: {' '.join(str(e).split())} (options: python -m refusal_sae analyze --help)") from e
    run = RunLayout(pre.run_dir)
    fitted = _fitted(run)
    parser.set_defaults({"analysis": _analysis_defaults(fitted)} if _analysis_defaults(fitted) else {})
    try:
        ns = parser.parse_args(args)
        cfg = parser.instantiate_classes(ns).analysis
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"analyze: {' '.join(str(e).split())} (options: python -m refusal_sae analyze --help)") from e
    stages = list(STAGES) if ns.stage == "all" else [ns.stage, "summary"]
    if ns.stage not in (*STAGES, "all"):
        raise UserError(f"analyze --stage: {ns.stage!r}; use one of {', '.join(STAGES)} or all")
    name = ns.name or next(f"analyze_{ns.stage}_{i}" for i in range(1, 10_000)
                           if not (run.analysis_root / f"analyze_{ns.stage}_{i}").exists())
    out = run.analysis(name)
    if out.root.exists():
        raise UserError(f"{out.root} exists already; give analyze another --name (analyses are never overwritten)")
    source = run.analysis(ns.source) if ns.source != "latest" else run.latest
    if stages[0] != "discover" and not source.root.exists():
        raise UserError(f"{source.root} not found: the run has no analysis to take circuits from; run analyze "
                        "--stage all (or discover) first, or give --source")
    summary = run_analysis(_inputs(run, fitted, cfg), out, cfg, stages, source)
    print(format_summary(summary))


def main(args: list[str] | None = None) -> None:
    """Entry point; bad input exits with status 2 and one line, never a traceback."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # config fields' docstrings are their help
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if args is None else list(args)
    try:
        if args[:1] == ["analyze"]:
            analyze(args[1:])
            return
        RefusalCLI(
            SAEModule,
            ActivationDataModule,
            parser_class=OneLineErrorParser,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
