"""Circuits and directions judged by the answers they change (the `edit` stage).

A refusal circuit is a claim about behaviour: ablate it (M \\ C) and the model should stop refusing those
requests; keep only it (C) and the model should still refuse; a random circuit of its shape should change
nothing. Per category circuit, on the category's held-out toxic and hard-but-safe prompts, this stage greedy-
generates the answers (`refusal_sae.generation`) under each edit, judges them with the validity report's
refusal match (`refusal_sae.validity.is_refusal`), and reports the refusal rate with a Wilson interval:

    model                 unedited
    ablate C<n>           the circuit's n best nodes mean-ablated (every other candidate kept)
    keep C<n>             every candidate latent outside the circuit mean-ablated
    random<r> C<n>        `random_circuits` random circuits of the same shape (latents per layer and position
                          class, drawn from the candidates there as the evaluation's random band is) ablated
    scale<s> C<n>         the circuit's latents multiplied by s where they fire (steering; 0 zero-ablates)
    direction ablated     the refusal-directions stage's global direction projected out at every layer and
                          position (Arditi et al.), when that stage has run in the source analysis
    direction added       that direction added at its layer, every position

n is the circuit's smallest size reaching faithfulness 0.8 on F (its evaluation record), or `n_nodes`; `sizes`
adds more. Nodes are edited at the prompt's positions and, with `edit_generated`, at every generated token (at
the generation position's class: see `refusal_sae.generation`).

Coherence: an answer that stops refusing by turning into noise is no success. Per edit, the edited model's mean
log-likelihood per token of the unedited model's answers (`answer_log_likelihood`) on the category's plainly
safe held-out prompts (dataset type safe_80k) or, where the split has none, on the hard prompts the unedited
model answers (the record says which), with a bootstrap interval, and its change from the unedited model.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from refusal_sae.ablation import Ablator
from refusal_sae.circuits import Circuit, NodeScores, candidate_mask, node_mask, random_mask, ranked_nodes
from refusal_sae.data import PromptSample
from refusal_sae.directions import activation_addition, directional_ablation
from refusal_sae.errors import UserError
from refusal_sae.generation import NodeEdit, answer_log_likelihood, generate
from refusal_sae.io import md_cell
from refusal_sae.objective import objective
from refusal_sae.stats import Interval, interval, resample_weights, wilson
from refusal_sae.validate import all_of, non_negative_int, positive_int, statistics_options
from refusal_sae.validity import DEFAULT_REFUSAL_PHRASES, is_refusal

MODEL = "model"
VALUES: tuple[str, ...] = ("mean", "counterfactual")


@dataclass
class EditingConfig:
    """The edit stage's options: which edits, how long the answers, how the intervals are made."""

    enabled: bool = False
    """Run the stage in `fit`'s epoch-end analysis and `analyze --stage all` (always with `--stage edit`)."""
    categories: list[str] | None = None
    """The categories whose circuits are edited (null: all)."""
    max_new_tokens: int = 24
    """Greedy answer length in tokens; a refusal shows in its first few words."""
    edit_generated: bool = False
    """Also edit every generated token (at the generation position's class), not only the prompt's positions."""
    sizes: list[int] = field(default_factory=list)
    """Circuit sizes (nodes) edited besides the smallest size reaching faithfulness 0.8 (or `n_nodes`)."""
    n_nodes: int = 30
    """The size where a circuit has no evaluation record or never reaches faithfulness 0.8."""
    random_circuits: int = 5
    """Random circuits of each edited circuit's shape, ablated: the chance level of 'ablate'."""
    values: list[str] = field(default_factory=lambda: list(VALUES))
    """What an ablated node is set to: 'mean' (its mean over the discovery prompts, as the evaluation does) and/or
    'counterfactual' (its value on a matched prompt the model answers: a safe discovery prompt of the category,
    the closest in length, whose greedy answer is no refusal)."""
    strengths: list[float] = field(default_factory=lambda: [0.0, 2.0])
    """Steering: the circuit's latents multiplied by each strength where they fire."""
    directions: bool = True
    """Also ablate and add the refusal-directions stage's global direction, when that stage has run."""
    coherence: bool = True
    """Measure the edited model's likelihood of the unedited answers (plainly safe or answered prompts)."""
    batch_size: int = 32
    """Prompts per generate call."""
    bootstrap: int = 1000
    """Bootstrap resamples of the coherence intervals."""
    confidence: float = 0.95
    """Level of every interval (Wilson for refusal rates, percentile bootstrap for coherence)."""
    seed: int = 0
    """Random circuits and bootstrap resamples."""

    def __post_init__(self) -> None:
        positive_int("editing.max_new_tokens", self.max_new_tokens, 24)
        positive_int("editing.n_nodes", self.n_nodes, 30)
        positive_int("editing.batch_size", self.batch_size, 32)
        non_negative_int("editing.random_circuits", self.random_circuits, 5)
        for n in self.sizes:
            positive_int("editing.sizes", n, 30)
        for s in self.strengths:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not np.isfinite(s):
                raise UserError(f"editing.strengths: {s!r} is not a number; give e.g. [0.0, 2.0]")
        all_of("editing.values", self.values, VALUES)
        statistics_options("editing", self)


