"""The `python -m refusal_sae` command line, run for real in a subprocess."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_modules import SAEModule
from refusal_sae.analysis import load_discovery, load_evaluation
from refusal_sae.cli import CALLBACK
from refusal_sae.data import read_splits
from refusal_sae.editing import CategoryEdits, circuit_answers, edits_table
from refusal_sae.evaluation import (
    ALL_LAYERS,
    CircuitEvaluation,
    EvaluationConfig,
    curve_sizes,
    faithful_sizes,
)
from refusal_sae.layout import RunLayout
from refusal_sae.overrefusal import TradeoffResult, tradeoff_table
from refusal_sae.sae_io import load_sae
from tests.conftest import ROOT, open_page, write_csv
from tests.run_cli import cli, cli_in_process, one_line_error
from tests.tiny_model import DEFAULT_CONFIG, TINY_CALLBACKS, tiny_fit_options


@pytest.mark.slow
def test_fit_help_lists_data_model_trainer_and_callback_options() -> None:
    result = cli("fit", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--data.prompts.source", "--data.prompts.balance", "--model.sae.k", "--model.layers",
                   "--trainer.devices", "--trainer.precision", "--trainer.callbacks", "--run_dir"):
        assert option in result.stdout, option
    # field docstrings are the help text
    assert "'sample' (bundled)" in result.stdout


@pytest.mark.slow
def test_print_config_resolves_interpolation(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "seeded.yaml"
    config.write_text(DEFAULT_CONFIG.read_text().replace("seed_everything: 0", "seed_everything: 11"))
    result = cli_in_process(capsys, "fit", "--config", str(config), "--print_config")
    assert result.returncode == 0, result.stderr
    assert "seed_everything: 11" in result.stdout
    assert "    seed: 11" in result.stdout  # data.prompts.seed: ${seed_everything}


@pytest.fixture(scope="module")
def tiny_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Options that run the whole default pipeline on a tiny model and 60 bundled prompts, in seconds."""
    return [*tiny_fit_options(tmp_path_factory.mktemp("tiny")), "--model.sae.num_latents", "128",
            "--trainer.max_epochs", "2"]


@pytest.fixture(scope="module")
def tiny_run(tiny_args: list[str], tmp_path_factory: pytest.TempPathFactory):
    """The whole pipeline, circuits included, run once by the real command on the tiny model."""
    run_dir = tmp_path_factory.mktemp("run")
    return cli("fit", *tiny_args, "--run_dir", str(run_dir)), run_dir


def fitted_evaluation(run: RunLayout, **changes: Any) -> EvaluationConfig:
    """The evaluation options `fit` ran with (its saved config), with `changes`."""
    callbacks = yaml.safe_load(run.config.read_text(encoding="utf-8"))["trainer"]["callbacks"]
    [analysis] = [c["init_args"]["analysis"] for c in callbacks if c["class_path"] == CALLBACK]
    return EvaluationConfig(**{**analysis["evaluation"], **changes})


def assert_curves_follow(record: CircuitEvaluation, cfg: EvaluationConfig, layers: list[str]) -> None:
    """One all-layer curve per error mode (and per-layer curves of the first mode), each measured at exactly
    the sizes the options ask for."""
    expected = {(mode, ALL_LAYERS) for mode in cfg.error_modes}
    expected |= {(cfg.error_modes[0], layer) for layer in layers} if cfg.per_layer else set()
    assert {(c.error_mode, c.scope) for c in record.curves} == expected, record.name
    for curve in record.curves:
        assert [p.n_nodes for p in curve.points] == curve_sizes(curve.n_candidates, cfg, record.name)


