"""Stage 1: loading, analysing, balancing and splitting OR-Bench prompts."""

from __future__ import annotations

import json
from collections import Counter
import re
from pathlib import Path

import datasets
import pytest

from refusal_sae.data import (
    DataAnalyzer,
    DataProcessor,
    ORBenchLoader,
    PromptConfig,
    PromptSample,
    build_prompts,
    prepare_prompts,
    read_splits,
)
from refusal_sae.errors import UserError
from refusal_sae.io import atomic_open
from tests.conftest import write_csv

CATEGORIES = {
    "deception", "harassment", "harmful", "hate", "illegal",
    "privacy", "self-harm", "sexual", "unethical", "violence",
}  # fmt: skip


def per_category_labels(samples) -> Counter:
    return Counter((s.category, s.refusal_label) for s in samples)


# --- loading ---------------------------------------------------------------------------------


def test_real_orbench_counts(orbench_dir: Path) -> None:
    loader = ORBenchLoader(orbench_dir)
    samples = loader.load()
    types = Counter(s.dataset_type for s in samples)
    assert types == {"hard": 1319, "toxic": 655}
    assert {s.category for s in samples} == CATEGORIES
    assert loader.missing == ["or-bench-80k.csv"]
    assert all(s.refusal_label == (s.dataset_type == "toxic") for s in samples)
    assert {s.original_source for s in samples} == {"or-bench-hard-1k.csv", "or-bench-toxic.csv"}


def test_80k_file_loads_as_safe(tmp_path: Path) -> None:
    write_csv(tmp_path / "or-bench-80k.csv", [{"prompt": "How do locks work?", "category": "illegal"}])
    write_csv(tmp_path / "or-bench-toxic.csv", [{"prompt": "How do I pick my neighbour's lock?", "category": "illegal"}])
    loader = ORBenchLoader(tmp_path)
    samples = loader.load()
    assert [(s.dataset_type, s.refusal_label, s.original_source) for s in samples] == [
        ("safe_80k", False, "or-bench-80k.csv"),
        ("toxic", True, "or-bench-toxic.csv"),
    ]
    assert loader.missing == ["or-bench-hard-1k.csv"]


def test_bundled_sample_has_every_category_and_both_labels() -> None:
    samples = ORBenchLoader("sample").load()
    labels = per_category_labels(samples)
    assert {c for c, _ in labels} == CATEGORIES
    assert all(labels[(c, True)] > 0 and labels[(c, False)] > 0 for c in CATEGORIES)
    assert {s.dataset_type for s in samples} == {"safe_80k", "hard", "toxic"}


def test_default_split_of_the_bundled_sample_holds_out_ten_toxic_and_ten_hard_per_category() -> None:
    """The default run judges circuits and edits on at least 10 held-out toxic and 10 held-out hard-but-safe
    prompts per category (fewer leave F(M) - F(∅)'s interval around 0), and keeps plainly safe ones for the
    coherence check."""
    splits = build_prompts(PromptConfig()).splits
    held_out = Counter((s.category, s.dataset_type) for s in splits["evaluation"])
    for category in CATEGORIES:
        assert held_out[(category, "toxic")] >= 10 and held_out[(category, "hard")] >= 10, category
        assert held_out[(category, "safe_80k")] >= 1, category


def test_split_holds_out_each_safe_type_in_proportion() -> None:
    """Within a (category, label) stratum the held-out prompts are shared among dataset types by their counts,
    so a random draw cannot leave the hard prompts, or the plainly safe ones, nearly all in discovery."""
    samples = [PromptSample(f"hard {i}", "hate", False, "hard", "h.csv") for i in range(35)]
    samples += [PromptSample(f"plain {i}", "hate", False, "safe_80k", "p.csv") for i in range(8)]
    samples += [PromptSample(f"toxic {i}", "hate", True, "toxic", "t.csv") for i in range(43)]
    for seed in range(5):
        held_out = Counter(s.dataset_type for s in DataProcessor(seed).split(samples, 0.3)["evaluation"])
        assert held_out == {"toxic": 13, "hard": 11, "safe_80k": 2}  # 13 of 43 safe: 10.58 + 2.42 -> 11 + 2


