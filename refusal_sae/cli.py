"""The command line: `fit` (Lightning's `LightningCLI`, the whole pipeline) and `analyze` (one analysis
stage on a finished run).

`fit` options come from the signatures of the data module, the SAE module and the Trainer (`--data.*`,
`--model.*`, `--trainer.*`); `analyze` takes the circuit analysis's options (`--analysis.*`, as
`CircuitAnalysisCallback` does), defaulting to those the run was fitted with. Configs are YAML read
through OmegaConf so they can interpolate (`${run_dir}`); interpolations are resolved once every config file
and option is merged, so a later `--run_dir` also moves what a config derives from it. A `UserError`
anywhere ends in one line on stderr with exit status 2; a fit stopped by SIGTERM, in one line with 143.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf.errors import OmegaConfBaseException

from datamodules import ActivationDataModule
from lightning_modules import SAEModule
from lightning_modules.sae_module import saved_checkpoint
from refusal_sae.analysis import (
    STAGES,
    AnalysisConfig,
    AnalysisInputs,
    format_summary,
    protocol_label,
    run_analysis,
)
from refusal_sae.errors import UserError
from refusal_sae.io import from_json
from refusal_sae.layout import RunLayout
from refusal_sae.protocol import departures, read_protocol
from refusal_sae.sae_io import load_sae

log = logging.getLogger("refusal_sae")


class OneLineErrorParser(LightningArgumentParser):
    """Reports a bad option or config key in one line (not argparse's usage dump), exit status 2; a fault in
    a `--config` file names the file."""

    _reading: str | None = None  # the --config file being parsed
    configs: tuple[str, ...] = ()
    """The command line's --config files (set by `main`: the subcommand's parser reads them, the root one reports
    an unknown key after merging them all)."""

    def parse_path(self, path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """jsonargparse's, remembering the file for `error` (a YAML syntax error names only `<unicode string>`)."""
        self._reading = str(path)
        try:
            return super().parse_path(path, *args, **kwargs)
        finally:
            self._reading = None

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse parses nested parsers with errors as exceptions
            super().error(message, ex)
        reason = " ".join(line.strip(" -") for line in message.splitlines() if line.strip())
        unknown = re.search(r"does not accept option '([\w.]+)'", reason)
        if self._reading:
            unnamed = "<unicode string>"
            reason = reason.replace(unnamed, self._reading) if unnamed in reason else f"{self._reading}: {reason}"
        elif unknown:  # checked once every file is merged: name the file that sets the key
            where = [p for p in self.configs if _sets_key(p, unknown.group(1).split("."))]
            reason = f"{where[-1]}: {reason}" if where else reason
        print(f"error: {reason} (options: python -m refusal_sae fit --help)", file=sys.stderr)
        sys.exit(2)


CHANGEABLE = ("model", "prompts")
"""Inputs `analyze --allow_changed` may accept as changed since `fit` cached the activations."""


class Terminated(Exception):
    """`fit` stopped by a signal (SIGTERM, or SIGINT: Ctrl-C): `main` says so in one line and exits 128 + the signal
    (143, 130: what a shell reports for a process the signal ended), so that a scheduler never records the stopped
    run as a success."""

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = signum