@pytest.mark.slow
def test_fit_runs_the_pipeline(tiny_run) -> None:
    result, tmp_path = tiny_run
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "data" / "prompts.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["split"] for r in rows} == {"discovery", "evaluation"}
    toxic = sum(r["refusal_label"] == "True" for r in rows)
    assert toxic == len(rows) - toxic == 30
    manifest = json.loads((tmp_path / "activations" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["config"]["layers"] == ["residuals_0", "residuals_1"]
    for layer in ("residuals_0", "residuals_1"):
        sae = load_sae(tmp_path / "saes" / layer, expected_layer=layer, expected_d_in=32)
        assert sae.cfg.k_active == 32
    run = RunLayout(tmp_path)
    latest = run.latest
    assert latest.root.resolve() == run.epoch(2).root.resolve()
    discovery = load_discovery(latest)
    assert discovery.record.methods == ["correlation"]
    assert len(discovery.circuits["correlation"]) == 10  # one per category
    method = latest.method("correlation")
    for path in (method.curves_png, method.similarity_json, method.similarity_png, latest.means_path,
                 *method.circuit_paths("violence"), *method.evaluation_paths("violence")):
        assert path.is_file(), path
    assert latest.read_summary() is not None
    records = load_evaluation(latest, discovery, "correlation")
    assert len(records) == 10
    cfg = fitted_evaluation(run)
    assert (cfg.n_sizes, cfg.fractions) == (4, [0.01, 0.1, 0.5])  # tests/tiny_model.py's TINY_CALLBACKS
    for record in records:
        assert_curves_follow(record, cfg, discovery.means.layers)
    assert run.validity.is_file()
    assert "Refusal looks" in result.stdout and "violence" in result.stdout


@pytest.mark.slow
def test_same_config_and_seed_give_the_same_saes(
    capsys: pytest.CaptureFixture[str], tiny_args: list[str], tmp_path: Path
) -> None:
    for run in ("a", "b"):
        result = cli_in_process(capsys, "fit", *tiny_args, "--run_dir", str(tmp_path / run))
        assert result.returncode == 0, result.stderr
    outputs = ["data/prompts.csv", "saes/residuals_1/sae.safetensors", "saes/residuals_0/cfg.json"]
    analysis = tmp_path / "a" / "analysis" / "epoch_002"
    outputs += [str(p.relative_to(tmp_path / "a")) for p in analysis.rglob("*.json")]
    assert len(outputs) > 20  # circuits, evaluation records, similarity, discovery, summary
    for output in outputs:
        if output.endswith("summary.json"):  # names its own directory
            continue
        assert (tmp_path / "a" / output).read_bytes() == (tmp_path / "b" / output).read_bytes(), output


@pytest.mark.slow
def test_notebook_opens_a_finished_run(tiny_run, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbclient
    import nbformat

    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr
    monkeypatch.setenv("REFUSAL_SAE_RUN_DIR", str(run_dir))
    notebook = nbformat.read(ROOT / "notebooks" / "02_run.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "residuals_0:" in text and "FVU" in text and "Refusal looks" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4  # data, curves, heatmap, graph
    # section 6: one node card from report/cards.json, its top contexts highlighted
    assert "importance/correlation/violence: " in text and "density_toxic: " in text and "promoted: " in text
    contexts = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert 'class="rs-ctx"' in contexts and "background:rgba(255,140,0," in contexts


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path: to see that nothing there changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.slow
def test_analyze_evaluate_reproduces_the_fit_runs_records(capsys: pytest.CaptureFixture[str], tiny_run) -> None:
    """The evaluate stage alone, on the circuits the fit found and with the options it ran with, writes the
    same per-circuit records and per-prompt scores, byte for byte, into a new analysis."""
    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr
    run = RunLayout(run_dir)
    fitted = run.epoch(2)
    before = tree_hashes(fitted.root)
    again = cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--stage", "evaluate", "--name", "again")
    assert again.returncode == 0, again.stderr
    assert f"circuits in {run.analysis('again').root}" in again.stdout and "violence" in again.stdout
    circuits = [c for c, _ in load_discovery(fitted).circuits["correlation"]]
    assert len(circuits) == 10
    for circuit in circuits:
        for old, new in zip(fitted.method("correlation").evaluation_paths(circuit.name),
                            run.analysis("again").method("correlation").evaluation_paths(circuit.name)):
            assert new.read_bytes() == old.read_bytes(), new
    assert tree_hashes(fitted.root) == before


@pytest.mark.slow
def test_analyze_with_another_option_writes_other_records_and_leaves_the_run_alone(
    capsys: pytest.CaptureFixture[str], tiny_run
) -> None:
    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr
    run = RunLayout(run_dir)
    fitted, fewer = run.epoch(2), run.analysis("fewer")
    before = tree_hashes(fitted.root)
    other = cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--stage", "evaluate", "--name", "fewer",
                           "--analysis.evaluation.n_sizes", "3")
    assert other.returncode == 0, other.stderr
    assert tree_hashes(fitted.root) == before
    for name in ("discovery.json", "means.safetensors"):  # the fit's discovery, taken as it was
        assert (fewer.root / name).read_bytes() == (fitted.root / name).read_bytes(), name
    discovery = load_discovery(fewer)
    cfg = fitted_evaluation(run, n_sizes=3)  # the option given, the fit's others
    records = load_evaluation(fewer, discovery, "correlation")
    assert len(records) == 10
    for record in records:
        old, _ = fitted.method("correlation").evaluation_paths(record.name)
        new, _ = fewer.method("correlation").evaluation_paths(record.name)
        assert new.read_bytes() != old.read_bytes(), record.name
        assert_curves_follow(record, cfg, discovery.means.layers)


@pytest.mark.slow
def test_analyze_directions_runs_the_stage_asked_for_by_name(capsys: pytest.CaptureFixture[str], tiny_run) -> None:
    """The refusal-direction stage is off in `fit` by default; `analyze --stage directions` runs it on the run."""
    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr
    run = RunLayout(run_dir)
    assert not run.epoch(2).directions.root.exists()
    done = cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--stage", "directions", "--name", "dirs",
                          "--analysis.directions.random_directions", "19", "--analysis.directions.bootstrap", "100")
    assert done.returncode == 0, done.stderr
    assert "directions (transfer share; describes, decides nothing): Refusal directions" in done.stdout
    record = json.loads(run.analysis("dirs").directions.record_json.read_text(encoding="utf-8"))
    assert len(record["categories"]) == 10 and len(record["ablation"]) == 11  # the global direction and one each
    assert run.analysis("dirs").directions.png.is_file()


@pytest.mark.slow
def test_analyze_ceiling_on_too_few_prompts_is_one_line(capsys: pytest.CaptureFixture[str], tiny_run) -> None:
    """The tiny run holds 4 discovery prompts per category, too few for two halves that discovery can use: the
    ceiling stage says so in one line naming the stage and the category, exit 2, and writes no ceiling."""
    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr
    run = RunLayout(run_dir)
    done = cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--stage", "ceiling", "--name", "ceil",
                          "--source", run.epoch(2).root.name, "--analysis.ceiling.splits", "2")
    assert done.returncode == 2
    assert re.search(r"^error: ceiling: category '\w+' has 4 discovery prompts; a split-half ceiling needs at least "
                     r"6", one_line_error(done), re.MULTILINE)
    assert not any(run.analysis("ceil").root.glob("*/ceiling.json"))


@pytest.mark.slow
def test_analyze_cross_ablates_each_category_circuit_at_its_evaluated_size(capsys: pytest.CaptureFixture[str],
                                                                           tiny_run) -> None:
    """`analyze --stage cross` on the fit's analysis: a matrix per method over every category, each circuit at
    the size its own evaluation record says reaches faithfulness 0.8 (else the n_nodes fallback)."""
    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr
    run = RunLayout(run_dir)
    fitted = run.epoch(2)
    done = cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--stage", "cross", "--name", "cross",
                          "--source", fitted.root.name, "--analysis.cross_ablation.n_nodes", "3",
                          "--analysis.cross_ablation.bootstrap", "100")
    assert done.returncode == 0, done.stderr
    discovery = load_discovery(run.analysis("cross"))
    for method in discovery.circuits:
        layout = run.analysis("cross").method(method)
        record = json.loads(layout.cross_ablation_json.read_text(encoding="utf-8"))
        assert len(record["categories"]) == 10 and len(record["ablation"]) == 10
        assert all(len(row) == 10 for row in record["ablation"]) and layout.cross_ablation_png.is_file()
        evaluations = {r.name: r for r in load_evaluation(fitted, discovery, method)}
        for row in record["rows"]:
            keep = [c for c in evaluations[row["circuit"]].curves if c.scope == ALL_LAYERS and c.error_mode == "keep"]
            reached = keep[0].reaches["0.8"] if keep else None
            assert row["n_nodes"] == (3 if reached is None else reached), row


