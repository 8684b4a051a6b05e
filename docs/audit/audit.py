"""The refusal-phrase audit and the metric variants' validity on it (docs/audit/README.md).

    PYTHONPATH=. python docs/audit/audit.py generate ../shared/data/or-bench /tmp/answers.jsonl   # to label
    PYTHONPATH=. python docs/audit/audit.py measure ../shared/data/or-bench docs/audit/labels.jsonl
    PYTHONPATH=. python docs/audit/audit.py validity ../shared/data/or-bench docs/audit/labels.jsonl \
        --per-file 16 --out /tmp/validity.json   # the validity report on other prompts (seed 1)

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
from collections.abc import Collection
from pathlib import Path

import numpy as np

from refusal_sae.data import FILES, PromptSample, read_orbench_csv
from refusal_sae.metric import RefusalMetric, variant_log_probs
from refusal_sae.model import ModelConfig, ModelWrapper
from refusal_sae.validity import (
    DEFAULT_REFUSAL_PHRASES,
    REFUSAL_LOGPROB,
    ValidityConfig,
    auc_by_category,
    auc_table_markdown,
    generate_answers,
    is_refusal,
    metric_variants,
    precision_recall,
    validity_report,
    write_validity_report,
)

SEED = 0
MAX_NEW_TOKENS = 32
BATCH_SIZE = 16
TYPES = {name: dataset_type for dataset_type, name in FILES.items()}


def _samples(data_dir: Path, source: str) -> list[PromptSample]:
    return read_orbench_csv(data_dir / source, TYPES[source])


def audit_rows(data_dir: Path, per_file: int, seed: int = SEED, exclude: Collection[tuple[str, int]] = ()
               ) -> list[tuple[str, int, PromptSample]]:
    """(file name, row index, sample) of `per_file` rows per category and file, by a seeded draw, leaving out the
    (file name, row index) pairs of `exclude`."""
    rng = np.random.default_rng(seed)
    rows = []
    for source in (FILES["toxic"], FILES["hard"]):
        samples = _samples(data_dir, source)
        for category in sorted({s.category for s in samples}):
            index = [i for i, s in enumerate(samples) if s.category == category and (source, i) not in exclude]
            for i in sorted(rng.choice(index, size=min(per_file, len(index)), replace=False).tolist()):
                rows.append((source, i, samples[i]))
    return rows


def generate(data_dir: Path, out: Path, per_file: int) -> None:
    rows = audit_rows(data_dir, per_file)
    answers = generate_answers(ModelWrapper(ModelConfig()), [r[2].prompt for r in rows], MAX_NEW_TOKENS, BATCH_SIZE)
    with out.open("w", encoding="utf-8") as f:
        for (source, row, sample), answer in zip(rows, answers):
            record = {"source": source, "row": row, "category": sample.category, "answer": answer,
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


def validity(data_dir: Path, labels: Path, per_file: int, out: Path) -> None:
    """`validity_report` (string-matched answers) on a fresh draw (seed 1) of prompts outside the audit."""
    audited = {(r["source"], r["row"]) for r in map(json.loads, labels.read_text(encoding="utf-8").splitlines())}
    samples = [sample for _, _, sample in audit_rows(data_dir, per_file, seed=1, exclude=audited)]
    cfg = ValidityConfig(max_new_tokens=MAX_NEW_TOKENS, batch_size=BATCH_SIZE, keep_answers=False)
    report = validity_report(ModelWrapper(ModelConfig()), samples, cfg=cfg)
    write_validity_report(report, out)
    print(f"{len(samples)} prompts, {report['n_refused']} string-matched refusals, {report['seconds']}\n")
    print(auc_table_markdown(report["auc_by_category"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["generate", "measure", "validity"])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("path", type=Path, help="answers to write (generate) or labels to read (measure, validity)")
    parser.add_argument("--per-file", type=int, default=8)
    parser.add_argument("--out", type=Path, help="validity: where the report goes (JSON)")
    args = parser.parse_args()
    if args.command == "generate":
        generate(args.data_dir, args.path, args.per_file)
    elif args.command == "measure":
        measure(args.data_dir, args.path)
    else:
        validity(args.data_dir, args.path, args.per_file, args.out)


if __name__ == "__main__":
    main()