class RefusalCLI(LightningCLI):
    """`fit` runs the pipeline: prompts and activations (data module), then SAE training (the module)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", default="runs/default", help="Directory every stage writes into.")
        parser.link_arguments("run_dir", "data.run_dir")
        parser.link_arguments("run_dir", "trainer.default_root_dir")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """LightningCLI's, with a broken `${...}` reference reported in one line: under omegaconf+ it is resolved
        once every config file and option is merged, outside the parser's error reporting."""
        try:
            super().parse_arguments(parser, args)
        except OmegaConfBaseException as e:
            key = str(getattr(e, "full_key", "") or "").split(".", 1)[-1]  # without the subcommand ("fit.")
            what = str(e).partition("\n")[0]
            raise UserError(f"{key or 'config'}: {what}; fix the ${{...}} reference "
                            "(it names another option, e.g. ${run_dir})") from None

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

    def before_fit(self) -> None:
        """Refuse, before anything is written, a fit that would train nothing or silently start afresh."""
        for option in ("max_epochs", "max_steps"):
            if getattr(self.trainer, option) == 0:
                raise UserError(f"trainer.{option}: 0 takes no optimiser step, so the SAEs would stay untrained; "
                                "give at least 1")
        ckpt_path = str(self.config_init[self.subcommand].get("ckpt_path") or "")
        if ckpt_path == "last":
            self._check_last_checkpoint()
        elif ckpt_path and ckpt_path not in ("best", "hpc") and ":" not in ckpt_path:
            # (with a ":", a URL or a model registry name: left to Lightning)
            if not Path(ckpt_path).is_file():
                raise UserError(f"--ckpt_path {ckpt_path}: no such checkpoint file; give a checkpoint `fit` saved, or "
                                "`last` (the newest in <run_dir>/checkpoints), or leave out --ckpt_path to start "
                                "afresh")
            _check_complete(ckpt_path)

    def _check_last_checkpoint(self) -> None:
        """`--ckpt_path last` must find a checkpoint (Lightning only warns, then trains from scratch)."""
        callbacks = [cb for cb in self.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        found = sorted(set().union(*(cb._find_last_checkpoints(self.trainer) for cb in callbacks)))
        if any(os.path.exists(path) for path in found):
            for path in found:
                if os.path.exists(path):
                    _check_complete(path)
            return
        folders = [str(cb.dirpath) for cb in callbacks if cb.dirpath]
        broken = [path for path in found if os.path.islink(path)]
        advice = f"give the --run_dir of the run to resume (this one: {self.trainer.default_root_dir})"
        if not callbacks:
            why = "trainer.callbacks saves no checkpoints (add lightning_modules.RunDirCheckpoint with save_last)"
        elif broken:
            why = f"{broken[0]} is a link to {os.readlink(broken[0])}, which does not exist"
            advice = "give an existing checkpoint file as --ckpt_path"
        elif folders and not any(os.path.isdir(folder) for folder in folders):
            why = f"{', '.join(folders)} does not exist"
        else:
            why = f"no last.ckpt in {', '.join(folders) or 'the checkpoint directory'}"
        raise UserError(f"--ckpt_path last: {why}; {advice}, or leave out --ckpt_path to start afresh")

    def fit(self, **kwargs: Any) -> None:
        """`trainer.fit`, raising `Terminated` when SIGTERM (Lightning 2.x exits 0, its issue 19916) or Ctrl-C stopped
        it."""
        try:
            self.trainer.fit(**kwargs)
        except SIGTERMException:
            raise Terminated(self._stopped("SIGTERM")) from None
        except SystemExit:
            if not self.trainer.interrupted:
                raise
            # Lightning ends its own handling of Ctrl-C with sys.exit(1) after "Detected KeyboardInterrupt"
            raise Terminated(self._stopped("Ctrl-C (SIGINT)"), signal.SIGINT) from None

    def _stopped(self, by: str) -> str:
        """The line a stopped `fit` ends with: where it stopped and the checkpoint to resume from."""
        saved = saved_checkpoint(self.trainer)
        resume = "last" if saved and Path(saved).name.startswith("last") else saved
        kept = (f"the last checkpoint, {saved}, is kept: run the same command with --ckpt_path {resume} to resume"
                if saved else "no checkpoint had been saved yet: run the same command again to start afresh")
        return (f"training stopped by {by} in epoch {self.trainer.current_epoch} (step {self.trainer.global_step}); "
                f"{kept}")

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


def _check_complete(path: str) -> None:
    """A checkpoint file is a zip archive (`torch.save`), whose directory is written last: without it the file
    was cut short (a full disk, a killed copy) and loading it would fail half way."""
    if not zipfile.is_zipfile(path):
        raise UserError(f"--ckpt_path: {path} is not a complete checkpoint (cut short or damaged); give another one "
                        "(`fit` keeps one per epoch in <run_dir>/checkpoints), or leave out --ckpt_path to start afresh")


def _fitted(run: RunLayout) -> dict:
    """The resolved config `fit` saved in the run directory."""
    if not run.config.is_file():
        raise UserError(f"{run.config} not found: {run.root} is not a directory `fit` ran in; give analyze the "
                        "--run_dir of a finished run")
    fitted = _read_config(str(run.config))
    if not isinstance(fitted, dict):
        raise UserError(f"{run.config}: not the mapping of options fit writes; restore it or fit the run again")
    return fitted


def _analysis_defaults(fitted: dict) -> dict:
    """The analysis options of the run's CircuitAnalysisCallback (empty if it had none)."""
    callbacks = (fitted.get("trainer") or {}).get("callbacks") or []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        if isinstance(cb, dict) and cb.get("class_path") == CALLBACK:
            return (cb.get("init_args") or {}).get("analysis") or {}
    return {}


def _check_trust(run: RunLayout, fitted: dict, trust_remote_code: bool) -> None:
    """A model whose code the run trusted (`data.model.trust_remote_code`) is loaded only when this command line
    trusts it too: the run's config is a file anyone who could write the run directory could have edited."""
    if ((fitted.get("data") or {}).get("model") or {}).get("trust_remote_code") and not trust_remote_code:
        raise UserError(f"{run.config}: data.model.trust_remote_code is true, so the model directory's own Python "
                        "code would run; analyze runs it only when asked on its command line: read that code, then "
                        "add --trust_remote_code true")


def _inputs(run: RunLayout, fitted: dict, cfg: AnalysisConfig, allow_changed: Sequence[str] = ()
            ) -> AnalysisInputs:
    """The finished run's data module (prompts, cache, model) and saved SAEs; a model or prompts list changed since
    the activations were cached is refused unless `allow_changed` names it."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False, parser_mode="omegaconf")
    parser.add_class_arguments(ActivationDataModule, "data")
    data = dict(fitted.get("data") or {}, run_dir=str(run.root))
    dm = parser.instantiate_classes(parser.parse_object({"data": data})).data
    dm.setup("fit")
    unknown = [kind for kind in allow_changed if kind not in CHANGEABLE]
    if unknown:
        raise UserError(f"--allow_changed: {unknown[0]!r}; give any of {', '.join(CHANGEABLE)}")
    changed = dm.cache.changed_source(dm.llm(), dm.splits)
    if refused := {kind: what for kind, what in changed.items() if kind not in allow_changed}:
        raise UserError(f"{run.root}: the {' and the '.join(refused)} changed since `fit` cached the run's activations "
                        f"({', '.join(w for what in refused.values() for w in what)}), so its SAEs and activations are "
                        f"of the old one; restore it, fit again, or give --allow_changed '[{', '.join(refused)}]' to "
                        "analyse anyway (the analysis records it)")
    for kind, what in changed.items():
        log.warning("the %s changed since fit cached the activations (%s); analysed anyway (--allow_changed)", kind,
                    ", ".join(what))
    layers = (fitted.get("model") or {}).get("layers") or list(dm.cache.layers)  # those fit trained, as SAEModule
    unknown = [layer for layer in cfg.saes if layer not in dm.cache.layers]
    if unknown:
        raise UserError(f"analysis.saes: layer(s) {unknown} are not in this run's activation cache "
                        f"({', '.join(dm.cache.layers)}); give SAEs for cached layers, or fit a run that caches them")
    missing = [layer for layer in layers if layer not in cfg.saes and not (run.saes / layer).is_dir()]
    if missing:
        raise UserError(f"{run.saes}: no SAE for layer(s) {missing}; finish `fit` on this run first")
    saes = {layer: load_sae(run.saes / layer, expected_layer=layer, expected_d_in=dm.cache.d_model).eval()
            for layer in layers if layer not in cfg.saes}
    model = dm.cache.model_name
    saes.update({layer: given.load(layer, dm.cache.d_model, model) for layer, given in cfg.saes.items()})
    saes = {layer: saes[layer] for layer in sorted(saes, key=dm.cache.layers.index)}
    return AnalysisInputs(saes, dm.cache, dm.splits, dm.llm, run, cfg.validity)


def _merged(base: dict, over: dict) -> dict:
    """`over` laid on `base`, nested dicts merged key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


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
    parser.add_argument("--resume", type=str, default=None,
                        help="Finish the interrupted analysis of this name, as it was started (give no other option "
                             "but --run_dir): finished circuits are read back, not recomputed.")
    parser.add_argument("--trust_remote_code", type=bool, default=False,
                        help="Run the model directory's own code when the run's config trusts it "
                             "(data.model.trust_remote_code); never taken from the run directory alone.")
    parser.add_argument("--allow_changed", type=list[str], default=[],
                        help=f"Analyse although these inputs changed since `fit` cached the run's activations, e.g. "
                             f"[model] for a model directory copied elsewhere (one of {', '.join(CHANGEABLE)}); the "
                             "analysis records it.")
    parser.add_argument("--protocol", type=str, default=None,
                        help="A protocol file (configs/protocols/*.yaml): its analysis options apply, no other option "
                             "may depart from them, and every record carries its stamp.")
    parser.add_class_arguments(AnalysisConfig, "analysis")
    for path in _config_files(args):  # jsonargparse's YAML errors name no file
        _read_config(path)
    try:
        pre = parser.parse_args(args, defaults=False)
    except Exception as e:  # jsonargparse's ArgumentError and friends
        raise UserError(f"analyze: {' '.join(str(e).split())} (options: python -m refusal_sae analyze --help)") from e
    run = RunLayout(pre.run_dir)
    fitted = _fitted(run)
    _check_trust(run, fitted, bool(getattr(pre, "trust_remote_code", False)))
    if getattr(pre, "resume", None):
        _resume(args, run, fitted, pre.resume)
        return
    stamp, fixed = read_protocol(pre.protocol) if getattr(pre, "protocol", None) else (None, {})
    defaults = _merged(_analysis_defaults(fitted), fixed)
    parser.set_defaults({"analysis": defaults} if defaults else {})
    try:
        ns = parser.parse_args(args)
        cfg = parser.instantiate_classes(ns).analysis
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"analyze: {' '.join(str(e).split())} (options: python -m refusal_sae analyze --help)") from e
    if stamp is not None and (off := departures(fixed, asdict(cfg))):
        raise UserError(f"analyze: {off[0]} departs from protocol {stamp.label()} in {stamp.path}"
                        f"{f' (and {len(off) - 1} more)' if len(off) > 1 else ''}; drop the option, or make a new "
                        "protocol version (a copy of the file with its version raised)")
    stages = list(STAGES) if ns.stage == "all" else [ns.stage, "summary"]
    if ns.stage not in (*STAGES, "all"):
        raise UserError(f"analyze --stage: {ns.stage!r}; use one of {', '.join(STAGES)} or all")
    out = run.analysis(ns.name) if ns.name is not None else None
    if out is not None and out.root.exists():
        raise UserError(f"{out.root} exists already; give analyze another --name (analyses are never overwritten), "
                        f"or finish an interrupted one with --resume {ns.name}")
    source = run.source(ns.source)
    if stages[0] != "discover" and not source.root.exists():
        raise UserError(f"{source.root} not found: the run has no analysis to take circuits from; run analyze "
                        "--stage all (or discover) first, or give --source")
    if stages[0] != "discover" and not source.complete:
        raise UserError(f"--source {source.name}: unfinished (an interrupted analyze or fit epoch, or one made before "
                        "analyses were marked complete): it may hold some circuits only; finish it with analyze "
                        f"--resume {source.name} where analyze started it, or give another --source")
    if stages[0] != "discover" and source.protocol != (theirs := stamp and asdict(stamp)):
        raise UserError(f"--source {source.name}: made under protocol {protocol_label(source.protocol)}, this "
                        f"analysis under {protocol_label(theirs)}; take circuits from an analysis under the same "
                        "protocol (or run --stage all)")
    inputs = _inputs(run, fitted, cfg, ns.allow_changed)  # before a folder is claimed: a refused input leaves none
    if out is None:  # the first free default name, claimed (another analyze may be claiming names too)
        out = run.analysis(next(f"analyze_{ns.stage}_{i}" for i in range(1, 10_000)
                                if _claim(run.analysis_root / f"analyze_{ns.stage}_{i}")))
    elif not _claim(out.root):  # another analyze took the name since it was checked
        raise UserError(f"{out.root} was just created by another analyze; give this one another --name")
    if stamp is not None:
        out.write_protocol(stamp)
    out.write_invocation(stages, source.root.resolve().name, cfg, ns.allow_changed)
    summary = run_analysis(inputs, out, cfg, stages, source)
    out.mark_complete()
    print(format_summary(summary))