@pytest.mark.slow
def test_analyze_refuses_an_existing_name_and_a_directory_fit_did_not_write(
    capsys: pytest.CaptureFixture[str], tiny_run, tmp_path: Path
) -> None:
    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr
    fitted = RunLayout(run_dir).epoch(2)
    before = tree_hashes(fitted.root)
    error = one_line_error(cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--name", "epoch_002"))
    assert f"{fitted.root} exists already" in error and "--name" in error
    assert tree_hashes(fitted.root) == before
    error = one_line_error(cli_in_process(capsys, "analyze", "--run_dir", str(tmp_path), "--stage", "evaluate"))
    assert f"{tmp_path / 'config.yaml'} not found" in error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_d_in_that_does_not_match_the_cache(
    capsys: pytest.CaptureFixture[str], tiny_args: list[str], tmp_path: Path
) -> None:
    error = one_line_error(cli_in_process(capsys, "fit", *tiny_args, "--run_dir", str(tmp_path), "--model.sae.d_in", "64"))
    assert "model.sae.d_in=64 but the activation cache" in error and "set model.sae.d_in: 32" in error


@pytest.mark.slow
def test_unknown_config_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("data:\n  prompts:\n    sorce: sample\n")
    assert "does not accept option 'data.prompts.sorce'" in one_line_error(cli("fit", "--config", str(config)))


def test_bad_option_value(capsys: pytest.CaptureFixture[str]) -> None:
    error = one_line_error(cli_in_process(capsys, "fit", "--config", str(DEFAULT_CONFIG), "--data.prompts.balance", "some"))
    assert '"data.prompts.balance"' in error and "some" in error


@pytest.mark.slow
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--data.prompts.source", "no/such/dir", "data.prompts.source: directory 'no/such/dir' not found"),
        ("--data.prompts.categories", "[hate, weapons]", "unknown category 'weapons'"),
    ],
)
def test_bad_data_input_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, option: str, value: str, message: str
) -> None:
    error = one_line_error(cli_in_process(capsys, "fit", "--config", str(DEFAULT_CONFIG), "--run_dir", str(tmp_path), option, value))
    assert message in error
    assert not (tmp_path / "data" / "prompts.csv").exists()


@pytest.mark.slow
def test_bad_csv_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write_csv(tmp_path / "src" / "or-bench-toxic.csv", [{"prompt": "x", "topic": "hate"}], ("prompt", "topic"))
    result = cli_in_process(capsys, "fit", "--config", str(DEFAULT_CONFIG), "--run_dir", str(tmp_path / "run"),
                 "--data.prompts.source", str(tmp_path / "src"))
    assert "or-bench-toxic.csv: missing column 'category' (columns found: prompt, topic)" in one_line_error(result)


@pytest.mark.slow
def test_compare_methods_config_composes_with_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    result = cli_in_process(capsys, "fit", "--config", str(DEFAULT_CONFIG), "--config",
                            str(ROOT / "configs" / "compare-methods.yaml"), "--print_config")
    assert result.returncode == 0, result.stderr
    assert "- attribution" in result.stdout and "edge_nodes: 20" in result.stdout
    # the list replaced, not appended
    assert result.stdout.count("class_path: callbacks.CircuitAnalysisCallback") == 1
    assert result.stdout.count("class_path: lightning_modules.RunDirCheckpoint") == 1


