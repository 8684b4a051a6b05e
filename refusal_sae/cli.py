"""The command line: Lightning's `LightningCLI`, with the pipeline's stages behind `fit`.

Options come from the signatures of the data module, the SAE module and the Trainer
(`--data.*`, `--model.*`, `--trainer.*`), configs are YAML read through OmegaConf so they can
interpolate (`${run_dir}`), and a `UserError` anywhere ends in one line on stderr with exit status 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import NoReturn

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules import ActivationDataModule
from lightning_modules import SAEModule
from refusal_sae.analysis import SUMMARY_FILE, format_summary
from refusal_sae.errors import UserError

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
        root = Path(self.trainer.default_root_dir)
        print(f"SAEs saved in {root / 'saes'}")
        summary = root / "analysis" / "latest" / SUMMARY_FILE
        if summary.is_file():
            print(format_summary(json.loads(summary.read_text(encoding="utf-8"))))
        else:
            print("no circuit evaluation ran (add CircuitDiscoveryCallback and AblationEvaluationCallback to "
                  "trainer.callbacks, as configs/default.yaml does)")


def main(args: list[str] | None = None) -> None:
    """Entry point; bad input exits with status 2 and one line, never a traceback."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # config fields' docstrings are their help
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
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
