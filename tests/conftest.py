"""Shared fixtures: paths to the real OR-Bench subset and small CSV writers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORBENCH_DIR = ROOT.parent / "shared" / "data" / "or-bench"


@pytest.fixture
def orbench_dir() -> Path:
    """The real OR-Bench hard-1k and toxic files shipped beside the project (never copied into it)."""
    if not (ORBENCH_DIR / "or-bench-toxic.csv").is_file():
        pytest.skip(f"real OR-Bench data not found at {ORBENCH_DIR}")
    return ORBENCH_DIR


def write_csv(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = ("prompt", "category")) -> Path:
    """Write an OR-Bench-style CSV made in the test."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path
