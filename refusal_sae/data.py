"""Stage 1 of the pipeline: OR-Bench prompts, loaded, analysed, balanced and split.

OR-Bench (Cui et al. 2025, `bench-llm/or-bench`) ships three CSV files with columns `prompt,category`:

| file                   | dataset_type | refusal_label | meaning                                  |
|------------------------|--------------|---------------|------------------------------------------|
| `or-bench-80k.csv`     | `safe_80k`   | False         | safe prompts                             |
| `or-bench-hard-1k.csv` | `hard`       | False         | safe prompts that look toxic             |
| `or-bench-toxic.csv`   | `toxic`      | True          | toxic prompts a safe model should refuse |

Circuits are only comparable across categories if no category or label dominates, so prompts are
balanced per category (the spec's "use_all" strategy keeps every toxic prompt and matches it with as
many safe ones) and split into a *discovery* split (circuits are found there) and a held-out
*evaluation* split (circuits are judged there).
"""

from __future__ import annotations

import csv
import io
import logging
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from refusal_sae.errors import UserError
from refusal_sae.io import atomic_open, write_json
from refusal_sae.plots import plot_category_counts
from refusal_sae.validate import all_of, fraction, one_of, positive_int

log = logging.getLogger(__name__)

DatasetType = Literal["safe_80k", "hard", "toxic"]
DATASET_TYPES: tuple[DatasetType, ...] = ("safe_80k", "hard", "toxic")
"""Also the codes of `dataset_type` in activation caches (its index, `activations.TOKEN_DTYPE`): append only."""
FILES: dict[DatasetType, str] = {
    "safe_80k": "or-bench-80k.csv",
    "hard": "or-bench-hard-1k.csv",
    "toxic": "or-bench-toxic.csv",
}
BUNDLED_SETS: dict[str, str] = {"transfer": "xstest-style.csv"}
"""Other prompt sets written for the project, in `sample_data/`: `transfer` holds safe prompts that share words
with unsafe ones and their unsafe twins, in XSTest's style (columns prompt, label safe/unsafe, type)."""
HUB_PREFIX = "hub:"
SAMPLE_SOURCE = "sample"
REQUIRED_COLUMNS = ("prompt", "category")


@dataclass(frozen=True)
class PromptSample:
    """One prompt with the fields the spec asks for."""

    prompt: str
    category: str
    refusal_label: bool  # True = toxic (should be refused), False = safe
    dataset_type: DatasetType
    original_source: str  # file name (local) or hub config name the row came from


def sample_data_dir() -> Path:
    """The small OR-Bench-format dataset bundled with the package (written by this project)."""
    return Path(__file__).with_name("sample_data")


Locations = dict[tuple[str, str], list[str]]
"""(original_source, prompt) -> '<file> line <n>' of each row holding that prompt, in file order."""


def _rows_to_samples(
    rows: Iterable[tuple[int, dict[str, Any]]], dataset_type: DatasetType, where: str,
    locations: Locations | None = None
) -> list[PromptSample]:
    """Validate raw `prompt,category` rows, each with the line it ends on, and turn them into samples; `where`
    names the source in errors and, with `locations`, in the location recorded for each row (so later errors can
    point at the row)."""
    samples = []
    for line, row in rows:
        prompt = (row.get("prompt") or "").strip()
        category = (row.get("category") or "").strip()
        if not prompt:
            raise UserError(f"{where}: empty prompt on line {line}; remove the row or fill in the prompt")
        if not category:
            raise UserError(f"{where}: empty category on line {line}; give every row a category")
        if bad := _category_problem(category):
            raise UserError(f"{where}: category {category[:60]!r} on line {line} {bad}; rename it in the file")
        samples.append(
            PromptSample(
                prompt=prompt,
                category=category,
                refusal_label=dataset_type == "toxic",
                dataset_type=dataset_type,
                original_source=Path(where).name,
            )
        )
        if locations is not None:
            locations[(samples[-1].original_source, prompt)].append(f"{where} line {line}")
    if not samples:
        raise UserError(f"{where}: no rows; give a file with at least one prompt")
    return samples