@dataclass
class Rate:
    """Refused answers among n, with a Wilson interval."""

    refused: int
    n: int
    rate: Interval | None
    """None when n is 0."""


@dataclass
class EditOutcome:
    edit: str
    n_nodes: int | None
    """Nodes edited (None for the unedited model and direction edits)."""
    toxic: Rate
    hard: Rate
    coherence: Interval | None
    """Mean log-likelihood per token of the unedited answers under the edit (None without coherence prompts)."""
    coherence_change: Interval | None
    """Its change from the unedited model (paired bootstrap)."""
    answers: list[str]
    """The answers to the toxic prompts, then to the hard ones, in `CategoryEdits.prompts` order."""


@dataclass
class CategoryEdits:
    category: str
    method: str
    circuit: str
    size: int
    size_reason: str
    edit_generated: bool
    max_new_tokens: int
    prompts: list[str]
    """The held-out toxic prompts, then the hard ones."""
    n_toxic: int
    coherence_on: str
    """Which prompts coherence is measured on: 'safe_80k', 'answered hard prompts' or 'none'."""
    counterfactual: str
    """Where the counterfactual values come from, or why there are none."""
    donors: list[str]
    """Each prompt's matched prompt (whose values counterfactual edits patch in), in `prompts` order; empty without."""
    outcomes: list[EditOutcome]

    def outcome(self, edit: str) -> EditOutcome:
        return next(o for o in self.outcomes if o.edit == edit)


@dataclass
class GlobalDirection:
    """The refusal-directions stage's global direction at its chosen layer and position."""

    layer: str
    vector: np.ndarray


def circuit_edits(ablator: Ablator, scores: NodeScores, size: int, cfg: EditingConfig, rng: np.random.Generator,
                  donors: Mapping[str, tuple[Tensor, Tensor]] | None = None
                  ) -> Iterator[tuple[str, int, dict[str, NodeEdit]]]:
    """(name, nodes edited, node edits) of one circuit at one size: ablated, kept, random (to the node means),
    scaled; and with `donors` (`Ablator.prompt_values` of the matched prompts) ablated, kept and random again
    with the counterfactual values (names ending in ' cf')."""
    candidates = candidate_mask({layer: ablator.means.live(layer) for layer in ablator.layers}, errors=False)
    ranking = ranked_nodes(scores, candidates)
    if size in cfg.sizes and size > len(ranking):
        raise UserError(f"editing.sizes: {size} is more than the {len(ranking)} candidate latents of circuit "
                        f"{scores.method}; give sizes up to {len(ranking)}")
    n = min(size, len(ranking))
    kept = node_mask(ranking[:n], {layer: m.shape for layer, m in candidates.items()})

    randoms = [random_mask(kept, candidates, rng) for _ in range(cfg.random_circuits)]
    for values in ("mean", "counterfactual"):
        if values not in cfg.values or (values == "counterfactual" and donors is None):
            continue
        suffix = " cf" if values == "counterfactual" else ""

        def edits(variant) -> dict[str, NodeEdit]:
            return {layer: ablator.edit(layer, k, donors[layer] if suffix else None)
                    for layer, k in variant.items() if not k.everything}

        yield f"ablate C{n}{suffix}", n, edits(ablator.variant(kept, candidates, inside=False))
        yield f"keep C{n}{suffix}", n, edits(ablator.variant(kept, candidates))
        for r, random in enumerate(randoms):
            yield f"random{r} C{n}{suffix}", n, edits(ablator.variant(random, candidates, inside=False))
    for s in cfg.strengths:
        yield f"scale{s:g} C{n}", n, {layer: ablator.scale(layer, kept[layer], s) for layer in ablator.layers
                                      if kept[layer].any()}


