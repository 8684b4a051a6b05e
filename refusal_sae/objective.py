"""F: the number a circuit must explain, as a weighted sum of per-prompt refusal scores.

With s_p the refusal score of prompt p (`RefusalMetric.score`), F = sum_p w_p s_p, where the weights
depend on the target (`evaluation.target`) and the circuit's group:

    contrast  mean score of the category's toxic prompts - mean of its safe ones: why the model refuses
              one and not the other (the spec's F; the hard-but-safe OR-Bench prompts are ones models
              over-refuse, so this measures discrimination, not refusal itself)
    toxic     mean score of the category's toxic prompts: the refusal itself (Arditi et al. judge
              refusal on harmful prompts)
    behavior  mean score of the prompts the model refused - mean of those it answered (greedy answers,
              string match): what the model does, whatever the dataset says

A circuit of the toxic (safe) prompts only is judged on their mean score whatever the target. F is
linear in the scores, so attribution differentiates it batch by batch and the bootstrap resamples it
by resampling prompts within their stratum (the two sides of a contrast separately).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from refusal_sae.errors import UserError

Target = Literal["contrast", "toxic", "behavior"]
TARGETS: tuple[str, ...] = ("contrast", "toxic", "behavior")


@dataclass(frozen=True)
class Objective:
    """F over a list of prompts: F = weights . scores; `strata` labels the resampling groups."""

    rows: np.ndarray
    """Indices (into the prompts given) of the prompts F reads; the others need not be run."""
    weights: np.ndarray
    """(len(rows),) weights of those prompts' scores."""
    strata: np.ndarray
    """(len(rows),) 1 for the positive side, 0 for the other (all 1 for a mean)."""

    def value(self, scores: np.ndarray) -> float:
        """F from the (len(rows),) scores of `rows`."""
        return float(np.asarray(scores, dtype=np.float64) @ self.weights)


def objective(target: str, group: str, toxic: np.ndarray, refused: np.ndarray | None = None,
              where: str = "evaluation") -> Objective:
    """F of a circuit of `group` over prompts with labels `toxic` (and, for target behavior, `refused`)."""
    if target not in TARGETS:
        raise UserError(f"evaluation.target: unknown value {target!r}; use one of {', '.join(TARGETS)}")
    toxic = np.asarray(toxic, dtype=bool)
    n = len(toxic)
    if group != "all" or target == "toxic":
        rows = np.arange(n) if group != "all" else np.flatnonzero(toxic)
        if len(rows) == 0:
            raise UserError(f"{where}: no {'toxic' if group == 'all' else group} prompts to compute F on; "
                            "raise data.prompts.eval_fraction or use more prompts")
        return Objective(rows, np.full(len(rows), 1.0 / len(rows)), np.ones(len(rows), np.int64))
    if target == "behavior":
        if refused is None:
            raise UserError(f"{where}: evaluation.target behavior needs the model's answers (behaviour labels); "
                            "none were given")
        positive = np.asarray(refused, dtype=bool)
        kind = ("refused", "answered")
    else:
        positive, kind = toxic, ("toxic", "safe")
    n_pos = int(positive.sum())
    if n_pos in (0, n):
        missing = kind[1] if n_pos == n else kind[0]
        raise UserError(f"{where}: target {target} contrasts {kind[0]} and {kind[1]} prompts, but none of these {n} "
                        f"is {missing}; use evaluation.target toxic, or more prompts")
    weights = np.where(positive, 1.0 / n_pos, -1.0 / (n - n_pos))
    return Objective(np.arange(n), weights, positive.astype(np.int64))


__all__ = ["Objective", "TARGETS", "Target", "objective"]