MAX_CATEGORY = 80
"""Characters a category name may have: it names files (circuits, records), whose names have a length limit."""
MAX_CATEGORY_BYTES = 160
"""UTF-8 bytes a category name may take: a file name holds 255 bytes, and the longest one a category names (a
circuit's export, written through a temporary sibling) adds 41 to it."""


def _category_problem(category: str) -> str | None:
    """Why `category` cannot name files, or None: it names every circuit and record file of its category, so two
    names must never map to one file (a `/` is how a circuit's group is joined to it) and a file system must
    accept it."""
    if len(category) > MAX_CATEGORY:
        return f"has {len(category)} characters, more than the {MAX_CATEGORY} a file name can take here"
    if (size := len(category.encode("utf-8", "surrogatepass"))) > MAX_CATEGORY_BYTES:
        return f"takes {size} bytes in UTF-8, more than the {MAX_CATEGORY_BYTES} a file name can take here"
    if bad := sorted({c for c in category if c in '/\\' or ord(c) < 32}):
        return f"holds {', '.join(repr(c) for c in bad)}, which file names cannot (or would join to a group)"
    if "__" in category:
        return "holds '__', which file names use to join a category to its circuit's group"
    if category.startswith("."):
        return "starts with '.', which would hide its files"
    return None


def _check_columns(columns: Sequence[str] | None, where: str) -> None:
    repeated = sorted({c for c in columns or [] if list(columns).count(c) > 1})
    if repeated:
        raise UserError(f"{where}: the header names column(s) {repeated} twice; give each column once")
    for column in REQUIRED_COLUMNS:
        if column not in (columns or []):
            found = ", ".join(columns or []) or "none"
            raise UserError(
                f"{where}: missing column '{column}' (columns found: {found}); "
                "OR-Bench files need a header 'prompt,category'"
            )


def read_orbench_csv(path: Path, dataset_type: DatasetType, locations: Locations | None = None) -> list[PromptSample]:
    """Read one OR-Bench CSV strictly: UTF-8, a `prompt` and a `category` column, no empty prompts; each row's
    line goes into `locations` when given."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}: not valid UTF-8 (byte {e.start}, line {line}); re-save the file as UTF-8"
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    _check_columns(reader.fieldnames, str(path))
    return _rows_to_samples(_strict_rows(reader, path), dataset_type, str(path), locations)


def _strict_rows(reader: csv.DictReader, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, row) of each row, refusing a row with more fields than the header (an unquoted comma in a prompt
    would otherwise shift the category) and a stray or unclosed double quote (which would swallow the rows after
    it)."""
    try:
        for row in reader:
            if None in row:
                n = len(reader.fieldnames) + len(row[None])
                raise UserError(f"{path}: line {reader.line_num} has {n} fields, the header {len(reader.fieldnames)}; "
                                "put a prompt that holds a comma in double quotes")
            yield reader.line_num, row
    except csv.Error as e:
        if "field larger than field limit" in str(e):
            raise UserError(f"{path}: after line {reader.line_num}: a field of more than {csv.field_size_limit():,} "
                            "characters: a prompt far longer than a model's context, or an unclosed double quote "
                            "that swallowed the rows after it; shorten the prompt or close the quote") from None
        raise UserError(f"{path}: after line {reader.line_num}: {e} (a stray or unclosed double quote); quote a "
                        'field that holds quotes and double the quotes inside it ("say ""no""")') from None