@pytest.mark.slow
def test_an_analysis_failure_keeps_the_last_epoch(tiny_args: list[str], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Sizes the circuits cannot have fail the analysis at the last epoch: the checkpoint of that epoch and
    the SAEs are written all the same, and `fit` ends with the error in one line, exit status 2."""
    bad = tmp_path / "bad_sizes.yaml"
    bad.write_text(TINY_CALLBACKS.replace("evaluation: {", "evaluation: {sizes: [1000000], "))
    result = cli_in_process(capsys, "fit", *tiny_args, "--config", str(bad), "--run_dir", str(tmp_path / "run"))
    assert "circuit analysis of epoch 2 failed: evaluation.sizes: [1000000] outside" in one_line_error(result)
    run = RunLayout(tmp_path / "run")
    assert all((run.saes / layer / "sae.safetensors").is_file() for layer in ("residuals_0", "residuals_1"))
    last = torch.load(run.checkpoints / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1  # the second (last) epoch, 0-based
    assert not run.latest.root.exists()  # no analysis was completed


@pytest.mark.slow
def test_analyze_edit_judges_each_circuit_by_its_answers(capsys: pytest.CaptureFixture[str], tiny_run) -> None:
    """`analyze --stage edit` writes per category circuit the answers and refusal rates under every edit, with
    the circuit at its evaluated size; bad options are one line naming the option."""
    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr
    run = RunLayout(run_dir)
    fitted = run.epoch(2)
    options = ["--source", fitted.root.name, "--analysis.editing.categories", "[deception, illegal]",
               "--analysis.editing.random_circuits", "1", "--analysis.editing.max_new_tokens", "3",
               "--analysis.editing.strengths", "[0.0]", "--analysis.editing.bootstrap", "100"]
    done = cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--stage", "edit", "--name", "edit", *options)
    assert done.returncode == 0, done.stderr
    discovery = load_discovery(run.analysis("edit"))
    for method in discovery.circuits:
        sizes = faithful_sizes(load_evaluation(fitted, discovery, method))
        for category in ("deception", "illegal"):
            record = run.analysis("edit").method(method).read_edits(CategoryEdits, category)
            n = sizes.get(category) or 30
            c = f"C{record.size}"
            assert [o.edit for o in record.outcomes] == ["model", f"ablate {c}", f"keep {c}", f"random0 {c}",
                                                         f"ablate {c} cf", f"keep {c} cf", f"random0 {c} cf",
                                                         f"scale0 {c}"]
            assert len(record.donors) == len(record.prompts) and "matched by length" in record.counterfactual
            assert record.size == n or record.size_reason.startswith("editing.n_nodes")
            for o in record.outcomes:
                assert len(o.answers) == len(record.prompts) == o.toxic.n + o.hard.n
                assert o.toxic.n == record.n_toxic
    summary = run.analysis("edit").summary_md.read_text()
    assert "refusal rate of the answers under each edit" in summary
    # beside F, the results table says what ablating and keeping each circuit did to the answers; a later
    # summary taking this analysis as its source reads the records back
    record = run.analysis("edit").method(method).read_edits(CategoryEdits, "illegal")
    cell = circuit_answers(record)
    assert cell.startswith(f"unedited {record.outcome('model').toxic.refused}/{record.n_toxic}, ")
    assert f"ablate C{record.size} " in cell and f"keep C{record.size} cf " in cell
    assert f"| {cell} |" in summary
    again = cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--stage", "summary", "--source", "edit",
                           "--name", "summary_of_edit")
    assert again.returncode == 0, again.stderr
    assert edits_table({method: [record]}).split("\n", 4)[4] in run.analysis("summary_of_edit").summary_md.read_text()
    for option, value, name in (("categories", "[nowhere]", "editing.categories"),
                                ("strengths", "[strong]", "strengths"),
                                ("max_new_tokens", "0", "editing.max_new_tokens"),
                                ("sizes", "[100000]", "editing.sizes")):
        error = one_line_error(cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--stage", "edit",
                                              "--source", fitted.root.name, f"--analysis.editing.{option}", value,
                                              "--analysis.editing.categories", value if option == "categories"
                                              else "[deception]"))
        assert name in error, error


@pytest.mark.slow
def test_analyze_under_a_protocol_stamps_every_record_and_refuses_departures(
    capsys: pytest.CaptureFixture[str], tiny_run, tmp_path: Path
) -> None:
    """`analyze --protocol`: the protocol's options apply, every JSON record carries the file's sha256, the summary
    names it; an option departing from it, a source analysis under no (or another) protocol: one line, exit 2."""
    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr
    run = RunLayout(run_dir)
    text = ("protocol: {name: tiny, version: 1}\nstatement: the test's rules\n"
            "analysis: {evaluation: {n_sizes: 3, fractions: [0.5, 1.0], random_circuits: 2}}\n")
    protocol = tmp_path / "tiny-v1.yaml"
    protocol.write_text(text, encoding="utf-8")
    sha = hashlib.sha256(protocol.read_bytes()).hexdigest()

    def analyze(*args: str) -> Any:
        return cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--protocol", str(protocol), *args)

    found = analyze("--stage", "discover", "--name", "p_discover")
    assert found.returncode == 0, found.stderr
    assert f"protocol: tiny v1 (sha256 {sha[:12]}) from {protocol}" in found.stdout
    unstamped = one_line_error(analyze("--stage", "evaluate", "--name", "p_bad", "--source", run.epoch(2).name))
    assert f"--source {run.epoch(2).name}: made under protocol none" in unstamped and "tiny v1" in unstamped
    departing = one_line_error(analyze("--stage", "evaluate", "--name", "p_bad", "--source", "p_discover",
                                       "--analysis.evaluation.random_circuits", "5"))
    assert "analysis.evaluation.random_circuits: 5 (protocol: 2) departs from protocol tiny v1" in departing
    assert not run.analysis("p_bad").root.exists()
    done = analyze("--stage", "evaluate", "--name", "p_evaluate", "--source", "p_discover")
    assert done.returncode == 0, done.stderr
    out = run.analysis("p_evaluate")
    records = [p for p in out.root.rglob("*.json")
               if p.parent.name != "circuits" and p.name not in ("protocol.json", "invocation.json")]
    assert {p.name for p in records} >= {"discovery.json", "summary.json"} and len(records) > 10
    for path in records:
        assert json.loads(path.read_text(encoding="utf-8"))["protocol"]["sha256"] == sha, path
    assert (out.summary_md.read_text(encoding="utf-8").splitlines()[0]
            == f"protocol: tiny v1 (sha256 {sha[:12]}) from {protocol}")
    discovery = load_discovery(out)
    cfg = fitted_evaluation(run, n_sizes=3, fractions=[0.5, 1.0], random_circuits=2)
    for record in load_evaluation(out, discovery, "correlation"):
        assert_curves_follow(record, cfg, discovery.means.layers)
    protocol.write_text(text.replace("version: 1", "version: 2"), encoding="utf-8")  # another protocol now
    other = one_line_error(analyze("--stage", "evaluate", "--name", "p_v2", "--source", "p_discover"))
    assert "made under protocol tiny v1" in other and "this analysis under tiny v2" in other


@pytest.mark.slow
def test_an_interrupted_analysis_is_finished_by_resume_as_if_never_stopped(
    capsys: pytest.CaptureFixture[str], tiny_run
) -> None:
    """`analyze` killed (SIGKILL) after its first circuit's record: `--resume` finishes it from its own record of
    what it was asked (no option may be given again), reads the finished records back untouched, and ends with the
    same records, byte for byte, as an analysis never interrupted; a complete one is not resumed."""
    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr
    run = RunLayout(run_dir)
    options = ["--stage", "evaluate", "--source", run.epoch(2).name, "--analysis.evaluation.random_circuits", "20",
               "--analysis.evaluation.n_sizes", "12"]
    out = run.analysis("stopped")
    process = subprocess.Popen([sys.executable, "-m", "refusal_sae", "analyze", "--run_dir", str(run_dir),
                                "--name", "stopped", *options], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    records = out.root / "correlation" / "evaluation"
    deadline = time.monotonic() + 300
    while not list(records.glob("*.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()
    assert process.wait() != 0, "the analysis finished before it could be interrupted"
    first = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert 1 <= len(first) < 10 and not out.complete
    unfinished = one_line_error(cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--stage", "summary",
                                               "--source", "stopped"))
    assert "--source stopped: unfinished" in unfinished and "--resume stopped" in unfinished  # not a partial summary
    refused = one_line_error(cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--resume", "stopped",
                                            "--stage", "all"))
    assert "--stage given; an analysis is finished as it was started" in refused
    done = cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--resume", "stopped")
    assert done.returncode == 0, done.stderr
    assert out.complete and len(list(records.glob("*.json"))) == 10
    assert {name: (records / name).stat().st_mtime_ns for name in first} == first  # read back, not rewritten
    fresh = cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--name", "unstopped", *options)
    assert fresh.returncode == 0, fresh.stderr
    for path in records.iterdir():
        assert path.read_bytes() == (run.analysis("unstopped").root / "correlation" / "evaluation" / path.name
                                     ).read_bytes(), path.name
    again = one_line_error(cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--resume", "stopped"))
    assert "is complete already" in again
    exists = one_line_error(cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--name", "stopped",
                                           *options))
    assert "--resume stopped" in exists


@pytest.mark.slow
def test_resume_of_an_analysis_started_before_any_latest(capsys: pytest.CaptureFixture[str], tiny_run,
                                                        tmp_path: Path) -> None:
    """A run fitted without epoch analyses has no `analysis/latest`: an analysis started there records its source
    as `latest`, and `--resume` must still finish it (it used to refuse `latest` as a folder name)."""
    import shutil

    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True, ignore=shutil.ignore_patterns(".lock", "analysis"))
    started = cli_in_process(capsys, "analyze", "--run_dir", str(copy), "--stage", "discover", "--name", "cut")
    assert started.returncode == 0, started.stderr
    out = RunLayout(copy).analysis("cut")
    assert out.read_invocation()["source"] == "latest"
    (out.root / "complete").unlink()  # as if killed between its last record and its marker
    done = cli_in_process(capsys, "analyze", "--run_dir", str(copy), "--resume", "cut")
    assert done.returncode == 0, done.stderr
    assert out.complete


@pytest.mark.slow
def test_analyze_refuses_prompts_or_a_model_changed_since_fit_unless_allowed(capsys: pytest.CaptureFixture[str],
                                                                             tiny_run, tmp_path: Path) -> None:
    """#30 case 1: `data/prompts.csv` edited (a label flipped), or the run's model directory replaced by a copy (other
    files, other path), after `fit`: `analyze` names what changed in one line instead of analysing a mixture;
    `--allow_changed` analyses anyway and the analysis records it."""
    import shutil

    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True, ignore=shutil.ignore_patterns(".lock", "analysis"))
    run = RunLayout(copy)
    text = run.prompts_csv.read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    rows[0]["refusal_label"] = str(rows[0]["refusal_label"] != "True")
    with open(run.prompts_csv, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    options = ["analyze", "--run_dir", str(copy), "--stage", "discover"]
    error = one_line_error(cli_in_process(capsys, *options, "--name", "edited"))
    assert "the prompts changed since `fit` cached the run's activations (prompts_sha256)" in error, error
    assert "--allow_changed '[prompts]'" in error and not run.analysis("edited").root.exists()
    allowed = cli_in_process(capsys, *options, "--name", "allowed", "--allow_changed", "[prompts]")
    assert allowed.returncode == 0, allowed.stderr
    assert run.analysis("allowed").read_invocation()["allow_changed"] == ["prompts"]
    run.prompts_csv.write_text(text, encoding="utf-8")  # restored: only the model differs now
    config = yaml.safe_load(run.config.read_text(encoding="utf-8"))
    model = Path(shutil.copytree(config["data"]["model"]["name"], tmp_path / "model"))
    config["data"]["model"]["name"] = str(model)
    run.config.write_text(yaml.safe_dump(config), encoding="utf-8")
    error = one_line_error(cli_in_process(capsys, *options, "--name", "moved"))
    assert "the model changed since `fit` cached the run's activations (model.name)" in error, error
    moved = cli_in_process(capsys, *options, "--name", "moved_allowed", "--allow_changed", "[model]")
    assert moved.returncode == 0, moved.stderr


@pytest.mark.slow
def test_two_analyses_started_at_once_never_share_a_folder(tiny_run) -> None:
    """Two `analyze` processes without --name, started together, pick the same next name; the one that does not
    create the folder first takes the next one, so each writes a folder of its own, complete."""
    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr
    run = RunLayout(run_dir)
    before = set(p.name for p in run.analysis_root.iterdir())
    command = [sys.executable, "-m", "refusal_sae", "analyze", "--run_dir", str(run_dir), "--stage", "summary",
               "--source", run.epoch(2).name]
    processes = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    made = sorted(set(p.name for p in run.analysis_root.iterdir()) - before)
    assert len(made) == 2 and all(run.analysis(name).complete for name in made)
    assert {line for out, _ in outputs for line in out.splitlines() if line.startswith("circuits in ")} == {
        f"circuits in {run.analysis(name).root}" for name in made}


@pytest.mark.slow
def test_analyze_tradeoff_sweeps_three_methods_and_chooses_per_method(capsys: pytest.CaptureFixture[str],
                                                                         tiny_run, browser) -> None:
    """`analyze --stage tradeoff` judges every point of the three sweeps by the answers, writes the record, its
    tables and figure, puts the table in the summary and applies each method's choice to the transfer set; the
    report shows them in a browser; a strength outside its range is one line naming the option."""
    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr
    run = RunLayout(run_dir)
    with_hard = sorted({s.category for s in read_splits(run.prompts_csv)["evaluation"] if s.dataset_type == "hard"})
    assert len(with_hard) >= 3, with_hard
    options = ["--source", run.epoch(2).name, "--analysis.tradeoff.layer", "residuals_1",
               "--analysis.tradeoff.categories", f"[{', '.join(with_hard[:3])}]",  # three with hard held-out prompts
               "--analysis.tradeoff.feature_sizes", "[2]", "--analysis.tradeoff.direction_strengths", "[1.0]",
               "--analysis.tradeoff.direction_subtract", "[]", "--analysis.tradeoff.orthogonalisation", "[1.0]",
               "--analysis.tradeoff.max_new_tokens", "2", "--analysis.tradeoff.bootstrap", "100"]
    done = cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--stage", "tradeoff", "--name", "tradeoff",
                          *options)
    assert done.returncode == 0, done.stderr
    out = run.analysis("tradeoff")
    record = out.read_tradeoff(TradeoffResult)
    assert [(p.method, p.setting) for p in record.points] == [
        ("unedited", "unedited"), ("features", "ablate 2"), ("features", "scale 0 x2"),
        ("refusal direction", "project out x1"), ("false-refusal vector", "orthogonal x1")]
    for p in record.points:
        assert len(p.answers) == len(record.prompts) == p.toxic.n + p.hard.n
        assert sum(c.toxic.n + c.hard.n for c in p.categories) == len(record.prompts)
    assert {c.method for c in record.chosen} == {"features", "refusal direction", "false-refusal vector"}
    assert record.transfer[0].setting == "unedited" and len(record.transfer_prompts) == 80
    assert out.tradeoff_png.is_file() and "Transfer" in out.tradeoff_json.with_suffix(".md").read_text()
    assert tradeoff_table(record) in out.summary_md.read_text()
    report = cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--stage", "report", "--source", "tradeoff",
                            "--name", "tradeoff_report")
    assert report.returncode == 0, report.stderr
    page = run.analysis("tradeoff_report").report_html.read_text()
    assert "Lowering over-refusal" in page and record.points[1].answers[0][:20] in page
    from selenium.webdriver.common.by import By

    open_page(browser, run.analysis("tradeoff_report").report_html)  # the panel as a reader sees it
    assert browser.find_element(By.XPATH, "//h2[text()='Lowering over-refusal']").is_displayed()
    figure = browser.find_element(By.XPATH, "//img[@alt='Toxic refusal against over-refusal, three edits swept']")
    assert figure.is_displayed() and browser.execute_script("return arguments[0].naturalWidth", figure) > 100
    cells = [td.text for td in browser.find_elements(By.XPATH, "//section//table//td")]
    for p in record.points:  # every point of the sweep is a row of the panel's table
        assert p.setting in cells, p.setting
    details = browser.find_element(By.XPATH, "//details[summary[text()=\"Every held-out answer under each method's "
                                             "chosen edit\"]]")
    details.find_element(By.TAG_NAME, "summary").click()
    rows = details.find_elements(By.XPATH, ".//tr[td]")
    assert len(rows) == len(record.prompts) and rows[0].is_displayed()
    error = one_line_error(cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--stage", "tradeoff",
                                          *options, "--analysis.tradeoff.direction_strengths", "[2.0]"))
    assert "tradeoff.direction_strengths: 2.0 is outside (0, 1]" in error, error
    error = one_line_error(cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--stage", "tradeoff",
                                          *options, "--analysis.tradeoff.categories", "null"))
    without = sorted({s.category for s in read_splits(run.prompts_csv)["evaluation"]} - set(with_hard))
    assert f"tradeoff.categories: {without} have no hard" in error and f"(here {with_hard})" in error, error


@pytest.mark.slow
def test_analyze_runs_a_models_own_code_only_when_its_command_line_asks(capsys: pytest.CaptureFixture[str], tiny_run,
                                                                        tmp_path: Path) -> None:
    """A run's config.yaml saying trust_remote_code: true (anyone who could write the run directory could have
    put it there) is not enough for analyze to run the model directory's code: its own command line must say so."""
    import shutil

    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
    config = yaml.safe_load((copy / "config.yaml").read_text(encoding="utf-8"))
    config["data"]["model"]["trust_remote_code"] = True
    (copy / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    source = RunLayout(run_dir).epoch(2).name
    error = one_line_error(cli_in_process(capsys, "analyze", "--run_dir", str(copy), "--stage", "summary",
                                          "--source", source, "--name", "refused"))
    assert "data.model.trust_remote_code is true" in error and "--trust_remote_code true" in error, error
    assert not (copy / "analysis" / "refused").exists()
    done = cli_in_process(capsys, "analyze", "--run_dir", str(copy), "--stage", "summary", "--source", source,
                          "--name", "trusted", "--trust_remote_code", "true")
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_a_refit_replaces_its_epoch_analysis_whole(tiny_args: list[str], tiny_run, tmp_path: Path) -> None:
    """A fit into a run that holds an earlier fit's analysis of the same epoch writes that folder anew: nothing of
    the earlier one (e.g. a category since dropped) stays beside the new records for the summary to read."""
    import shutil

    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
    circuits = RunLayout(copy).epoch(2).root / "correlation" / "circuits"
    stale = circuits / "dropped__all.json"
    stale.write_text(next(circuits.glob("*.json")).read_text(encoding="utf-8"), encoding="utf-8")
    again = cli("fit", *tiny_args, "--run_dir", str(copy))
    assert again.returncode == 0, again.stderr
    assert not stale.exists() and RunLayout(copy).epoch(2).complete


@pytest.mark.slow
def test_a_damaged_run_config_is_one_line_naming_it(capsys: pytest.CaptureFixture[str], tiny_run,
                                                     tmp_path: Path) -> None:
    """analyze reads the run's config.yaml: a YAML error there (or a file that is no mapping) names the file and the
    line instead of a traceback (#30 case 16)."""
    import shutil

    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True, ignore=shutil.ignore_patterns(".lock", "activations", "analysis"))
    (copy / "config.yaml").write_text("data:\n  model: [unclosed\n", encoding="utf-8")
    error = one_line_error(cli_in_process(capsys, "analyze", "--run_dir", str(copy), "--stage", "summary"))
    assert str(copy / "config.yaml") in error and "line" in error, error
    (copy / "config.yaml").write_text("- a list\n", encoding="utf-8")
    error = one_line_error(cli_in_process(capsys, "analyze", "--run_dir", str(copy), "--stage", "summary"))
    assert "not the mapping of options fit writes" in error, error