def _claim(directory: Path) -> bool:
    """Create `directory` for this process alone: False if it exists already (another process may have made it),
    so two `analyze` runs never write into one folder."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        directory.mkdir()
    except FileExistsError:
        return False
    return True


def _resume(args: list[str], run: RunLayout, fitted: dict, name: str) -> None:
    """Finish analysis `name` as `analyze` started it: its stages, source and options from `invocation.json`; a
    discovery it finished is kept (a later stage reads it from there), each circuit evaluated already is read
    back by the evaluation, the rest runs."""
    extra = sorted({option for option, _ in _options(args) if option.startswith("--")}
                   - {"--run_dir", "--resume", "--trust_remote_code"})
    if extra:
        raise UserError(f"analyze --resume {name}: {', '.join(extra)} given; an analysis is finished as it was "
                        "started, so give only --run_dir and --resume (or start a new analysis with --name)")
    out = run.analysis(name)
    if not out.root.is_dir():
        raise UserError(f"analyze --resume: {out.root} not found; give the --name of an analysis analyze started")
    if out.complete:
        raise UserError(f"analyze --resume: {out.root} is complete already; start a new analysis with --name")
    invocation = out.read_invocation()
    cfg = from_json(AnalysisConfig, invocation["analysis"])
    stages, source = invocation["stages"], run.source(invocation["source"])
    if out.discovery_json.is_file():  # discovery done (or copied): every later stage takes it from here
        stages, source = [s for s in stages if s != "discover"], out
    summary = run_analysis(_inputs(run, fitted, cfg, invocation.get("allow_changed", [])), out, cfg, stages, source)
    out.mark_complete()
    print(format_summary(summary))


def _options(argv: Sequence[str]) -> list[tuple[str, str]]:
    """(option, value) for every word of a command line: `--x=v` or `--x v` (the next word)."""
    return [(a.partition("=")[0], a.partition("=")[2]) if "=" in a else (a, b) for a, b in zip(argv, [*argv[1:], ""])]


def _config_files(argv: Sequence[str]) -> list[str]:
    """The `--config` files of a command line, in order."""
    return [value for option, value in _options(argv) if option == "--config"]


def _read_config(path: str) -> Any:
    """A `--config` file's YAML; a syntax error is one line naming the file and the line."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(" ".join(str(e).replace("<unicode string>", path).split())) from e
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}; check the --config path") from e