class ORBenchLoader:
    """Loads OR-Bench from a local directory, the bundled sample, or the Hugging Face hub.

    `source` is a directory holding any subset of the three CSV files, the word `sample` for the
    dataset bundled with this package, or `hub:<dataset id>` (e.g. `hub:bench-llm/or-bench`) to
    download through `datasets`. Files that are asked for but absent are listed in `missing` and
    logged; finding none of them is an error. `dataset_types` are names of `DATASET_TYPES` (as
    `PromptConfig` checks them). `locations` records the row of every prompt loaded, so that errors
    found later (a repeated or over-long prompt) name its file and line.
    """

    def __init__(
        self,
        source: str | Path,
        dataset_types: Sequence[DatasetType] = DATASET_TYPES,
        revision: str | None = None,
    ) -> None:
        self.source = str(source)
        self.dataset_types = tuple(dataset_types)
        self.revision = revision
        self.missing: list[str] = []
        self.locations: Locations = defaultdict(list)

    def load(self) -> list[PromptSample]:
        self.locations = defaultdict(list)
        if self.source.startswith(HUB_PREFIX):
            return self._load_hub(self.source[len(HUB_PREFIX) :])
        directory = sample_data_dir() if self.source == SAMPLE_SOURCE else Path(self.source)
        return self._load_dir(directory)

    def _load_dir(self, directory: Path) -> list[PromptSample]:
        if not directory.is_dir():
            raise UserError(
                f"data.prompts.source: directory '{directory}' not found; give a directory holding "
                f"OR-Bench CSVs ({', '.join(FILES.values())}), '{SAMPLE_SOURCE}', "
                f"or '{HUB_PREFIX}bench-llm/or-bench'"
            )
        samples: list[PromptSample] = []
        self.missing = []
        for dataset_type in self.dataset_types:
            path = directory / FILES[dataset_type]
            if path.is_file():
                samples += read_orbench_csv(path, dataset_type, self.locations)
            else:
                self.missing.append(FILES[dataset_type])
        if len(self.missing) == len(self.dataset_types):
            raise UserError(
                f"data.prompts.source: none of {', '.join(self.missing)} found in '{directory}'; "
                "point it at a directory with OR-Bench CSV files"
            )
        if self.missing:
            log.warning("OR-Bench files not found in %s: %s", directory, ", ".join(self.missing))
        return samples

    def _load_hub(self, dataset_id: str) -> list[PromptSample]:
        """Download each configured file from the hub; each OR-Bench file is a dataset config there."""
        import datasets

        samples: list[PromptSample] = []
        self.missing = []
        for dataset_type in self.dataset_types:
            config = FILES[dataset_type].removesuffix(".csv")
            where = f"{HUB_PREFIX}{dataset_id}/{config}"
            try:
                table = datasets.load_dataset(dataset_id, name=config, split="train", revision=self.revision)
            except (ConnectionError, OSError, ValueError) as e:
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(
                    f"{where}: could not load from the Hugging Face hub ({first_line}); "
                    "check the dataset id and your network, or download the CSVs and give their directory"
                ) from None
            _check_columns(table.column_names, where)
            samples += _rows_to_samples(enumerate(table, start=2), dataset_type, where, self.locations)
        return samples


def _length_stats(values: list[int]) -> dict[str, float]:
    return {
        "min": min(values),
        "max": max(values),
        "mean": round(statistics.fmean(values), 2),
        "median": statistics.median(values),
        "p95": float(np.percentile(values, 95)),
    }


class DataAnalyzer:
    """Counts and length statistics that show imbalances before any circuit is discovered."""

    def __init__(self, samples: Sequence[PromptSample]) -> None:
        if not samples:
            raise UserError("DataAnalyzer: no samples to analyse; check data.prompts.source")
        self.samples = samples

    def report(self) -> dict[str, Any]:
        """Counts per category and dataset_type, safe:toxic ratios, prompt lengths (chars and words)."""
        counts: dict[str, Counter[str]] = defaultdict(Counter)
        for s in self.samples:
            counts[s.category][s.dataset_type] += 1
        per_category = {}
        for category in sorted(counts):
            c = counts[category]
            safe, toxic = c["safe_80k"] + c["hard"], c["toxic"]
            per_category[category] = {
                **{t: c[t] for t in DATASET_TYPES},
                "safe": safe,
                "toxic": toxic,
                # safe:toxic imbalance; null when a category has no toxic prompt at all
                "safe_to_toxic_ratio": round(safe / toxic, 3) if toxic else None,
            }
        by_type: dict[str, list[PromptSample]] = defaultdict(list)
        for s in self.samples:
            by_type[s.dataset_type].append(s)
        lengths = {
            t: {
                "chars": _length_stats([len(s.prompt) for s in group]),
                "words": _length_stats([len(s.prompt.split()) for s in group]),
            }
            for t, group in sorted(by_type.items())
        }
        total_safe = sum(not s.refusal_label for s in self.samples)
        total_toxic = len(self.samples) - total_safe
        return {
            "n_samples": len(self.samples),
            "n_categories": len(per_category),
            "per_dataset_type": {t: len(by_type.get(t, [])) for t in DATASET_TYPES},
            "safe_to_toxic_ratio": round(total_safe / total_toxic, 3) if total_toxic else None,
            "per_category": per_category,
            "prompt_length": lengths,
        }

    def write(self, stem: str | Path) -> dict[str, Any]:
        """Write `<stem>.json` and a bar chart `<stem>.png` of prompts per category and type."""
        report = self.report()
        write_report(stem, report)
        return report


