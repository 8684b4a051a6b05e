"""What the model says, plainly or under an edit: batched greedy answers and the likelihood of given answers.

An edit is what a circuit claim is about: nodes mean-ablated or kept (`refusal_sae.ablation.Ablator.edit`),
latents scaled (`Ablator.scale`), or a direction removed or added (`refusal_sae.directions`' context
managers, active around the call). Node edits are functions `edit(hidden, classes)` of the residual after
their layer and the mean class of each position; here they run as forward hooks on every forward pass of
`model.generate`, with the classes of the positions that pass runs:

    the prompt (one pass)      each position's class (`refusal_sae.positions`): prefix, content, suffix;
    each generated token       the generation position's class "-1" (`PositionScheme.generated`), whose
                               mean is the node's value where the model decides how to answer, so an
                               ablated node holds at every new token the value it was ablated to where the
                               answer began; with `edit_generated=False` new tokens are not edited at all.

Batches come from `refusal_sae.prefix.SharedPrefix` (the template prefix's keys and values once, computed
under the edit: a direction edit changes them too; node edits never touch the prefix, whose positions hold no
node). Decoding is plain greedy whatever the model's generation config says.

Coherence. An answer that stops refusing by turning into noise is no success, so the edited model's mean
log-likelihood per token of given answers (the unedited model's, to plainly safe prompts) is measured by
teacher forcing (`answer_log_likelihood`), with the same edit at the answer's positions as during generation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from refusal_sae.metric import as_prompt_list
from refusal_sae.model import ModelWrapper
from refusal_sae.positions import PositionScheme
from refusal_sae.prefix import SharedPrefix
from refusal_sae.validate import positive_int

NodeEdit = Callable[[Tensor, Tensor], Tensor]
"""`edit(hidden, classes)`: the residual after a layer (batch, seq, d_model), each position's mean class."""


@dataclass
class Answers:
    """Greedy answers of a prompt list."""

    texts: list[str]
    """Decoded, special tokens dropped, stripped."""
    tokens: list[list[int]]
    """The new token ids, up to and without the first end-of-sequence token."""


@dataclass
class _Positions:
    """What the node edits need of the forward passes: the prompt pass's mean classes (and which of its
    positions hold generated tokens), the generated tokens' class, whether those are edited, the passes run."""

    prompt: Tensor | None = None
    generated_at: Tensor | None = None
    generated: Tensor | int = 0
    edit_generated: bool = False
    passes: int = 0


@contextlib.contextmanager
def _hooked(wrapper: ModelWrapper, edits: Mapping[str, NodeEdit], state: _Positions) -> Iterator[None]:
    """`edits` as residual hooks: the first forward pass after `state.passes` is reset is the prompt's, each
    later one a generated token's (a decoder pre-hook counts them); nothing is edited while `state.prompt` is
    None."""
    if not edits:
        yield
        return

    def count(module: Any, args: Any, kwargs: Any) -> None:
        state.passes += 1

    def bind(edit: NodeEdit) -> Callable[[Tensor], Tensor]:
        def hook(hidden: Tensor) -> Tensor:
            if state.prompt is None:  # no batch of ours runs (e.g. the prefix engine's own passes)
                return hidden
            if state.passes <= 1:
                out = edit(hidden, state.prompt)
                if state.generated_at is None or state.edit_generated:
                    return out
                return torch.where(state.generated_at[..., None], hidden, out)
            if not state.edit_generated:
                return hidden
            return edit(hidden, torch.as_tensor(state.generated, device=hidden.device).expand(hidden.shape[:2]))

        return hook

    handle = wrapper.decoder.register_forward_pre_hook(count, with_kwargs=True)
    try:
        with wrapper.edit_residuals({layer: bind(e) for layer, e in edits.items()}):
            yield
    finally:
        handle.remove()