def _sets_key(path: str, keys: list[str]) -> bool:
    """Whether the YAML file at `path` sets the nested key `keys`."""
    try:
        node = _read_config(path)
    except UserError:
        return False
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _check_run_dir_order(argv: list[str]) -> None:
    """Refuse a `--run_dir` that a later `--config` would silently override (options apply in order)."""
    given: str | None = None
    for option, value in _options(argv):
        if option == "--run_dir":
            given = value
        elif option == "--config" and given is not None and Path(value).is_file():
            try:
                config = _read_config(value)
            except UserError:
                return  # the parser reports it, naming the file
            if isinstance(config, dict) and "run_dir" in config and str(config["run_dir"]) != given:
                raise UserError(f"--run_dir {given} comes before --config {value}, whose run_dir: {config['run_dir']} "
                                "would replace it (later options win); put --run_dir after --config")


def main(args: list[str] | None = None) -> None:
    """Entry point; bad input exits with status 2 and one line, never a traceback."""
    # field docstrings are their help; `${seed_everything}` in a config stays relative to the config's root
    # under omegaconf+ (interpolation after the command line, so `--seed_everything 1` reaches data.prompts.seed)
    set_parsing_settings(docstring_parse_attribute_docstrings=True, omegaconf_absolute_to_relative_paths=True)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv[:1] == ["analyze"]:
            analyze(argv[1:])
            return
        _check_run_dir_order(argv)
        OneLineErrorParser.configs = tuple(_config_files(argv))
        RefusalCLI(
            SAEModule,
            ActivationDataModule,
            parser_class=OneLineErrorParser,
            parser_kwargs={"parser_mode": "omegaconf+"},
            save_config_kwargs={"overwrite": True},
            args=args,  # None: LightningCLI reads sys.argv (given both, it warns on every run)
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Terminated as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
