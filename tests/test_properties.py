"""Property tests (hypothesis) of the two places where arbitrary user text becomes structure: the prompts CSV
reader and the rule that turns category names into file names. Either a dataset that round-trips or one clear
error, never a traceback; distinct accepted names never share a file, and every file they name can be written."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refusal_sae.circuits import GROUPS
from refusal_sae.data import _category_problem, read_orbench_csv
from refusal_sae.errors import UserError
from refusal_sae.io import atomic_open
from refusal_sae.layout import AnalysisLayout

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,  # the same examples on every run and in CI
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def read(tmp_path: Path, data: bytes):
    path = tmp_path / "or-bench-toxic.csv"
    path.write_bytes(data)
    return read_orbench_csv(path, "toxic")


@SETTINGS
@given(data=st.binary(max_size=300))
def test_any_bytes_are_a_dataset_or_one_clear_error(tmp_path: Path, data: bytes) -> None:
    try:
        samples = read(tmp_path, b"prompt,category\n" + data)
    except UserError as e:
        assert "\n" not in str(e) and str(tmp_path) in str(e)
    else:
        assert samples and all(s.prompt and s.category for s in samples)


@SETTINGS
@given(rows=st.lists(st.tuples(st.text(max_size=40), st.text(max_size=20)), min_size=1, max_size=6))
def test_rows_written_by_a_csv_writer_round_trip_or_are_refused_with_their_line(tmp_path: Path,
                                                                                rows: list[tuple[str, str]]) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["prompt", "category"])
    writer.writerows(rows)
    expected = [(p.strip(), c.strip()) for p, c in rows]
    bad = next((i for i, (p, c) in enumerate(expected) if not p or not c or _category_problem(c)), None)
    try:
        samples = read(tmp_path, buffer.getvalue().encode("utf-8"))
    except UserError as e:
        assert bad is not None, f"a valid file refused: {e}"
        assert "\n" not in str(e) and "line" in str(e)
    else:
        assert bad is None, f"row {bad} accepted: {rows[bad]!r}"
        assert [(s.prompt, s.category) for s in samples] == expected


@SETTINGS
@given(categories=st.lists(st.one_of(st.text(min_size=1, max_size=90),  # any text, and long names of wide characters
                                     st.text(st.characters(min_codepoint=0x1F600, max_codepoint=0x1F64F), min_size=40,
                                             max_size=80)), min_size=2, max_size=4, unique=True))
def test_accepted_category_names_name_distinct_files_that_can_be_written(tmp_path: Path,
                                                                         categories: list[str]) -> None:
    accepted = [c for c in categories if c.strip() == c and _category_problem(c) is None]
    method = AnalysisLayout(tmp_path / "analysis").method("attribution")
    paths: dict[Path, str] = {}
    for category in accepted:
        for group in GROUPS:
            name = f"{category}/{group}"
            for path in (*method.circuit_paths(name), *method.evaluation_paths(name), method.export_path(name),
                         method.edits_json(name)):
                assert paths.setdefault(path, name) == name, f"{name!r} and {paths[path]!r} share {path.name}"
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_open(path, "w", encoding="utf-8") as f:  # the writer every record goes through
                    f.write(name)
                assert path.read_text(encoding="utf-8") == name