@pytest.mark.slow
def test_fit_with_every_layer_pretrained_trains_nothing_and_analyses_them(tiny_args: list[str], tiny_run,
                                                                            tmp_path: Path) -> None:
    """`model.pretrained` for every layer: no optimiser step, one epoch whose analysis judges the loaded SAEs (here the
    tiny run's own, so its circuits are that run's last analysis's, file for file), and the same SAEs in `saes/`."""
    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr
    given = {layer: {"path": str(run_dir / "saes" / layer)} for layer in ("residuals_0", "residuals_1")}
    copy = tmp_path / "run"
    done = cli("fit", *tiny_args, "--run_dir", str(copy), "--model.pretrained", json.dumps(given))
    assert done.returncode == 0, done.stderr
    run, theirs = RunLayout(copy), RunLayout(run_dir)
    assert torch.load(run.checkpoints / "last.ckpt", weights_only=True)["global_step"] == 0
    for layer in given:
        assert (run.saes / layer / "sae.safetensors").read_bytes() == (theirs.saes / layer / "sae.safetensors"
                                                                     ).read_bytes()
    assert run.epoch(1).complete and not run.epoch(2).root.exists()
    restored = SAEModule.load_from_checkpoint(run.checkpoints / "last.ckpt")  # the loaded SAEs, as loaded
    assert torch.equal(restored.saes["residuals_1"].W_dec, load_sae(theirs.saes / "residuals_1").W_dec)
    ours, last = (a.root / "correlation" / "circuits" for a in (run.epoch(1), theirs.epoch(2)))
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in last.iterdir())
    for path in ours.glob("*.json"):
        assert path.read_bytes() == (last / path.name).read_bytes(), path.name