def write_report(stem: str | Path, report: dict[str, Any]) -> None:
    """A `DataAnalyzer` report as `<stem>.json` and its bar chart `<stem>.png`."""
    stem = Path(stem)
    write_json(stem.with_name(stem.name + ".json"), report)
    plot_category_counts(report, stem.with_name(stem.name + ".png"))


BalanceStrategy = Literal["use_all", "n_per_category"]
BALANCE_STRATEGIES: tuple[BalanceStrategy, ...] = ("use_all", "n_per_category")
Split = Literal["discovery", "evaluation"]


class DataProcessor:
    """Balances prompts per category and splits them into discovery and evaluation sets, seeded.

    Every random choice draws from one generator seeded by `seed` over samples in a fixed order,
    so the same input and seed always give the same prompts in the same splits. The strategy, n and
    fraction are taken as `PromptConfig` checks them.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @staticmethod
    def deduplicate(
        samples: Sequence[PromptSample],
        safe_types: Sequence[DatasetType] = ("hard", "safe_80k"),
        locations: Mapping[tuple[str, str], list[str]] | None = None,
    ) -> tuple[list[PromptSample], dict[str, Any]]:
        """Every prompt text at most once, so no prompt can be drawn twice or land in both splits.

        A prompt repeated with one label (within a file, or in two safe files: OR-Bench's hard-1k
        prompts are also in its 80k file) is kept once: its first row in the toxic file, else in the
        `safe_types` files in that order, else in any other file. A prompt that is both toxic and safe
        has no trustworthy label and is dropped entirely. Returns the kept samples in their order and a
        report of what was removed (rows named from `locations`, as `ORBenchLoader` records them).
        """
        rank = {t: i for i, t in enumerate(dict.fromkeys(["toxic", *safe_types, *DATASET_TYPES]))}
        by_text: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(samples):
            by_text[s.prompt].append(i)
        keep: set[int] = set()
        report: dict[str, Any] = {
            "rule": "a prompt repeated with one label is kept once (its first row in the toxic file, else in "
                    "the safe_types files in order); a prompt that is both toxic and safe is dropped",
            "repeated": {"prompts": 0, "rows_removed": 0},
            "both_labels": {"prompts": 0, "rows_removed": 0},
            "examples": [],
        }
        for text, rows in by_text.items():
            copies = [samples[i] for i in rows]
            kept = None
            if len({c.refusal_label for c in copies}) == 1:
                kept = min(rows, key=lambda i: rank[samples[i].dataset_type])  # the first of the best file
                keep.add(kept)
            if len(rows) == 1:
                continue
            kind = "repeated" if kept is not None else "both_labels"
            report[kind]["prompts"] += 1
            report[kind]["rows_removed"] += len(rows) - (kept is not None)
            if len(report["examples"]) < 20:
                sources = dict.fromkeys(c.original_source for c in copies)
                where = [w for src in sources for w in (locations or {}).get((src, text), [src])]
                report["examples"].append({
                    "prompt": text[:120],
                    "labels": sorted({"toxic" if c.refusal_label else "safe" for c in copies}),
                    "rows": where,
                    "kept": None if kept is None else _location(samples[kept], locations),
                })
        if report["examples"]:
            first = report["examples"][0]
            log.warning(
                "data.prompts: %d prompts repeated with one label, each kept once (%d rows removed); %d prompts "
                "both toxic and safe, dropped (%d rows); e.g. %r at %s (all counts under 'duplicates' in "
                "data_report.json)", report["repeated"]["prompts"], report["repeated"]["rows_removed"],
                report["both_labels"]["prompts"], report["both_labels"]["rows_removed"], first["prompt"][:60],
                ", ".join(first["rows"][:3]))
        return [s for i, s in enumerate(samples) if i in keep], report

    def select_categories(
        self, samples: Sequence[PromptSample], categories: Sequence[str] | None
    ) -> list[PromptSample]:
        """Keep only `categories` (all when None); an unknown name is an error listing the known ones."""
        if categories is None:
            return list(samples)
        known = sorted({s.category for s in samples})
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise UserError(
                f"data.prompts.categories: unknown category {unknown[0]!r}; known: {', '.join(known)}"
            )
        wanted = set(categories)
        return [s for s in samples if s.category in wanted]

    def balance(
        self,
        samples: Sequence[PromptSample],
        strategy: BalanceStrategy = "use_all",
        n_per_category: int | None = None,
        safe_types: Sequence[DatasetType] = ("hard", "safe_80k"),
        required: bool = False,
    ) -> list[PromptSample]:
        """Equal toxic and safe counts in every category.

        `use_all`: every toxic prompt of a category, matched by as many safe prompts drawn at random
        from `safe_types` (if a category has fewer safe than toxic prompts, its toxic prompts are
        subsampled to match; one with no safe prompt at all is left out with a warning, or is an error
        when `required`, i.e. the user named the categories). `n_per_category`: exactly n toxic and n
        safe prompts per category.
        """
        rng = np.random.default_rng(self.seed)
        by_category: dict[str, dict[bool, list[PromptSample]]] = defaultdict(lambda: {True: [], False: []})
        for s in samples:
            if s.refusal_label or s.dataset_type in safe_types:
                by_category[s.category][s.refusal_label].append(s)
        balanced: list[PromptSample] = []
        for category in sorted(by_category):
            toxic, safe = by_category[category][True], by_category[category][False]
            if not toxic:
                raise UserError(
                    f"data.prompts: category {category!r} has no toxic rows; "
                    "add or-bench-toxic.csv rows for it or leave it out of data.prompts.categories"
                )
            if strategy == "use_all":
                if not safe:
                    what = (f"category {category!r} has {len(toxic)} toxic but no safe prompts in "
                            f"data.prompts.safe_types ({', '.join(safe_types)})")
                    if required:
                        raise UserError(f"data.prompts.categories: {what}; add safe rows for it, add a file type "
                                        "to data.prompts.safe_types, or leave it out of data.prompts.categories")
                    log.warning("data.prompts: %s, so it is left out of this run; add safe rows for it or a file "
                                "type to data.prompts.safe_types to keep it", what)
                    continue
                n = min(len(toxic), len(safe))
                if n < len(toxic):
                    log.warning("category %s: %d toxic but only %d safe prompts; using %d of each",
                                category, len(toxic), len(safe), n)
            else:
                n = n_per_category  # type: ignore[assignment]
                for label, pool in (("toxic", toxic), ("safe", safe)):
                    if len(pool) < n:
                        raise UserError(
                            f"data.prompts.n_per_category: {n} but category {category!r} has only "
                            f"{len(pool)} {label} prompts; lower it or use balance 'use_all'"
                        )
            balanced += [toxic[i] for i in sorted(rng.choice(len(toxic), n, replace=False))]
            balanced += [safe[i] for i in sorted(rng.choice(len(safe), n, replace=False))]
        if not balanced:
            raise UserError(
                "data.prompts: zero prompts after balancing; check data.prompts.categories, "
                "data.prompts.safe_types and that the source has both toxic and safe prompts"
            )
        return balanced

    def split(
        self, samples: Sequence[PromptSample], eval_fraction: float = 0.3
    ) -> dict[Split, list[PromptSample]]:
        """Stratified split by (category, refusal_label), and within a label by dataset type, so that hard and
        plainly safe prompts are held out in proportion: each (category, label) stratum of n >= 2 prompts gives
        round(n * eval_fraction) prompts, at least 1 and at most n - 1, to the evaluation split, shared among its
        dataset types by largest remainder; a stratum of one prompt is refused (it could be only in one split).

        Prompt texts must be unique (`deduplicate`): a repeated text could fall in both splits."""
        repeated = [text for text, n in Counter(s.prompt for s in samples).items() if n > 1]
        if repeated:
            raise ValueError(f"split: prompt {repeated[0][:60]!r} occurs more than once; deduplicate first")
        rng = np.random.default_rng([self.seed, 1])  # independent of the balancing stream
        strata: dict[tuple[str, bool], list[PromptSample]] = defaultdict(list)
        for s in samples:
            strata[(s.category, s.refusal_label)].append(s)
        eval_ids: set[int] = set()
        for key in sorted(strata):
            members = strata[key]
            if len(members) < 2:
                label = "toxic" if key[1] else "safe"
                raise UserError(f"data.prompts: category {key[0]!r} has {len(members)} {label} prompt after balancing; "
                                "a category needs at least 2 per label (one for discovery, one held out): add "
                                "prompts, or leave it out with data.prompts.categories")
            n_eval = min(max(round(len(members) * eval_fraction), 1), len(members) - 1)
            for group, n in _share_by_type(members, n_eval):
                eval_ids.update(id(group[i]) for i in rng.choice(len(group), n, replace=False))
        return {
            "discovery": [s for s in samples if id(s) not in eval_ids],
            "evaluation": [s for s in samples if id(s) in eval_ids],
        }


def _share_by_type(members: Sequence[PromptSample], n_eval: int) -> list[tuple[list[PromptSample], int]]:
    """`n_eval` held-out prompts shared among the dataset types of one stratum in proportion to their counts
    (largest remainder, ties by type name). One type gets all n_eval, so a single-type stratum (OR-Bench's hard
    prompts, every toxic stratum) draws exactly as an unstratified split would."""
    groups: dict[str, list[PromptSample]] = defaultdict(list)
    for s in members:
        groups[s.dataset_type].append(s)
    quotas = {t: n_eval * len(g) / len(members) for t, g in groups.items()}
    counts = {t: int(q) for t, q in quotas.items()}
    for t in sorted(quotas, key=lambda t: (counts[t] - quotas[t], t))[: n_eval - sum(counts.values())]:
        counts[t] += 1
    return [(groups[t], counts[t]) for t in sorted(groups) if counts[t]]


SPLIT_COLUMNS = ("prompt", "category", "refusal_label", "dataset_type", "original_source", "split")


def write_splits(splits: dict[Split, list[PromptSample]], path: str | Path) -> None:
    """One CSV of every balanced prompt with its split, so a run's prompts can be inspected and reused."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SPLIT_COLUMNS)
        writer.writeheader()
        for split, samples in splits.items():
            for s in samples:
                writer.writerow({**asdict(s), "split": split})


