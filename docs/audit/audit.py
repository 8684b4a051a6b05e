"""The refusal-phrase audit and the metric variants' validity on it (docs/audit/README.md).

    PYTHONPATH=. python docs/audit/audit.py generate ../shared/data/or-bench /tmp/answers.jsonl   # to label
    PYTHONPATH=. python docs/audit/audit.py measure ../shared/data/or-bench docs/audit/labels.jsonl

(from the repository root; PYTHONPATH=. makes this checkout's refusal_sae the one imported)

`generate` picks `--per-file` rows per OR-Bench category from each of or-bench-toxic.csv and or-bench-hard-1k.csv
(a fixed-seed draw without replacement) and writes one JSON line per row: source file, 0-based data row index
(header excluded), category, the greedy answer and the string match's label, never the prompt text. `measure`
reads the labelled lines, scores their prompts with every metric variant and prints the string match's
precision and recall per half and the variants' AUC per category, for the hand labels and for the string match.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from refusal_sae.data import FILES, read_orbench_csv
from refusal_sae.metric import RefusalMetric, variant_log_probs
from refusal_sae.model import ModelConfig, ModelWrapper
from refusal_sae.validity import (
    DEFAULT_REFUSAL_PHRASES,
    REFUSAL_LOGPROB,
    auc_by_category,
    auc_table_markdown,
    generate_answers,
    is_refusal,
    metric_variants,
    precision_recall,
)

SEED = 0
MAX_NEW_TOKENS = 32
BATCH_SIZE = 16
TYPES = {name: dataset_type for dataset_type, name in FILES.items()}


def _samples(data_dir: Path, source: str) -> list:
    return read_orbench_csv(data_dir / source, TYPES[source])


def audit_rows(data_dir: Path, per_file: int, seed: int = SEED) -> list[tuple[str, int, str, str]]:
    """(file name, row index, category, prompt) of `per_file` rows per category and file, by a seeded draw."""
    rng = np.random.default_rng(seed)
    rows = []
    for source in (FILES["toxic"], FILES["hard"]):
        samples = _samples(data_dir, source)
        for category in sorted({s.category for s in samples}):
            index = [i for i, s in enumerate(samples) if s.category == category]
            for i in sorted(rng.choice(index, size=min(per_file, len(index)), replace=False).tolist()):
                rows.append((source, i, category, samples[i].prompt))
    return rows


def generate(data_dir: Path, out: Path, per_file: int) -> None:
    rows = audit_rows(data_dir, per_file)
    answers = generate_answers(ModelWrapper(ModelConfig()), [r[3] for r in rows], MAX_NEW_TOKENS, BATCH_SIZE)
    with out.open("w", encoding="utf-8") as f:
        for (source, row, category, _), answer in zip(rows, answers):
            record = {"source": source, "row": row, "category": category, "answer": answer,
                      "string_match": is_refusal(answer, DEFAULT_REFUSAL_PHRASES)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def measure(data_dir: Path, labels: Path) -> None:
    records = [json.loads(line) for line in labels.read_text(encoding="utf-8").splitlines()]
    for half in ("development", "held-out"):
        part = [r for r in records if r["half"] == half]
        actual = [r["label"] == "refusal" for r in part]
        before = precision_recall([r["string_match"] for r in part], actual)
        after = precision_recall([is_refusal(r["answer"]) for r in part], actual)
        print(f"{half}: n {len(part)}, refusals {sum(actual)}, precision / recall before {before[0]:.3f} / "
              f"{before[1]:.3f}, after {after[0]:.3f} / {after[1]:.3f}")
    files = {source: _samples(data_dir, source) for source in {r["source"] for r in records}}
    prompts = [files[r["source"]][r["row"]].prompt for r in records]
    wrapper = ModelWrapper(ModelConfig())
    base = RefusalMetric.from_wrapper(wrapper)
    variants, errors = metric_variants(wrapper, base.cfg)
    assert not errors, errors
    log_probs = variant_log_probs(wrapper, prompts, BATCH_SIZE, {"": base, **variants})
    scores = {name: (r - c).numpy() for name, (r, c) in log_probs.items() if name}
    scores[REFUSAL_LOGPROB] = log_probs[""][0].numpy()
    categories = [r["category"] for r in records]
    for name, refused in (("hand labels", [r["label"] == "refusal" for r in records]),
                          ("string match (current phrases)", [is_refusal(r["answer"]) for r in records])):
        print(f"\nAUC for 'the greedy answer is a refusal', {name}:\n")
        print(auc_table_markdown(auc_by_category(categories, refused, scores, bootstrap=1000, seed=SEED)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["generate", "measure"])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("path", type=Path, help="answers to write (generate) or labels to read (measure)")
    parser.add_argument("--per-file", type=int, default=8)
    args = parser.parse_args()
    if args.command == "generate":
        generate(args.data_dir, args.path, args.per_file)
    else:
        measure(args.data_dir, args.path)


if __name__ == "__main__":
    main()
