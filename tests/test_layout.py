"""The run layout owns every path of a run directory, and its records round-trip typed."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from refusal_sae.errors import UserError
from refusal_sae.io import from_json, to_json
from refusal_sae.layout import RunLayout
from refusal_sae.stats import Interval

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("refusal_sae", "lightning_modules", "datamodules", "callbacks")
OWN_FORMATS = {
    "refusal_sae/layout.py": "the run layout itself",
    "refusal_sae/activations.py": "the activation cache's own files (the cache may live outside the run)",
    "refusal_sae/sae.py": "an SAE checkpoint's own files (sparsify's format)",
    "refusal_sae/sae_io.py": "an SAE checkpoint's own files (sparsify's format)",
    "refusal_sae/embedded.py": "the embedded model's user cache",
    "refusal_sae/cpu_kernels.py": "the compiled kernels' user cache",
    "refusal_sae/io.py": "the user cache's root (cache_root)",
    "refusal_sae/loading.py": "a model directory's own files",
    "refusal_sae/model.py": "a model directory's own files",
}


def path_literals(source: str) -> list[tuple[int, str]]:
    """Strings joined onto a path: `x / "name"`, `x / NAME` with `NAME = "name"` at module level,
    `os.path.join(x, "name")`, and names passed to a writer (`write(out_dir, "report")`)."""
    tree = ast.parse(source)
    constants = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                 for t in node.targets if isinstance(t, ast.Name)}

    def string(node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return constants.get(node.id) if isinstance(node, ast.Name) else None

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            found += [(node.lineno, v) for v in map(string, (node.left, node.right)) if v is not None]
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "join" and \
                getattr(getattr(node.func, "value", None), "attr", None) == "path":
            found += [(node.lineno, v) for v in map(string, node.args) if v is not None]
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "write":
            found += [(node.lineno, v) for v in map(string, node.args) if v is not None]
    return found


def test_no_module_outside_the_layout_spells_a_run_path() -> None:
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in OWN_FORMATS:
                continue
            offenders += [f"{rel}:{line}: {value!r}" for line, value in path_literals(path.read_text())]
    assert not offenders, "run paths spelled outside refusal_sae/layout.py:\n" + "\n".join(offenders)


def test_the_check_finds_what_it_looks_for() -> None:
    source = ('import os\nfrom pathlib import Path\nRANKS = "saes_by_rank"\na = Path(x) / "saes"\n'
              'b = os.path.join(y, "prompts.csv")\nc = root / RANKS\nDataAnalyzer(s).write(out, "data_report")\n')
    assert sorted(path_literals(source)) == [(4, "saes"), (5, "prompts.csv"), (6, "saes_by_rank"),
                                             (7, "data_report")]


@dataclass
class Record:
    name: str
    estimate: Interval
    optional: Interval | None
    per_layer: dict[str, int]
    points: list[Interval]


def test_records_round_trip_typed_and_nan_becomes_null() -> None:
    record = Record("a", Interval(1.0, float("nan"), 2.0), None, {"residuals_0": 3},
                    [Interval(np.float64(0.5), 0.1, 0.9)])
    data = to_json(record)
    assert data["estimate"]["low"] is None and isinstance(data["points"][0]["value"], float)
    back = from_json(Record, data)
    assert back.points == [Interval(0.5, 0.1, 0.9)] and back.optional is None
    assert np.isnan(back.estimate.low) and back.per_layer == {"residuals_0": 3}


def test_analysis_names_are_plain_and_latest_is_repointed(tmp_path: Path) -> None:
    run = RunLayout(tmp_path)
    for bad in ("", "a/b", "..", "latest", "n" * 101):  # 300 characters were a traceback (file name too long)
        with pytest.raises(UserError, match="give a plain directory name"):
            run.analysis(bad)
    first, second = run.epoch(1), run.epoch(2)
    for a in (first, second):
        a.root.mkdir(parents=True)
        run.point_latest(a)
        assert run.latest.root.resolve() == a.root.resolve()
    assert first.name == "epoch_001"
    # category names with dots or slashes get distinct files
    method = first.method("correlation")
    paths = {method.circuit_paths(n)[0] for n in ("grp.hate", "grp.harass", "grp/toxic")}
    assert len(paths) == 3 and all(p.parent == method.root / "circuits" for p in paths)


def test_a_category_name_with_a_bar_or_a_line_break_stays_one_table_cell() -> None:
    """summary.md's tables: a `|` in a category name is escaped and a line break becomes a space, so the row keeps
    its columns (a raw `|` would add one, a newline would end the row)."""
    from refusal_sae.analysis import results_table
    from refusal_sae.evaluation import ALL_LAYERS, CircuitEvaluation, Curve, Sanity
    from refusal_sae.stats import Interval

    zero = Interval(0.0, 0.0, 0.0)
    curve = Curve(ALL_LAYERS, "keep", 50, zero, zero, None, [], None, None, None, {"0.5": None, "0.8": None})
    record = CircuitEvaluation("self|harm\nx", "self|harm\nx", "all", "m", "toxic", 1, 1, zero, [curve],
                               Sanity(None, None, None, None, False, "not applicable", "not applicable", None, []))
    rows = [line for line in results_table({"m": [record]}).splitlines() if line.startswith("| self")]
    assert len(rows) == 1 and "self\\|harm x" in rows[0]
    header = next(line for line in results_table({"m": [record]}).splitlines() if line.startswith("| circuit"))
    assert rows[0].replace("\\|", "").count("|") == header.count("|")