@torch.no_grad()
def generate(wrapper: ModelWrapper, prompts: Sequence[str], max_new_tokens: int = 24, batch_size: int = 32, *,
             scheme: PositionScheme | None = None, edits: Mapping[str, NodeEdit] | None = None,
             edit_generated: bool = False, class_offsets: Sequence[int] | None = None, reuse_prefix: bool = True,
             desc: str = "generating answers") -> Answers:
    """Greedy answers of at most `max_new_tokens` tokens, under the node `edits` ({layer: edit}, which need the
    position `scheme`) and whatever hooks the caller has active. `class_offsets`: per prompt, added to its
    positions' classes (edits whose values are per prompt: `Ablator.prompt_values`).

    Every row's new tokens follow its own last prompt token (the prefix engine's generation layout: pads between
    the shared template prefix and the rest), so a batch gives what each prompt would alone; prompts are batched
    by token length (a batch runs every row to its longest prompt) and the answers returned in the given order.
    It stops at the model's eos token(s). `reuse_prefix=False` runs whole prompts (plain left padding).
    """
    from transformers import GenerationConfig

    positive_int("max_new_tokens", max_new_tokens, 24)
    positive_int("batch_size", batch_size, 8)
    edits = _node_edits(edits, scheme)
    prompts = as_prompt_list(prompts)
    tok = wrapper.tokenizer
    eos = wrapper.model.generation_config.eos_token_id
    eos = eos if eos is not None else tok.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
                               no_repeat_ngram_size=0, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    state = _Positions(edit_generated=edit_generated)
    texts: list[str] = [""] * len(prompts)
    tokens: list[list[int]] = [[] for _ in prompts]
    with _hooked(wrapper, edits, state):
        # node edits never touch the template prefix, and only it: a longer shared start would run unedited
        length = scheme.prefix if edits else None
        batches = SharedPrefix(wrapper, "generation", length, reuse=reuse_prefix).batches(
            prompts, batch_size, scheme if edits else None, layout="generation", by_length=True)
        for batch in tqdm(batches, total=-(-len(prompts) // batch_size), desc=desc, unit="batch", leave=False):
            state.passes = 0
            if edits:
                _bind_classes(state, batch.run_classes, scheme, class_offsets, batch.rows)
            cache = {wrapper.cache_argument: batch.past} if batch.past is not None else {}
            out = wrapper.model.generate(input_ids=batch.input_ids, attention_mask=batch.mask,
                                         generation_config=gen_cfg, **cache)
            state.prompt = None
            new = out[:, batch.input_ids.shape[1]:]
            for i, row, text in zip(batch.rows, new.tolist(), tok.batch_decode(new.cpu(), skip_special_tokens=True)):
                end = next((j for j, t in enumerate(row) if t in stops), len(row))
                tokens[i], texts[i] = row[:end], text.strip()
    return Answers(texts, tokens)


@torch.no_grad()
def answer_log_likelihood(wrapper: ModelWrapper, prompts: Sequence[str], answers: Sequence[Sequence[int]],
                          batch_size: int = 8, *, scheme: PositionScheme | None = None,
                          edits: Mapping[str, NodeEdit] | None = None, edit_generated: bool = False,
                          class_offsets: Sequence[int] | None = None) -> np.ndarray:
    """(n,) mean log-probability per token of each prompt's given `answer` tokens (teacher forcing), under the
    node `edits` (the answer's positions edited as generated tokens are, see `generate`) and the caller's
    hooks; NaN for an empty answer. `class_offsets` as for `generate`."""
    positive_int("batch_size", batch_size, 8)
    edits = _node_edits(edits, scheme)
    out = np.full(len(prompts), np.nan)
    engine = SharedPrefix(wrapper, "answer likelihood", scheme.prefix if edits else None)
    state = _Positions(edit_generated=edit_generated)
    for batch in engine.batches(prompts, batch_size, scheme if edits else None, continuations=answers,
                                by_length=True):
        lengths = [len(answers[i]) for i in batch.rows]
        ends = (batch.mask.sum(1) - batch.offset).tolist()  # each row's length in the positions that run
        if edits:
            _bind_classes(state, batch.run_classes, scheme, class_offsets, batch.rows)
            state.generated_at = torch.zeros_like(batch.run_ids, dtype=torch.bool)
            for i, end in enumerate(ends):
                state.generated_at[i, end - lengths[i] : end] = True
        state.passes = 0
        with _hooked(wrapper, edits, state):
            hidden = wrapper.final_hidden(batch.run_ids, batch.mask, past=batch.past)
        state.prompt = None
        for i, (n, end) in enumerate(zip(lengths, ends)):
            if n == 0:
                continue
            logits = wrapper.unembed(hidden[i, end - n - 1 : end - 1])  # positions that predict the answer
            target = batch.run_ids[i, end - n : end]
            logp = torch.log_softmax(logits, -1).gather(-1, target[:, None])
            out[batch.rows[i]] = float(logp.mean())
    return out


def _node_edits(edits: Mapping[str, NodeEdit] | None, scheme: PositionScheme | None) -> dict[str, NodeEdit]:
    """`edits` as a dict; node edits need the position scheme their classes come from."""
    edits = dict(edits or {})
    if edits and scheme is None:
        raise ValueError("node edits need the position scheme their classes come from")
    return edits


def _bind_classes(state: _Positions, classes: Tensor, scheme: PositionScheme, offsets: Sequence[int] | None,
                  rows: np.ndarray) -> None:
    """The classes the hooks use for this batch: the prompt pass's and the generated tokens', each row's shifted
    by its offset."""
    shift = (torch.as_tensor([offsets[i] for i in rows], device=classes.device)[:, None] if offsets is not None
             else torch.zeros((len(classes), 1), dtype=classes.dtype, device=classes.device))
    state.prompt = classes + shift
    state.generated = scheme.generated + shift


__all__ = ["Answers", "NodeEdit", "answer_log_likelihood", "generate"]
