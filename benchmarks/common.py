"""What every benchmark shares: the machine's description, repeated timing, and the report."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from refusal_sae.io import write_json


def machine() -> dict[str, Any]:
    """Where the numbers were measured: CPU, memory, threads, GPU, library versions."""
    from importlib.metadata import PackageNotFoundError, version

    import lightning
    import psutil
    import transformers

    try:
        sparsify = version("eai-sparsify")
    except PackageNotFoundError:
        sparsify = None
    return {
        "platform": platform.platform(),
        "processor": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "eai_sparsify": sparsify,
    }


def describe(m: dict[str, Any]) -> str:
    """One line for a table's caption: what `machine()` found."""
    where = m["gpu"] or f"no GPU, {m['cpu_count']} CPU cores ({m['cpu_threads']} torch threads)"
    return (f"{where}, {m['processor']}, {m['memory_gib']} GiB; torch {m['torch']}, "
            f"transformers {m['transformers']}, lightning {m['lightning']}, eai-sparsify {m['eai_sparsify']}")


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` unmeasured runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(name: str, rows: list[dict[str, Any]], extra: dict[str, Any], out: str | None) -> dict[str, Any]:
    """Print `rows` as a table and write everything as JSON to `out` (if given)."""
    result = {"benchmark": name, "machine": machine(), **extra, "rows": rows}
    print(f"\n{name}\n{table(rows)}")
    if out:
        write_json(Path(out), result)
    else:
        print(json.dumps(extra, indent=1))
    return result


def table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """`rows` (dicts with the same keys) as aligned plain text, or as a Markdown table."""
    columns = list(rows[0])
    cells = [columns, *([_fmt(r[c]) for c in columns] for r in rows)]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join([lines[0], "|" + "---|" * len(columns), *lines[1:]])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