@pytest.mark.slow
def test_fit_with_one_layer_pretrained_trains_only_the_other(tiny_args: list[str], tiny_run, tmp_path: Path) -> None:
    """A SAELens SAE given for residuals_1 is exported unchanged while residuals_0 trains exactly as without it (the
    same bytes as the tiny run's); the epoch-end analysis judges the loaded SAE (quality stage) like a trained one; a
    layer the run does not have is one line."""
    from safetensors.torch import save_file

    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr
    g = torch.Generator().manual_seed(0)
    saelens = tmp_path / "saelens"
    saelens.mkdir()
    weights = {"W_enc": torch.randn(32, 48, generator=g) / 4, "W_dec": torch.randn(48, 32, generator=g) / 4,
               "b_enc": torch.zeros(48), "b_dec": torch.zeros(32)}
    save_file(weights, saelens / "sae_weights.safetensors")
    (saelens / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": 32, "d_sae": 48, "apply_b_dec_to_input": True,
        "normalize_activations": "none", "metadata": {"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny"}}))
    copy = tmp_path / "run"
    done = cli("fit", *tiny_args, "--run_dir", str(copy), "--model.pretrained",
               json.dumps({"residuals_1": {"path": str(saelens)}}))
    assert done.returncode == 0, done.stderr
    run = RunLayout(copy)
    quality = {q["layer"]: q for q in json.loads(run.epoch(2).sae_quality_json.read_text(encoding="utf-8"))["layers"]}
    assert quality["residuals_1"]["l0"] > 8 and quality["residuals_1"]["fvu"] > 1  # the loaded ReLU SAE was judged
    assert (run.saes / "residuals_0" / "sae.safetensors").read_bytes() == (
        run_dir / "saes" / "residuals_0" / "sae.safetensors").read_bytes()
    loaded = load_sae(run.saes / "residuals_1")
    assert loaded.cfg.activation == "relu" and torch.equal(loaded.W_dec, weights["W_dec"])
    wrong = cli("fit", *tiny_args, "--run_dir", str(tmp_path / "wrong"), "--model.pretrained",
                json.dumps({"residuals_7": {"path": str(saelens)}}))
    assert one_line_error(wrong) and "model.pretrained: residuals_7 is not a layer of this run" in wrong.stderr