def edit_category(ablator: Ablator, circuit: Circuit, scores: NodeScores, samples: Sequence[PromptSample],
                  discovery: Sequence[PromptSample], size: tuple[int, str], direction: GlobalDirection | None,
                  cfg: EditingConfig, phrases: Sequence[str] = DEFAULT_REFUSAL_PHRASES) -> CategoryEdits:
    """Every edit of one category's circuit on its held-out `samples` (see the module docstring); counterfactual
    values from the category's safe `discovery` prompts the model answers."""
    wrapper, scheme = ablator.wrapper, ablator.scheme
    mine = [s for s in samples if s.category == circuit.category]
    toxic = [s.prompt for s in mine if s.refusal_label]
    hard = [s.prompt for s in mine if s.dataset_type == "hard"]
    plain = [s.prompt for s in mine if s.dataset_type == "safe_80k"]
    if not toxic and not hard:
        raise UserError(f"edit: category {circuit.category!r} has no toxic or hard held-out prompts; raise "
                        "data.prompts.eval_fraction or give the category prompts")
    prompts = toxic + hard
    rng = np.random.default_rng([cfg.seed, zlib.crc32(circuit.name.encode())])

    def answer(edits: Mapping[str, NodeEdit], context: contextlib.AbstractContextManager | None = None,
               offsets: Sequence[int] | None = None) -> list[str]:
        with context if context is not None else contextlib.nullcontext():
            return generate(wrapper, prompts, cfg.max_new_tokens, cfg.batch_size, scheme=scheme, edits=edits,
                            edit_generated=cfg.edit_generated, class_offsets=offsets,
                            desc=f"answers of {circuit.category}").texts

    base = generate(wrapper, prompts + plain, cfg.max_new_tokens, cfg.batch_size)
    coherence_on, reference, tokens = "none", [], []
    if cfg.coherence:
        if plain:
            coherence_on, reference, tokens = "safe_80k", plain, base.tokens[len(prompts):]
        else:
            answered = [i for i in range(len(toxic), len(prompts)) if not is_refusal(base.texts[i], phrases)]
            coherence_on = "answered hard prompts" if answered else "none"
            reference, tokens = [prompts[i] for i in answered], [base.tokens[i] for i in answered]
    weights = (resample_weights(objective("toxic", "all", np.ones(len(reference), bool)), cfg.bootstrap, rng)
               if reference else None)

    def likelihood(edits: Mapping[str, NodeEdit], context: contextlib.AbstractContextManager | None = None,
                   offsets: Sequence[int] | None = None) -> np.ndarray | None:
        if not reference:
            return None
        with context if context is not None else contextlib.nullcontext():
            return answer_log_likelihood(wrapper, reference, tokens, cfg.batch_size, scheme=scheme, edits=edits,
                                         edit_generated=cfg.edit_generated, class_offsets=offsets)

    unedited = likelihood({})

    def outcome(name: str, n: int | None, texts: list[str], ll: np.ndarray | None) -> EditOutcome:
        refused = [is_refusal(t, phrases) for t in texts]
        coherence = change = None
        if ll is not None and weights is not None:
            finite = np.nan_to_num(ll)  # an empty reference answer counts 0 (never drawn: answers are non-empty)
            coherence = interval(float(finite.mean()), weights @ finite, cfg.confidence)
            delta = finite - np.nan_to_num(unedited)
            change = interval(float(delta.mean()), weights @ delta, cfg.confidence)
        return EditOutcome(name, n, refusal_rate(refused[: len(toxic)], cfg.confidence),
                           refusal_rate(refused[len(toxic):], cfg.confidence), coherence, change, texts)

    donors, matched, offsets, note = None, [], [], "not asked for (editing.values)"
    if "counterfactual" in cfg.values:
        donors, matched, offsets, note = _donors(ablator, circuit.category, discovery, prompts + reference, cfg,
                                                 phrases)

    outcomes = [outcome(MODEL, None, base.texts[: len(prompts)], unedited)]
    sizes = sorted({size[0], *cfg.sizes})
    steps = [(name, n, e) for s in sizes for name, n, e in circuit_edits(ablator, scores, s, cfg, rng, donors)]
    for name, n, edits in tqdm(steps, desc=f"editing {circuit.category}", unit="edit", leave=False):
        cf = offsets if name.endswith(" cf") else None  # each prompt's classes shifted to its donor's rows
        outcomes.append(outcome(name, n, answer(edits, offsets=cf and cf[: len(prompts)]),
                                likelihood(edits, offsets=cf and cf[len(prompts):])))
    if direction is not None and cfg.directions:
        vector = torch.from_numpy(np.asarray(direction.vector, dtype=np.float32))
        for name, context in (("direction ablated", lambda: directional_ablation(wrapper, vector)),
                              ("direction added", lambda: activation_addition(wrapper, direction.layer, vector))):
            outcomes.append(outcome(name, None, answer({}, context()), likelihood({}, context())))
    return CategoryEdits(circuit.category, circuit.method, circuit.name, size[0], size[1], cfg.edit_generated,
                         cfg.max_new_tokens, prompts, len(toxic), coherence_on, note, matched[: len(prompts)],
                         outcomes)


