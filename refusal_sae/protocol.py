"""A pre-registered analysis protocol: the options and decision rules fixed before a run, and the stamp every record
of an analysis under it carries.

A protocol file is YAML with three keys:

    protocol:  {name: orbench, version: 1}
    statement: the prose: the question, what each verdict and check means, what a failed check does to the claims
    analysis:  the analysis options it fixes (any subset of `AnalysisConfig`, nested as in a --config file)

`analyze --protocol FILE` applies `analysis` and refuses any option that departs from it, so a result is either under
the protocol or visibly not: a changed protocol is a new version (a new file), never an override. Options the file
does not name (batch sizes, which categories the edit stage covers) stay free: they change speed or coverage, not
what a number means. The stamp is the file's name, version and the sha256 of its bytes; an analysis without a
protocol is stamped null (exploratory).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from refusal_sae.errors import UserError
from refusal_sae.io import to_json

KEYS = ("protocol", "statement", "analysis")


@dataclass(frozen=True)
class ProtocolStamp:
    """What identifies a protocol in the records: change one byte of the file and the sha256 differs."""

    name: str
    version: int
    sha256: str
    path: str

    def label(self) -> str:
        return f"{self.name} v{self.version} (sha256 {self.sha256[:12]})"


def read_protocol(path: str | Path) -> tuple[ProtocolStamp, dict[str, Any]]:
    """The protocol's stamp and the analysis options it fixes; a UserError naming the file and field when it is not
    a protocol."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"--protocol {path}: {e.strerror}; give the path of a protocol file "
                        "(configs/protocols/*.yaml)") from e
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from e
    if not isinstance(doc, dict) or sorted(doc) != sorted(KEYS):
        found = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise UserError(f"{path}: a protocol file has exactly the keys {', '.join(KEYS)}; found {found}")
    head, statement, analysis = doc["protocol"], doc["statement"], doc["analysis"]
    if not isinstance(head, dict) or not isinstance(head.get("name"), str) or not head["name"]:
        raise UserError(f"{path}: protocol.name must be a non-empty string; found {head!r}")
    version = head.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{path}: protocol.version must be a whole number >= 1; found {version!r}")
    if not isinstance(statement, str) or not statement.strip():
        raise UserError(f"{path}: statement must be the protocol's text (what each verdict and check means)")
    if not isinstance(analysis, dict) or not analysis:
        raise UserError(f"{path}: analysis must map the options the protocol fixes; found {analysis!r}")
    return ProtocolStamp(head["name"], version, hashlib.sha256(raw).hexdigest(), str(path)), analysis


def departures(fixed: dict[str, Any], resolved: dict[str, Any], prefix: str = "analysis") -> list[str]:
    """`option: resolved value (protocol: fixed value)` for every option of `fixed` whose value in `resolved` (the
    analysis config as a plain dict) differs; an option the config does not have is a departure too."""
    out = []
    for key, want in fixed.items():
        name = f"{prefix}.{key}"
        if key not in resolved:
            out.append(f"{name}: no such option (protocol: {want!r})")
        elif isinstance(want, dict) and isinstance(resolved[key], dict):
            out += departures(want, resolved[key], name)
        elif _plain(resolved[key]) != _plain(want):
            out.append(f"{name}: {resolved[key]!r} (protocol: {want!r})")
    return out


def _plain(value: Any) -> Any:
    """`value` as JSON would hold it (tuples as lists, 1.0 == 1), so equal settings compare equal."""
    return json.loads(json.dumps(to_json(value)))


__all__ = ["ProtocolStamp", "departures", "read_protocol"]