@pytest.mark.slow
def test_analyze_reads_a_saelens_sae_given_for_a_layer(capsys: pytest.CaptureFixture[str], tiny_run,
                                                      tmp_path: Path) -> None:
    """A SAELens directory given for one layer (`--analysis.saes`) is what every stage reads there: discovery's
    node means, the evaluation, the SAE quality stage and the report; the other layer keeps the run's SAE."""
    from safetensors.torch import save_file

    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr
    g = torch.Generator().manual_seed(0)
    saelens = tmp_path / "saelens"
    saelens.mkdir()
    save_file({"W_enc": torch.randn(32, 48, generator=g) / 4, "W_dec": torch.randn(48, 32, generator=g) / 4,
               "b_enc": torch.zeros(48), "b_dec": torch.zeros(32)}, saelens / "sae_weights.safetensors")
    (saelens / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": 32, "d_sae": 48, "apply_b_dec_to_input": True,
        "normalize_activations": "none", "metadata": {"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny"}}))
    given = json.dumps({"residuals_1": {"path": str(saelens)}})
    done = cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--name", "loaded", "--analysis.saes", given,
                          "--analysis.evaluation.n_sizes", "3", "--analysis.evaluation.random_circuits", "2")
    assert done.returncode == 0, done.stderr
    out = RunLayout(run_dir).analysis("loaded")
    means = load_discovery(out).means
    widths = {layer: means.features[layer].shape[-1] for layer in means.layers}
    assert widths == {"residuals_0": load_sae(run_dir / "saes" / "residuals_0").cfg.width, "residuals_1": 48}
    quality = {q["layer"]: q for q in json.loads(out.sae_quality_json.read_text(encoding="utf-8"))["layers"]}
    assert quality["residuals_1"]["l0"] > 8  # a ReLU SAE: as many latents as are positive, not the run's k
    assert len(load_evaluation(out, load_discovery(out), "correlation")) == 10 and out.report_html.is_file()
    mismatch = cli_in_process(capsys, "analyze", "--run_dir", str(run_dir), "--name", "wrong_layer",
                              "--analysis.saes", json.dumps({"residuals_0": {"path": str(saelens)}}))
    assert one_line_error(mismatch) and "trained for layer='residuals_1' but 'residuals_0'" in mismatch.stderr
