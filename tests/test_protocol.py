"""A pre-registered protocol: read, checked option by option against the analysis config, and stamped."""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

import pytest

from refusal_sae.analysis import AnalysisConfig
from refusal_sae.errors import UserError
from refusal_sae.protocol import departures, read_protocol
from tests.conftest import ROOT

PROTOCOLS = sorted((ROOT / "configs" / "protocols").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("path", PROTOCOLS, ids=[p.name for p in PROTOCOLS])
def test_committed_protocols_name_only_options_the_analysis_has(path: Path) -> None:
    """Every option a committed protocol fixes exists (a typo would fix nothing), its file name says its version,
    and its stamp is the sha256 of its bytes."""
    stamp, fixed = read_protocol(path)
    off = departures(fixed, asdict(AnalysisConfig()))
    assert not [d for d in off if "no such option" in d], off
    assert path.stem == f"{stamp.name}-v{stamp.version}"
    assert stamp.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_departures_compare_nested_values_as_json_holds_them() -> None:
    resolved = asdict(AnalysisConfig())
    assert departures({"evaluation": {"fractions": list(resolved["evaluation"]["fractions"]), "bootstrap": 2000.0}},
                      resolved) == []
    assert departures({"evaluation": {"random_circuits": 20, "seed": 0}}, resolved) == [
        "analysis.evaluation.random_circuits: 5 (protocol: 20)"]
    assert departures({"evaluation": {"random_circuit": 20}}, resolved) == [
        "analysis.evaluation.random_circuit: no such option (protocol: 20)"]


@pytest.mark.parametrize(("text", "says"), [
    ("protocol: {name: x, version: 1}\nanalysis: {metric: {}}\n", "exactly the keys protocol, statement, analysis"),
    ("protocol: {name: x, version: 0}\nstatement: s\nanalysis: {a: 1}\n", "protocol.version must be a whole number"),
    ("protocol: {name: '', version: 1}\nstatement: s\nanalysis: {a: 1}\n", "protocol.name must be a non-empty"),
    ("protocol: {name: x, version: 1}\nstatement: ' '\nanalysis: {a: 1}\n", "statement must be the protocol's text"),
    ("protocol: {name: x, version: 1}\nstatement: s\nanalysis: {}\n", "analysis must map the options"),
    ("protocol: [\n", "not valid YAML"),
])
def test_a_file_that_is_no_protocol_is_one_line_naming_it(tmp_path: Path, text: str, says: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserError, match=says) as e:
        read_protocol(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_missing_protocol_file_says_where_protocols_live(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--protocol .*nope.yaml: No such file.*configs/protocols"):
        read_protocol(tmp_path / "nope.yaml")