def _donors(ablator: Ablator, category: str, discovery: Sequence[PromptSample], prompts: Sequence[str],
            cfg: EditingConfig, phrases: Sequence[str]
            ) -> tuple[dict[str, tuple[Tensor, Tensor]] | None, list[str], list[int], str]:
    """(`Ablator.prompt_values` of the donor prompts, each of `prompts`' donor, the class offset that selects its
    rows there, a note): the donors are the category's safe discovery prompts whose greedy answer is no refusal;
    each prompt gets the one closest in length (fewest tokens apart, the first such), so its content positions
    line up best."""
    pool = [s.prompt for s in discovery if s.category == category and not s.refusal_label]
    texts = generate(ablator.wrapper, pool, cfg.max_new_tokens, cfg.batch_size, desc=f"donors of {category}").texts
    answered = [p for p, t in zip(pool, texts) if not is_refusal(t, phrases)]
    if not answered:
        return None, [], [], (f"none of the {len(pool)} safe discovery prompts of {category!r} is answered: no "
                              "counterfactual values")
    lengths = [len(ids) for ids in ablator.wrapper.encode(answered)]
    matched = []
    for n in map(len, ablator.wrapper.encode(list(prompts))):
        matched.append(answered[int(np.argmin([abs(m - n) for m in lengths]))])
    used = sorted(set(matched), key=answered.index)
    offsets = [used.index(m) * len(ablator.scheme.mean_classes) for m in matched]
    note = f"{len(used)} of the {len(answered)} answered safe discovery prompts of {category!r} (of {len(pool)}), " \
           "matched by length"
    return ablator.prompt_values(used), matched, offsets, note


def refusal_rate(refused: Sequence[bool], confidence: float) -> Rate:
    """The refused answers among `refused` with a Wilson interval."""
    k, n = int(sum(refused)), len(refused)
    return Rate(k, n, wilson(k, n, confidence) if n else None)


def edits_table(results: Mapping[str, Sequence[CategoryEdits]]) -> str:
    """Markdown: per method and category, each edit's refusal rates (toxic, hard) and coherence change."""
    lines = []
    for method, records in results.items():
        lines += [f"### {method}: refusal rate of the answers under each edit", "",
                  "| category | edit | toxic refused | hard refused | coherence change (log-lik/token) |",
                  "|---|---|---|---|---|"]
        for record in records:
            for o in record.outcomes:
                lines.append(f"| {md_cell(record.category)} | {o.edit} | {_fmt(o.toxic)} | {_fmt(o.hard)} | "
                             f"{_fmt_ci(o.coherence_change)} |")
        lines.append("")
    return "\n".join(lines)


def answers_cell(record: CategoryEdits | None, edits: Sequence[str]) -> str:
    """A table cell saying what `edits` (those the record holds) did to the answers, beside the unedited model:
    `unedited t/n, h/m; <edit> t/n, h/m (coherence ±x.xx)`, toxic then hard prompts refused; '-' without a record."""
    if record is None:
        return "-"
    cells = []
    for o in record.outcomes:
        if o.edit == MODEL or o.edit in edits:
            coherence = "" if o.coherence_change is None else f" (coherence {o.coherence_change.value:+.2f})"
            name = "unedited" if o.edit == MODEL else o.edit
            cells.append(f"{name} {o.toxic.refused}/{o.toxic.n}, {o.hard.refused}/{o.hard.n}{coherence}")
    return "; ".join(cells)


def circuit_answers(record: CategoryEdits | None) -> str:
    """`answers_cell` of the circuit's own edits at its edited size: ablated and kept, mean and counterfactual."""
    if record is None:
        return "-"
    n = record.size
    return answers_cell(record, [f"ablate C{n}", f"ablate C{n} cf", f"keep C{n}", f"keep C{n} cf"])


def direction_answers(record: CategoryEdits | None) -> str:
    """`answers_cell` of the refusal direction's edits (ablated at every layer, added at its layer)."""
    return answers_cell(record, ["direction ablated", "direction added"])


def _fmt(rate: Rate) -> str:
    if rate.rate is None:
        return "n/a"
    return f"{rate.refused}/{rate.n} ({rate.rate.format('.0%')})"


def _fmt_ci(x: Interval | None) -> str:
    return "n/a" if x is None else x.format("+.3f")


__all__ = ["MODEL", "CategoryEdits", "EditOutcome", "EditingConfig", "GlobalDirection", "Rate", "answers_cell", "refusal_rate",
           "circuit_answers", "circuit_edits", "direction_answers", "edit_category", "edits_table"]
