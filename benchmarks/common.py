"""What every benchmark shares: the machine's description, repeated timing, and the report."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from refusal_sae.io import write_json


def machine() -> dict[str, Any]:
    """Where the numbers were measured: CPU, threads, GPU, library versions."""
    import lightning
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
    }


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
    columns = list(rows[0])
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns]
    print(f"\n{name}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(w) for c, w in zip(columns, widths)))
    if out:
        write_json(Path(out), result)
    else:
        print(json.dumps(extra, indent=1))
    return result


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
