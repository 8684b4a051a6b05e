"""Prompts that share the chat template's prefix, run with the prefix's keys and values computed once.

Every chat-formatted prompt starts with the same P template tokens (system prompt, user header: 24 for the
embedded Qwen). Attention is causal, so their hidden states, keys and values are the same in every prompt:
a batch can run only the positions after them and read the prefix's keys and values from a cache computed
once per prompt list (`SharedPrefix`). Activation collection, the ablation, attribution, the refusal metric and generation all
batch their prompts here; nothing else builds a prefix cache.

Two layouts of a batch, both with each row's prefix at positions 0 .. P-1:

    right-padded   [ prefix | content, suffix | pads ]    scoring, residuals, gradients: each row's last real
                                                           token is found from the attention mask;
    generation     [ prefix | pads | content, suffix ]    greedy answers: every row's new tokens follow its own
                                                           last token; the pads sit between prefix and content,
                                                           masked out, and positions come from the mask.

Whether continuing a cache reproduces a plain forward pass is checked once per model (`ModelWrapper.
prefix_continues`) on the first batch that asks, within float tolerance; a model whose cache cannot be
continued that way (or whose logits change) runs whole prompts, with one notice: slower, same numbers.

The cache is computed under whatever hooks are active when the first batch is made: a caller whose hooks
edit the prefix too (a directional ablation at every position) makes its batches inside those hooks, and
never reuses a cache across calls whose hooks may differ.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from refusal_sae.errors import UserError
from refusal_sae.model import ModelWrapper, first_line
from refusal_sae.positions import PositionScheme, common_prefix
from refusal_sae.validate import positive_int

log = logging.getLogger(__name__)

Layout = Literal["right", "generation"]

_CACHE_ERRORS: tuple[type[Exception], ...] = (AttributeError, NotImplementedError, RuntimeError, TypeError, ValueError)
"""What continuing a key/value cache raises on a model whose cache cannot be continued that way."""


@torch.no_grad()
def prefix_cache(wrapper: ModelWrapper, prefix_ids: Tensor) -> Any:
    """The keys and values of a token prefix (1, P), under the hooks active now."""
    ids = torch.as_tensor(prefix_ids).to(wrapper.device)
    out = wrapper.decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    return out.cache if wrapper.cache_argument == "cache" else out.past_key_values


def expand(cache: Any, batch: int) -> Any:
    """A copy of a one-row cache for `batch` rows (the model's forward extends the cache it is given)."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(batch)
    return out


def continuation_matches(wrapper: ModelWrapper, cached: Callable[[], Tensor], input_ids: Tensor,
                         attention_mask: Tensor, who: str) -> bool:
    """Whether `cached()`, the last-token logits of these right-padded rows computed by continuing their shared
    prefix's cache, equals a plain forward of the rows within float tolerance. False, with a one-line notice
    that `who` runs whole prompts, where it does not or where the cache cannot be continued."""
    try:
        got = cached()
    except _CACHE_ERRORS as e:
        log.warning("%s: this model's key/value cache cannot be continued (%s); it runs whole prompts "
                    "(slower, same numbers)", who, first_line(e, 120))
        return False
    plain = wrapper.last_token_logits(input_ids, attention_mask)
    if not torch.isfinite(plain).all():  # nothing to compare; whole prompts, whose own checks name the problem
        log.warning("%s: this model's logits are not finite, so continuing its key/value cache cannot be checked; "
                    "it runs whole prompts", who)
        return False
    ok = bool(torch.allclose(got, plain, rtol=1e-3, atol=1e-3 * float(plain.abs().max())))
    if not ok:
        log.warning("%s: continuing this model's key/value cache changes its logits (max |diff| %.3g); it runs "
                    "whole prompts (slower, same numbers)", who, float((got - plain).abs().max()))
    return ok


@dataclass
class PromptBatch:
    """One batch of prompts on the model's device."""

    rows: np.ndarray
    """Which prompts of the list (their indices, in the batch's row order)."""
    input_ids: Tensor
    """(batch, seq) whole prompts, prefix included, padded as the layout says."""
    mask: Tensor
    """(batch, seq) attention mask over the whole prompt."""
    past: Any
    """The shared prefix's keys and values for this batch (a private copy), or None: whole prompts run."""
    offset: int
    """P with `past`, else 0: where the positions that run start."""
    classes: Tensor | None = None
    """(batch, seq) mean-class index of every position, given a position scheme (pads: the last class)."""

    @property
    def run_ids(self) -> Tensor:
        """The positions that run: after the shared prefix (with `past`) or all."""
        return self.input_ids[:, self.offset:]

    @property
    def run_classes(self) -> Tensor:
        """Mean classes of the positions that run."""
        assert self.classes is not None, "a batch made without a position scheme has no classes"
        return self.classes[:, self.offset:]


class SharedPrefix:
    """Batches of prompts that share a template prefix whose keys and values are computed once.

    `length`: the prefix in tokens, e.g. a position scheme's P, checked against every batch; None takes the
    longest prefix the first prompt list shares, leaving each prompt at least one token after it. 0 runs
    whole prompts. `reuse=False` always runs whole prompts (for hooks that depend on a position's index).
    One instance keeps its cache for its lifetime: make one per set of active hooks.
    """

    def __init__(self, wrapper: ModelWrapper, who: str, length: int | None = None, reuse: bool = True) -> None:
        self.wrapper, self.who, self.length, self.reuse = wrapper, who, length, reuse
        self.ids: Tensor | None = None
        """(1, P) the prefix's tokens, once known."""
        self.cache: Any = None

    @property
    def reused(self) -> bool:
        """Whether batches run only the positions after the prefix."""
        return self.cache is not None

    def batches(self, prompts: Sequence[str], batch_size: int, scheme: PositionScheme | None = None,
                layout: Layout = "right", continuations: Sequence[Sequence[int]] | None = None,
                by_length: bool = False) -> Iterator[PromptBatch]:
        """`prompts` in batches of `batch_size`, each with its copy of the prefix's keys and values (made lazily:
        a caller whose hooks change between batches gets the cache of the hooks active at the first).
        `continuations`: token ids appended to each prompt (e.g. an answer; right layout), of the scheme's
        `generated` class. `by_length`: batch prompts of similar token length together (a batch runs every row
        to its longest: on OR-Bench's categories batches of 16 hold 86% real tokens sorted, 69% as given); the
        caller puts each batch's results back by its `rows` (`in_given_order`)."""
        positive_int("batch_size", batch_size, 8)
        ids = self.wrapper.encode(prompts)
        prompt_lengths = [len(row) for row in ids]
        if continuations is not None:
            if layout != "right" or len(continuations) != len(ids):
                raise ValueError("continuations: one per prompt, right layout only")
            ids = [row + list(more) for row, more in zip(ids, continuations)]
        length = self._length(ids, prompt_lengths)
        order = np.argsort([len(row) for row in ids], kind="stable") if by_length else np.arange(len(ids))
        for start in range(0, len(ids), batch_size):
            rows = order[start : start + batch_size]
            batch_ids = [ids[i] for i in rows]
            right = self.wrapper.pad(batch_ids, "right")
            input_ids = right["input_ids"].to(self.wrapper.device)
            mask = right["attention_mask"].to(self.wrapper.device)
            past = self._past(input_ids, mask, length)
            offset = length if past is not None else 0
            if layout == "generation":
                input_ids, mask = self._generation_layout(batch_ids, offset)
            classes = None
            if scheme is not None:
                classes = torch.as_tensor(_classes(scheme, [prompt_lengths[i] for i in rows],
                                                   [len(row) for row in batch_ids],
                                                   input_ids.shape[1], offset if layout == "generation" else None),
                                          device=self.wrapper.device)
            yield PromptBatch(rows, input_ids, mask, past, offset, classes)

    def _length(self, ids: list[list[int]], prompt_lengths: list[int]) -> int:
        if not self.reuse or not ids:
            return 0
        if self.length is None:  # at least one prompt token after the prefix: the last one's logits are read
            self.length = min(common_prefix(ids), min(prompt_lengths) - 1)
        return self.length

    def _past(self, input_ids: Tensor, mask: Tensor, length: int) -> Any:
        """This batch's copy of the prefix cache; None where whole prompts run."""
        wrapper = self.wrapper
        if length == 0 or wrapper.prefix_continues is False:
            return None
        if self.ids is None:
            self.ids = input_ids[:1, :length]
        if not torch.equal(input_ids[:, :length], self.ids.expand(len(input_ids), -1)):
            raise UserError(f"{self.who}: prompts do not share the chat template's prefix the position classes were "
                            "found with; run discovery again on these prompts")
        if self.cache is None:
            if wrapper.prefix_continues is None:
                def cached() -> Tensor:
                    self.cache = prefix_cache(wrapper, self.ids)
                    return wrapper.last_token_logits(input_ids[:, length:], mask, past=expand(self.cache,
                                                                                             len(input_ids)))

                wrapper.prefix_continues = continuation_matches(wrapper, cached, input_ids, mask, self.who)
                if not wrapper.prefix_continues:
                    self.cache = None
                    return None
            if self.cache is None:
                self.cache = prefix_cache(wrapper, self.ids)
        return expand(self.cache, len(input_ids))

    def _generation_layout(self, rows: list[list[int]], offset: int) -> tuple[Tensor, Tensor]:
        """(ids, mask) with the pads between the prefix and each row's rest, so every row ends at the last
        column (whole prompts, offset 0: plain left padding)."""
        rest = self.wrapper.pad([row[offset:] for row in rows], "left")
        ids, mask = rest["input_ids"], rest["attention_mask"]
        if offset:
            prefix = torch.as_tensor(rows[0][:offset])[None].expand(len(rows), -1)
            ids = torch.cat([prefix, ids], 1)
            mask = torch.cat([torch.ones_like(prefix), mask], 1)
        return ids.to(self.wrapper.device), mask.to(self.wrapper.device)


def in_given_order(rows: Sequence[np.ndarray], parts: Sequence[Tensor]) -> Tensor:
    """Per-batch results (first dimension: the batch's rows) concatenated in the order the prompts were given."""
    done = torch.cat(list(parts))
    out = torch.empty_like(done)
    out[torch.as_tensor(np.concatenate(rows), device=done.device)] = done
    return out


def _classes(scheme: PositionScheme, prompts: Sequence[int], rows: Sequence[int], width: int,
             pads_after: int | None) -> np.ndarray:
    """(batch, width) mean classes of a batch's rows, `prompts` tokens of prompt then the rest of `rows` tokens
    generated: right-padded, or (`pads_after` = P) with the pads between the first P tokens and the rest."""
    out = np.full((len(rows), width), len(scheme.mean_classes) - 1, np.int64)
    for row, (n, total) in enumerate(zip(prompts, rows)):
        classes = np.concatenate([scheme.classes(n), np.full(total - n, scheme.generated, np.int64)])
        if pads_after is None:
            out[row, :total] = classes
        else:
            out[row, :pads_after] = classes[:pads_after]
            out[row, width - (total - pads_after):] = classes[pads_after:]
    return out


__all__ = ["Layout", "PromptBatch", "SharedPrefix", "continuation_matches", "expand", "in_given_order", "prefix_cache"]
