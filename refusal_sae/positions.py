"""Which positions of a chat-formatted prompt a node lives at (Marks et al.'s templatic nodes).

Every prompt is the same chat template around a different user message:

    [ shared prefix: P tokens ][ content: the message, varying length ][ shared suffix: S tokens ]
      <|im_start|>system ...     "How do I ..."                          <|im_end|> <|im_start|>assistant

The prefix's hidden states are the same in every prompt (causal attention, same tokens), so ablating
them to their mean changes nothing: they are never nodes. The S suffix positions (the post-instruction
tokens, where Arditi et al. read the refusal decision) are aligned across prompts, counted from the end:
"-S" ... "-1", the last one being the generation position. The content positions are not aligned, so
they form one class, "content".

With `positional` position classes a node is (layer, feature, class) for class in
["content", "-S", ..., "-1"], and each class has its own ablation mean; every prefix position p has
its own mean class "p<p>" too, so a prefix "ablation" (the sanity check) is exact. With `global`
there is one class, "all", over every position including the prefix: one mean per feature, the
original evaluation, kept for comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from refusal_sae.errors import UserError

if TYPE_CHECKING:  # the model stack is not needed to sort positions into classes
    from refusal_sae.data import PromptSample
    from refusal_sae.model import ModelWrapper

PositionMode = Literal["positional", "global"]
POSITION_MODES: tuple[str, ...] = ("positional", "global")
CONTENT, ALL = "content", "all"


@dataclass(frozen=True)
class PositionScheme:
    """The classes tokens are sorted into: mean classes (prefix positions, then node classes) and node classes."""

    mode: PositionMode
    prefix: int
    """P: shared template tokens at the start (0 with `global`); also the number of mean classes before the
    node classes (one per prefix position)."""
    suffix: int
    """S: shared template tokens at the end, each its own class (0 with `global`)."""

    def __post_init__(self) -> None:
        if self.mode not in POSITION_MODES:
            raise UserError(f"discovery.positions: unknown value {self.mode!r}; use 'positional' or 'global'")
        if self.prefix < 0 or self.suffix < 0 or (self.mode == "global" and (self.prefix or self.suffix)):
            raise UserError(f"position scheme: prefix {self.prefix} / suffix {self.suffix} invalid for {self.mode}")

    @property
    def node_classes(self) -> list[str]:
        """Position classes a node can live at, in order."""
        if self.mode == "global":
            return [ALL]
        return [CONTENT, *(f"-{j}" for j in range(self.suffix, 0, -1))]

    @property
    def mean_classes(self) -> list[str]:
        """Every class with its own ablation mean: the prefix positions (never nodes), then node classes."""
        return [f"p{i}" for i in range(self.prefix)] + self.node_classes

    @property
    def generated(self) -> int:
        """The mean class of a generated token: the generation position's, "-1" (the last class; "content" without
        a suffix, "all" with `global`), where the model decided how to answer."""
        return len(self.mean_classes) - 1

    def classes(self, length: int) -> np.ndarray:
        """(length,) mean-class index of each position of a prompt of `length` tokens."""
        if self.mode == "global":
            return np.zeros(length, np.int64)
        if length < self.prefix + self.suffix + 1:
            raise UserError(
                f"a prompt of {length} tokens is shorter than the shared template ({self.prefix} prefix + "
                f"{self.suffix} suffix tokens) plus one content token; drop empty prompts"
            )
        out = np.full(length, self.prefix, np.int64)  # content
        out[: self.prefix] = np.arange(self.prefix)
        out[length - self.suffix :] = self.prefix + 1 + np.arange(self.suffix)
        return out

    def batch_classes(self, lengths: Sequence[int], width: int) -> np.ndarray:
        """(batch, width) class indices of right-padded prompts; padding gets the last class (never read)."""
        out = np.full((len(lengths), width), len(self.mean_classes) - 1, np.int64)
        for row, n in enumerate(lengths):
            out[row, :n] = self.classes(int(n))
        return out

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "prefix": self.prefix, "suffix": self.suffix}


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every sequence of `seqs` (at least one) shares."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


def template_scheme(mode: PositionMode, token_ids: Sequence[Sequence[int]], placeholders: Sequence[Sequence[int]]
                    ) -> PositionScheme:
    """The scheme of prompts whose chat-formatted token ids are `token_ids`.

    P and S are the longest prefix and suffix shared by every prompt, capped by those shared by two
    chat-formatted placeholder messages (`placeholders`): so a first word common to every prompt of a
    small data set is content, not template. At least one token of every prompt is left as content.
    """
    if mode == "global":
        return PositionScheme("global", 0, 0)
    if not token_ids:
        raise UserError("position classes: no prompts to find the shared template in")
    prefix = min(common_prefix(token_ids), common_prefix(placeholders))
    reverse = [list(reversed(s)) for s in token_ids]
    suffix = min(common_prefix(reverse), common_prefix([list(reversed(s)) for s in placeholders]))
    shortest = min(len(s) for s in token_ids)
    if prefix + suffix >= shortest:
        suffix = max(0, shortest - 1 - prefix)
    return PositionScheme("positional", prefix, suffix)


PLACEHOLDER_MESSAGES = ("Tell me about the weather today.", "Why?")
"""Two user messages with nothing in common at either end: what they share is the template."""


def position_scheme(wrapper: ModelWrapper, samples: Sequence[PromptSample], mode: PositionMode) -> PositionScheme:
    """The shared template prefix and suffix of these prompts under the model's chat template."""
    if mode == "global":
        return PositionScheme("global", 0, 0)
    return template_scheme(mode, wrapper.encode([s.prompt for s in samples]), wrapper.encode(PLACEHOLDER_MESSAGES))


__all__ = ["ALL", "CONTENT", "PLACEHOLDER_MESSAGES", "POSITION_MODES", "PositionMode", "PositionScheme",
           "common_prefix", "position_scheme", "template_scheme"]