def read_splits(path: str | Path) -> dict[Split, list[PromptSample]]:
    """Inverse of `write_splits`."""
    splits: dict[Split, list[PromptSample]] = {"discovery": [], "evaluation": []}
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            split = row.pop("split")
            row["refusal_label"] = row["refusal_label"] == "True"
            splits[split].append(PromptSample(**row))  # type: ignore[index, arg-type]
    return splits


@dataclass
class PromptConfig:
    """Where the prompts come from and how they are balanced and split (the `data.prompts` options)."""

    source: str = SAMPLE_SOURCE
    """A directory of OR-Bench CSVs, 'sample' (bundled), or 'hub:bench-llm/or-bench'."""
    dataset_types: list[DatasetType] = field(default_factory=lambda: list(DATASET_TYPES))
    """Which OR-Bench files to read."""
    revision: str | None = None
    """Hub revision (commit or tag) to pin, for 'hub:' sources."""
    categories: list[str] | None = None
    """Categories to keep; null keeps all (with 'use_all', one without safe prompts is then left out with a
    warning; a category named here must have both)."""
    balance: BalanceStrategy = "use_all"
    """'use_all': all toxic prompts per category, matched by as many safe ones; 'n_per_category': n of each."""
    n_per_category: int | None = None
    """Toxic (and safe) prompts per category with balance 'n_per_category'."""
    safe_types: list[DatasetType] = field(default_factory=lambda: ["hard", "safe_80k"])
    """Which safe files the matching safe prompts are drawn from."""
    eval_fraction: float = 0.3
    """Share of each (category, label) stratum held out for evaluation."""
    seed: int = 0
    """Seed of balancing and splitting."""

    def __post_init__(self) -> None:
        all_of("data.prompts.dataset_types", self.dataset_types, DATASET_TYPES)
        one_of("data.prompts.balance", self.balance, BALANCE_STRATEGIES)
        if self.balance == "n_per_category":
            positive_int("data.prompts.n_per_category", self.n_per_category, 100)
        fraction("data.prompts.eval_fraction", self.eval_fraction, 0.3)