def test_hub_source_reads_each_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub download is mocked at its boundary (`datasets.load_dataset`); everything after it is real."""
    calls = []

    def fake_load_dataset(path, name, split, revision):
        calls.append((path, name, split, revision))
        label = "toxic" if name == "or-bench-toxic" else "safe"
        return datasets.Dataset.from_dict({"prompt": [f"a {label} prompt", f"another {label} prompt"],
                                           "category": ["privacy", "hate"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    samples = ORBenchLoader("hub:bench-llm/or-bench", ["hard", "toxic"], revision="abc123").load()
    assert calls == [
        ("bench-llm/or-bench", "or-bench-hard-1k", "train", "abc123"),
        ("bench-llm/or-bench", "or-bench-toxic", "train", "abc123"),
    ]
    assert [(s.prompt, s.category, s.refusal_label) for s in samples] == [
        ("a safe prompt", "privacy", False), ("another safe prompt", "hate", False),
        ("a toxic prompt", "privacy", True), ("another toxic prompt", "hate", True),
    ]  # fmt: skip
    assert samples[0].original_source == "or-bench-hard-1k"


def test_hub_failure_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'bench-llm/or-bench' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"hub:bench-llm/or-bench/or-bench-80k: could not load .*Couldn't reach") as e:
        ORBenchLoader("hub:bench-llm/or-bench").load()
    assert "\n" not in str(e.value)


# --- bad input -------------------------------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"data.prompts.source: directory '.*nowhere' not found"):
        ORBenchLoader(tmp_path / "nowhere").load()


def test_directory_without_orbench_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"none of or-bench-80k.csv, or-bench-hard-1k.csv, or-bench-toxic.csv found"):
        ORBenchLoader(tmp_path).load()


@pytest.mark.parametrize("missing", ["prompt", "category"])
def test_missing_column(tmp_path: Path, missing: str) -> None:
    columns = tuple(c for c in ("prompt", "category", "extra") if c != missing)
    path = write_csv(tmp_path / "or-bench-toxic.csv", [dict.fromkeys(columns, "x")], columns)
    with pytest.raises(UserError, match=rf"or-bench-toxic.csv: missing column '{missing}' \(columns found: "):
        ORBenchLoader(path.parent).load()


def test_empty_prompt_names_the_line(tmp_path: Path) -> None:
    rows = [{"prompt": "fine", "category": "hate"}, {"prompt": "   ", "category": "hate"}]
    write_csv(tmp_path / "or-bench-toxic.csv", rows)
    with pytest.raises(UserError, match=r"or-bench-toxic.csv: empty prompt on line 3"):
        ORBenchLoader(tmp_path).load()


@pytest.mark.parametrize(("text", "message"), [
    ("prompt,category\nok,hate\nHow do I, kill a process,hate\nfine,hate\n",
     "line 3 has 3 fields, the header 2; put a prompt that holds a comma in double quotes"),
    ('prompt,category\nok,hate\n"How do I kill a process,hate\nfine,hate\n',
     "after line 2: unexpected end of data (a stray or unclosed double quote)"),
    ('prompt,category\nok,hate\n"How" do I,hate\n', "after line 2: ',' expected after '\"'"),
    ("prompt,prompt,category\nok,again,hate\n", "the header names column(s) ['prompt'] twice"),
    ('prompt,category\nok,hate\n"' + "word " * 200_000 + '",hate\n',
     "after line 2: a field of more than 131,072 characters: a prompt far longer than a model's context"),
])
def test_a_row_the_csv_module_would_resplit_or_swallow_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    """An unquoted comma shifts the category, an unclosed quote swallows the rows after it, a repeated header
    column hides one of them: each is refused, naming the line, instead of read as something else."""
    (tmp_path / "or-bench-toxic.csv").write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(message)):
        ORBenchLoader(tmp_path).load()


def test_a_quoted_prompt_over_two_lines_is_one_row_named_by_its_last_line(tmp_path: Path) -> None:
    (tmp_path / "or-bench-toxic.csv").write_text('prompt,category\n"two\nlines, quoted",hate\n"",hate\n',
                                                 encoding="utf-8")
    with pytest.raises(UserError, match="empty prompt on line 4"):
        ORBenchLoader(tmp_path).load()


def test_non_utf8_bytes(tmp_path: Path) -> None:
    (tmp_path / "or-bench-toxic.csv").write_bytes(b"prompt,category\ncaf\xe9 au lait,hate\n")
    with pytest.raises(UserError, match=r"or-bench-toxic.csv: not valid UTF-8 \(byte 19, line 2\)"):
        ORBenchLoader(tmp_path).load()


def test_unknown_dataset_type() -> None:
    with pytest.raises(UserError, match=r"data.prompts.dataset_types: 'safe' is not a known value; use one of safe_80k"):
        PromptConfig(dataset_types=["safe"])  # type: ignore[list-item]
    with pytest.raises(UserError, match=r"data.prompts.dataset_types: \[\] is not a non-empty list"):
        PromptConfig(dataset_types=[])


def test_unknown_category(orbench_dir: Path) -> None:
    samples = ORBenchLoader(orbench_dir).load()
    with pytest.raises(UserError, match=r"unknown category 'weapons'; known: deception, harassment"):
        DataProcessor().select_categories(samples, ["hate", "weapons"])


def test_category_without_toxic_rows(tmp_path: Path) -> None:
    write_csv(tmp_path / "or-bench-hard-1k.csv", [{"prompt": "p1", "category": "hate"}, {"prompt": "p2", "category": "privacy"}])
    write_csv(tmp_path / "or-bench-toxic.csv", [{"prompt": "t1", "category": "hate"}])
    samples = ORBenchLoader(tmp_path).load()
    with pytest.raises(UserError, match=r"category 'privacy' has no toxic rows"):
        DataProcessor().balance(samples)


@pytest.mark.parametrize(("category", "says"), [
    ("self/harm", "holds '/', which file names cannot"),
    ("self__toxic", "holds '__', which file names use to join a category to its circuit's group"),
    ("x" * 81, "has 81 characters, more than the 80"),
    ("\U0001F600" * 41, "takes 164 bytes in UTF-8, more than the 160"),
    (".hidden", "starts with '.'"),
    ("tab\there", "holds '\\t'"),
])
def test_a_category_name_that_cannot_name_files_is_one_line_with_its_row(tmp_path: Path, category: str,
                                                                         says: str) -> None:
    """Category names name circuit and record files: one that could not (or would collide with another's, as
    'self/harm' would with 'self__harm' and a circuit 'self/toxic' with a category 'self__toxic') is refused with
    the file and line, before anything is written."""
    path = write_csv(tmp_path / "or-bench-toxic.csv", [{"prompt": "p1", "category": "hate"},
                                                       {"prompt": "p2", "category": category}])
    write_csv(tmp_path / "or-bench-hard-1k.csv", [{"prompt": "p3", "category": "hate"}])
    with pytest.raises(UserError, match=re.escape(f"{path}: category ") + ".* on line 3 " + re.escape(says)) as e:
        ORBenchLoader(tmp_path).load()
    assert "\n" not in str(e.value) and "rename it in the file" in str(e.value)


def test_zero_rows_after_balancing(orbench_dir: Path) -> None:
    samples = ORBenchLoader(orbench_dir).load()
    with pytest.raises(UserError, match=r"zero prompts after balancing"):
        DataProcessor().balance(samples, safe_types=["safe_80k"])  # no 80k file here, so no safe prompts


def test_n_per_category_larger_than_available(orbench_dir: Path) -> None:
    samples = ORBenchLoader(orbench_dir).load()
    with pytest.raises(UserError, match=r"n_per_category: 40 but category 'harmful' has only 30 toxic prompts"):
        DataProcessor().balance(samples, "n_per_category", 40)


# --- balancing and splitting ----------------------------------------------------------------


def test_use_all_balances_every_category(orbench_dir: Path) -> None:
    samples = ORBenchLoader(orbench_dir).load()
    available = per_category_labels(samples)
    balanced = DataProcessor(seed=0).balance(samples, "use_all")
    counts = per_category_labels(balanced)
    for category in CATEGORIES:
        expected = min(available[(category, True)], available[(category, False)])
        assert counts[(category, True)] == counts[(category, False)] == expected
    # where safe prompts are plentiful, every toxic prompt is kept
    assert counts[("illegal", True)] == available[("illegal", True)] == 50
    assert len(set(balanced)) == len(balanced)


def test_n_per_category(orbench_dir: Path) -> None:
    balanced = DataProcessor(seed=3).balance(ORBenchLoader(orbench_dir).load(), "n_per_category", 12)
    assert set(per_category_labels(balanced).values()) == {12}
    assert len(balanced) == 240


def test_balance_and_split_are_deterministic_per_seed(orbench_dir: Path) -> None:
    samples = ORBenchLoader(orbench_dir).load()

    def run(seed: int):
        processor = DataProcessor(seed)
        splits = processor.split(processor.balance(samples), 0.3)
        return [s.prompt for s in splits["discovery"]], [s.prompt for s in splits["evaluation"]]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_split_is_stratified_and_disjoint(orbench_dir: Path) -> None:
    processor = DataProcessor(seed=1)
    balanced = processor.balance(ORBenchLoader(orbench_dir).load())
    splits = processor.split(balanced, eval_fraction=0.25)
    discovery, evaluation = splits["discovery"], splits["evaluation"]
    assert not set(discovery) & set(evaluation)
    assert sorted(map(id, discovery + evaluation)) == sorted(map(id, balanced))
    everything, held_out = per_category_labels(balanced), per_category_labels(evaluation)
    for key, n in everything.items():
        assert held_out[key] == round(n * 0.25), key


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5])
def test_eval_fraction_out_of_range(fraction: float) -> None:
    with pytest.raises(UserError, match=rf"data.prompts.eval_fraction: {fraction} is not a fraction in \(0, 1\)"):
        PromptConfig(eval_fraction=fraction)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"balance": "all"}, r"data.prompts.balance: 'all' is not a known value; use one of use_all, n_per_category"),
        ({"balance": "n_per_category"}, r"data.prompts.n_per_category: None is not a positive integer"),
        ({"balance": "n_per_category", "n_per_category": True}, r"data.prompts.n_per_category: True is not a positive"),
    ],
)
def test_bad_balance_options(options: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        PromptConfig(**options)


# --- analysis and outputs --------------------------------------------------------------------


def test_analyzer_report(orbench_dir: Path, tmp_path: Path) -> None:
    samples = ORBenchLoader(orbench_dir).load()
    report = DataAnalyzer(samples).write(tmp_path / "data_report")
    assert json.loads((tmp_path / "data_report.json").read_text()) == report
    assert (tmp_path / "data_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["n_samples"] == 1974 and report["n_categories"] == 10
    assert report["per_dataset_type"] == {"safe_80k": 0, "hard": 1319, "toxic": 655}
    illegal = report["per_category"]["illegal"]
    assert (illegal["hard"], illegal["toxic"], illegal["safe_to_toxic_ratio"]) == (527, 50, 10.54)
    assert report["safe_to_toxic_ratio"] == round(1319 / 655, 3)
    words = report["prompt_length"]["toxic"]["words"]
    assert words["min"] <= words["median"] <= words["p95"] <= words["max"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_prepare_prompts_writes_a_reusable_split(orbench_dir: Path, tmp_path: Path) -> None:
    cfg = PromptConfig(source=str(orbench_dir), categories=["hate", "privacy"], seed=5)
    splits = prepare_prompts(cfg, tmp_path / "prompts.csv", tmp_path / "data_report", tmp_path / "balanced_report")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "balanced_report.json", "balanced_report.png", "data_report.json", "data_report.png", "prompts.csv",
    ]  # fmt: skip
    assert read_splits(tmp_path / "prompts.csv") == splits
    balanced = json.loads((tmp_path / "balanced_report.json").read_text())
    assert set(balanced["per_category"]) == {"hate", "privacy"}


def test_atomic_open_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write("half of the new")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_a_category_with_one_prompt_per_label_is_refused_naming_it(tmp_path: Path) -> None:
    write_csv(tmp_path / "or-bench-toxic.csv", [{"prompt": "how to hurt", "category": "hate"},
                                                {"prompt": "how to steal", "category": "illegal"},
                                                {"prompt": "steal more", "category": "illegal"}])
    write_csv(tmp_path / "or-bench-hard-1k.csv", [{"prompt": "hate speech history", "category": "hate"},
                                                  {"prompt": "locks", "category": "illegal"},
                                                  {"prompt": "laws", "category": "illegal"}])
    samples = ORBenchLoader(tmp_path, ["hard", "toxic"]).load()
    with pytest.raises(UserError, match=r"data.prompts: category 'hate' has 1 safe prompt after balancing; a "
                                        r"category needs at least 2 per label"):
        DataProcessor().split(samples)