def _location(sample: PromptSample, locations: Mapping[tuple[str, str], list[str]] | None) -> str:
    """'<file> line <n>' of the sample's first row (the one kept if it was repeated); else its source."""
    found = (locations or {}).get((sample.original_source, sample.prompt))
    return found[0] if found else sample.original_source


@dataclass
class PreparedPrompts:
    """Stage 1's result in memory. Nothing is written until `write`, so a run can check everything that
    depends on the prompts (lengths, the activation cache) first and, if refused, leave the run
    directory describing its previous prompts."""

    splits: dict[Split, list[PromptSample]]
    data_report: dict[str, Any]
    """Everything loaded, with what `DataProcessor.deduplicate` removed from the selected categories under
    'duplicates'."""
    balanced_report: dict[str, Any]
    locations: Locations
    """Where each prompt came from (`ORBenchLoader.locations`)."""

    def check_lengths(self, encode: Callable[[list[str]], list[list[int]]], max_length: int) -> None:
        """Every prompt's token count under the chat template (`encode`, e.g. `ModelWrapper.encode`) within
        `max_length`, checked before any work, the first offender named by file, line and text."""
        samples = [s for split in self.splits.values() for s in split]
        lengths = [len(ids) for ids in encode([s.prompt for s in samples])]
        too_long = [(n, s) for n, s in zip(lengths, samples) if n > max_length]
        if too_long:
            n, first = too_long[0]
            longest = max(n for n, _ in too_long)
            more = f" ({len(too_long) - 1} more, the longest {longest} tokens)" if len(too_long) > 1 else ""
            raise UserError(
                f"data.model.max_length: the prompt at {_location(first, self.locations)} ({first.prompt[:60]!r}) is "
                f"{n} tokens with the chat template, over the limit of {max_length}{more}; raise "
                "data.model.max_length or remove the row (truncating would cut off the generation prompt, the "
                "position where the model decides)"
            )

    def write(self, prompts_csv: str | Path, data_report: str | Path, balanced_report: str | Path) -> None:
        """`<data_report>.{json,png}`, `<balanced_report>.{json,png}` and `prompts_csv`, each atomically, the
        prompts last, so a complete `prompts_csv` means the stage finished."""
        write_report(data_report, self.data_report)
        write_report(balanced_report, self.balanced_report)
        write_splits(self.splits, prompts_csv)


def build_prompts(cfg: PromptConfig) -> PreparedPrompts:
    """Load, select, deduplicate, balance and split the prompts, in memory (nothing written)."""
    loader = ORBenchLoader(cfg.source, cfg.dataset_types, cfg.revision)
    samples = loader.load()
    processor = DataProcessor(cfg.seed)
    selected = processor.select_categories(samples, cfg.categories)
    unique, duplicates = processor.deduplicate(selected, cfg.safe_types, loader.locations)
    data_report = {**DataAnalyzer(samples).report(), "duplicates": duplicates}
    balanced = processor.balance(unique, cfg.balance, cfg.n_per_category, cfg.safe_types,
                                 required=cfg.categories is not None)
    return PreparedPrompts(processor.split(balanced, cfg.eval_fraction), data_report,
                           DataAnalyzer(balanced).report(), loader.locations)


def prepare_prompts(cfg: PromptConfig, prompts_csv: str | Path, data_report: str | Path,
                    balanced_report: str | Path) -> dict[Split, list[PromptSample]]:
    """Run stage 1 end to end: `build_prompts`, then write its reports and prompts (`PreparedPrompts.write`)."""
    prepared = build_prompts(cfg)
    prepared.write(prompts_csv, data_report, balanced_report)
    return prepared.splits
